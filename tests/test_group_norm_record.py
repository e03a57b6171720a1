"""GroupNorm group counts are in no state dict: our checkpoints record them, and a model of another rule is refused.

A narrow DDPM U-Net normalises in 32 groups (pytorch-ddpm) or, with ``min_channels_per_group: 4``, in min(32, C/4)
(EDM's rule, and every U-Net of ours saved before the record existed). Loading one into the other would be strict on
keys and shapes and silently compute another function.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusion_transfer.io.checkpoint import GROUP_NORMS_KEY, CheckpointError
from diffusion_transfer.io.unet_checkpoint import load_unet_checkpoint
from diffusion_transfer.methods import Diffusion

NARROW = {"model_channels": 32, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]}


def unet_model(min_channels_per_group: int) -> Diffusion:
    torch.manual_seed(0)
    return Diffusion(arch="ddpm-cifar10", arch_overrides={**NARROW, "min_channels_per_group": min_channels_per_group},
                     num_classes=4, resolution=8, channels=3)


def saved(model: Diffusion, record: bool = True) -> dict:
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    if not record:
        checkpoint.pop(GROUP_NORMS_KEY)
    return checkpoint


def test_a_checkpoint_records_each_unet_group_count() -> None:
    checkpoint = saved(unet_model(4))
    groups = checkpoint[GROUP_NORMS_KEY]
    norms = {n: m for n, m in unet_model(4).named_modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups.keys() == norms.keys() and norms
    assert all(groups[n] == min(32, m.num_channels // 4) for n, m in norms.items())  # EDM's rule at 32/64 channels
    assert set(saved(unet_model(1))[GROUP_NORMS_KEY].values()) == {32}  # pytorch-ddpm's


@pytest.mark.parametrize("record", [True, False], ids=["recorded", "older-file"])
def test_load_checkpoint_refuses_another_group_rule_and_names_the_option(record: bool) -> None:
    checkpoint = saved(unet_model(4), record=record)  # a file without the record is an older one: EDM's rule
    unet_model(4).on_load_checkpoint(checkpoint)  # the same rule loads
    with pytest.raises(CheckpointError, match="min_channels_per_group: 4") as info:
        unet_model(1).on_load_checkpoint(checkpoint)
    assert "\n" not in str(info.value) and "8 groups" in str(info.value)
    with pytest.raises(CheckpointError, match="min_channels_per_group: 1"):
        unet_model(4).on_load_checkpoint(saved(unet_model(1)))


def test_load_unet_checkpoint_checks_the_record_of_our_ckpt(tmp_path: Path) -> None:
    source = unet_model(4)
    for name, record in (("recorded.ckpt", True), ("older.ckpt", False)):
        torch.save(saved(source, record=record), tmp_path / name)
        same = unet_model(4).net
        load_unet_checkpoint(same, tmp_path / name)
        x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 7]), torch.tensor([0, 1])
        torch.testing.assert_close(same.eval()(x, t, y), source.net.eval()(x, t, y))
        other = unet_model(1).net
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(CheckpointError, match=f"{name}.*min_channels_per_group: 4"):
            load_unet_checkpoint(other, tmp_path / name)
        assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # nothing half-loaded
