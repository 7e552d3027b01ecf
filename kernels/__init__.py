"""Compute backends: capability detection, norms and the attention/linear layers MegaVideo runs on."""
