"""``python -m diffusion_transfer fit|validate|test|predict --config FILE``."""

from .cli import main

main()
