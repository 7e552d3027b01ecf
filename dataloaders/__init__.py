"""Video data: sample keys, synthetic clips (and, later, manifests and decoders)."""
