"""Process-level runtime concerns: the default precision for this machine, and the process group's teardown.

``default_precision`` is the one place that decides the precision of a run whose config sets none (the CLI
calls it and prints its decision).

Why the teardown exists: Lightning destroys the process group at interpreter exit only for NCCL
(``lightning.fabric.utilities.distributed._init_dist_connection`` registers its ``atexit`` handler for
``nccl`` alone). A gloo group (CPU DDP) is then left to be torn down during interpreter finalisation, when
Gloo's C++ worker threads may still hold finished ``AsyncWork`` objects whose tensors keep Python references.
Freeing those takes the GIL of an interpreter that is being destroyed, and the process aborts with
``terminate called without an active exception`` (SIGABRT, exit status -6) *after* training has finished and
written its checkpoint. It happens at random (about one run in ten here), which made CI flaky. Destroying the
group from an ``atexit`` handler, while the interpreter is still whole, removes the race.
"""

from __future__ import annotations

import atexit

import torch

_teardown_registered = False


def destroy_process_group_at_exit() -> None:
    """Register (once per process) an ``atexit`` handler that destroys the default process group, if one exists.

    Call it from a ``setup`` hook: under DDP the group exists by then on every rank. Safe to call in a
    single-process run (it does nothing) and any number of times.
    """
    global _teardown_registered
    if _teardown_registered or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    atexit.register(_destroy_process_group)
    _teardown_registered = True


def _destroy_process_group() -> None:
    # Lightning's own NCCL handler may have run first; destroying twice would raise.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------- default precision

#: CPU feature flags (``/proc/cpuinfo``) of native bf16 arithmetic: x86 AVX512-BF16 / AMX-BF16, Arm BF16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (a bf16 matmul then runs about 4x faster than float32).

    Without it PyTorch emulates bf16 and mixed precision only costs time, so the default stays float32.

    Args:
        cpuinfo: the text of ``/proc/cpuinfo`` (read when None; False where it cannot be read).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
                cpuinfo = file.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features") and NATIVE_BF16_FLAGS & set(value.split()):
            return True
    return False


def default_precision(accelerator: object = "auto") -> tuple[str, str]:
    """The Trainer precision the CLI uses when the config sets none, and why: ``(precision, reason)``.

    ``bf16-mixed`` where the hardware runs bf16 natively (a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 / AMX / Arm BF16), else ``32-true``. ``16-mixed`` is never chosen silently: it needs loss
    scaling and can overflow. An explicit ``trainer.precision`` is never replaced.

    Args:
        accelerator: the config's ``trainer.accelerator`` (``auto``, ``cpu``, ``gpu``, ``cuda``, ...).
    """
    name = str(accelerator or "auto").lower()
    if name in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"GPU {torch.cuda.get_device_name()} supports bf16"
        return "32-true", f"GPU {torch.cuda.get_device_name()} lacks bf16"
    if name in ("auto", "cpu"):
        if cpu_has_native_bf16():
            return "bf16-mixed", "the CPU computes bf16 natively"
        return "32-true", "the CPU has no native bf16"
    return "32-true", f"accelerator {name!r}"
