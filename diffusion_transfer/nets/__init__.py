"""Plain ``nn.Module`` denoisers (no Lightning imports): DiT, UNets."""
