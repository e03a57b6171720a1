"""Loading foreign checkpoints by local path (never by URL)."""
