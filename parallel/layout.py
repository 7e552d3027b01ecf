"""Pipeline partitioning of a layer stack and tensor-parallel head padding.

Virtual stages are numbered in layer order: virtual stage ``c = v * pp + p`` is model chunk ``v`` of
pipeline rank ``p`` (megatron-core's interleaved assignment). With ``pp * vpp = C`` virtual stages
and ``L`` layers, each virtual stage gets ``L // C`` layers and the ``L % C`` remaining layers go one
each to the *last* ``L % C`` virtual stages. The first stage never gets an extra layer: it also runs
the patch embedding and, in stage 1, the frozen teachers. An explicit list of per-virtual-stage
layer counts (``parallel.pipeline_layout``) replaces the rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def split_layers(num_layers: int, pp: int, vpp: int = 1, explicit: list[int] | None = None) -> list[int]:
    """Layers per virtual stage, in layer order."""
    chunks = pp * vpp
    if explicit:
        return list(explicit)
    base, extra = divmod(num_layers, chunks)
    return [base + (1 if c >= chunks - extra else 0) for c in range(chunks)]


@dataclass(frozen=True)
class Chunk:
    """One model chunk: which layers it holds and whether it starts or ends the pipeline."""

    pp_rank: int
    vp_stage: int
    first_layer: int  # 0-based, global
    num_layers: int
    is_first: bool
    is_last: bool

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)


def chunks_of(pp_rank: int, counts: list[int], pp: int) -> list[Chunk]:
    """The model chunks held by pipeline rank ``pp_rank`` (one per virtual stage)."""
    vpp = len(counts) // pp
    starts = [sum(counts[:c]) for c in range(len(counts))]
    out = []
    for v in range(vpp):
        c = v * pp + pp_rank
        out.append(Chunk(pp_rank, v, starts[c], counts[c], c == 0, c == len(counts) - 1))
    return out


def megatron_layout(counts: list[int], pp: int) -> list[list[str]]:
    """The per-virtual-stage layer lists megatron-core's PipelineParallelLayerLayout takes."""
    layout = [["decoder"] * n for n in counts]
    layout[0].insert(0, "embedding")
    layout[-1].append("loss")
    return layout


def padded_heads(num_heads: int, tp: int) -> int:
    """Attention heads padded with zero heads up to the next multiple of ``tp``."""
    return math.ceil(num_heads / tp) * tp
