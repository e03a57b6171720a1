"""Plain ``nn.Module`` denoisers (no Lightning imports)."""

from .dit import DiT, DiT_CONFIGS, build_dit

__all__ = ["DiT", "DiT_CONFIGS", "build_dit"]
