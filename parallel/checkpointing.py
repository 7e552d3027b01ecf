"""Layout-independent sharded tensors for megatron-core's dist_checkpointing.

A checkpoint stores every tensor in its single-rank shape, so it loads at any (tp, pp, vpp, dp):

- a parameter split over tensor parallelism along ``partition_dim`` is one shard per TP rank;
- a parameter of attention heads (``head_padding``, see :mod:`parallel.tensors`) is one shard per
  *real* head, global shape ``[real heads, *one head's slice]``: zero padding heads are never
  written, and the same file loads whatever padding the new tp needs;
- a gated MLP's [gate; up] projection (``glu``) is stored as [2, rows, ...], split along the rows;
- anything else is replicated over the TP group.

Replica ids are ``(pipeline copy, TP replica, DP replica)``; the shard with all zeros writes. Tied
copies on several pipeline stages write once. Over data parallelism the writing is spread: the
``i``-th tensor is written by DP rank ``i % dp``.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.managers import SyncManager

import torch
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.strategies import filesystem_async

from parallel.lifetime import die_with_parent
from parallel.tensors import is_tp_split


def writer_tied_to_rank() -> None:
    """Start the checkpoint writer's result queue in a helper process that dies with this rank.

    megatron-core's writer starts a ``multiprocessing.Manager()`` for that queue at the first
    save: a server process (and a resource tracker beside it) that would outlive a rank killed
    with SIGKILL (:mod:`parallel.lifetime`). The same manager started here gets the
    parent-death signal; the tracker then ends when the rank and the server are gone. (A plain
    queue would not do: the writer reads the results with ``get_nowait`` right after the
    ``put``, which only a manager's synchronous queue guarantees to find.)
    """
    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = manager.Queue()


def _head_slices(param: torch.nn.Parameter, tp_rank: int) -> list[tuple[int, int]]:
    """(global head, local offset along the head dim) of this rank's real heads."""
    dim, rows, heads = param.head_padding
    local = param.shape[dim] // rows
    first = tp_rank * local
    return [(first + j, j * rows) for j in range(local) if first + j < heads]


def sharded_tensors(
    key: str,
    param: torch.nn.Parameter,
    local: torch.Tensor | None,
    tp_rank: int,
    tp: int,
    replica: tuple[int, int],
    dtype: torch.dtype | None = None,
) -> list[ShardedTensor]:
    """The shards of ``local`` (``param``'s data or a tensor of its shape, e.g. an Adam moment).

    ``local=None`` builds empty load targets of ``dtype`` (default: the parameter's).
    ``replica`` is (pipeline copy, DP replica).
    """
    copy, dp_replica = replica
    if local is None:
        local = torch.empty(param.shape, dtype=dtype or param.dtype)
    if getattr(param, "head_padding", None) is not None:
        dim, rows, heads = param.head_padding
        return [
            ShardedTensor.from_rank_offsets(
                key, local.narrow(dim, offset, rows).contiguous(), (0, head, heads),
                replica_id=(copy, 0, dp_replica), prepend_axis_num=1)
            for head, offset in _head_slices(param, tp_rank)
        ]
    if getattr(param, "glu", False):
        halves = local.reshape(2, local.shape[0] // 2, *local.shape[1:])
        return [ShardedTensor.from_rank_offsets(key, halves, (1, tp_rank, tp),
                                                replica_id=(copy, 0, dp_replica))]
    if is_tp_split(param) and tp > 1:
        return [ShardedTensor.from_rank_offsets(key, local, (param.partition_dim, tp_rank, tp),
                                                replica_id=(copy, 0, dp_replica))]
    return [ShardedTensor.from_rank_offsets(key, local, replica_id=(copy, tp_rank, dp_replica))]


def as_loaded(param: torch.nn.Parameter, local: torch.Tensor, tp_rank: int) -> list[torch.Tensor]:
    """A local tensor of ``param``'s shape as :func:`sharded_tensors` would load it (its real
    heads apart): what :func:`assemble` puts back together."""
    if getattr(param, "head_padding", None) is None:
        return [local]
    dim, rows, _ = param.head_padding
    return [local.narrow(dim, offset, rows) for _, offset in _head_slices(param, tp_rank)]


def assemble(param: torch.nn.Parameter, loaded: list[torch.Tensor], tp_rank: int) -> torch.Tensor:
    """The local tensor from what :func:`sharded_tensors` loaded (padding heads are zeros)."""
    if getattr(param, "head_padding", None) is None:
        return loaded[0].reshape(param.shape)
    dim, rows, _ = param.head_padding
    out = torch.zeros(param.shape, dtype=loaded[0].dtype if loaded else param.dtype)
    for (_, offset), chunk in zip(_head_slices(param, tp_rank), loaded, strict=True):
        out.narrow(dim, offset, rows).copy_(chunk.reshape(out.narrow(dim, offset, rows).shape))
    return out
