"""Noise processes and samplers, no weights and no Lightning imports."""
