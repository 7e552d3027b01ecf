"""Compute kernels and backend selection: which of Transformer Engine, flash-attn and apex this
process has (:mod:`.backends`), the core attention of the local spec (:mod:`.attention`), torchao's
FP8 GEMMs on megatron-core's parallel linears (:mod:`.float8`) and the norms (:mod:`.norms`)."""
