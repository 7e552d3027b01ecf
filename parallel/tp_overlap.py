"""Transformer Engine's tensor-parallel communication overlap: the userbuffers through which its
linears split the sequence-parallel all-gather (before the column-parallel GEMMs) and
reduce-scatter (after the row-parallel ones) into chunks pipelined with the GEMM, as Megatron-LM's
``--tp-comm-overlap`` sets them up."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def initialize_userbuffers(tokens: int, hidden: int, tp: int, fp8: bool,
                           dtype: torch.dtype = torch.bfloat16) -> None:
    """TE's userbuffers for activations of [tokens, hidden] (the whole sequence x micro-batch of
    the SP-split transformer) over the TP group; once per process, before the first forward.
    The bootstrap runs over NCCL (TE 1.9+)."""
    from transformer_engine.pytorch import module as te_module

    te_module.base.initialize_ub(shape=[tokens, hidden], tp_size=tp, use_fp8=fp8, dtype=dtype,
                                 bootstrap_backend="nccl")
    log.info("TP communication overlap: Transformer Engine userbuffers for [%d, %d] at tp %d%s",
             tokens, hidden, tp, " (FP8)" if fp8 else "")


__all__ = ["initialize_userbuffers"]
