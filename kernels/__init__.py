"""Compute kernels and backend selection: which of Transformer Engine, flash-attn and apex this
process has (:mod:`.backends`) and the norms (:mod:`.norms`)."""
