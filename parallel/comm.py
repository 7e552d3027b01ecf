"""Collectives with the right gradients, sequence-parallel helpers and pipeline side channels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import mappings


def group_size(group) -> int:
    return 1 if group is None or not dist.is_initialized() else group.size()


def group_device(group=None) -> torch.device:
    """Where the tensors of a collective on ``group`` (default: the world) must live: this rank's
    GPU for NCCL, the CPU for gloo."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group in the forward pass and in the backward pass.

    Right when every rank consumes the sum with its own, rank-local computation (the statistics of
    a norm over a tensor-parallel-split width): the gradient of the sum is then the sum of the
    ranks' gradients.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Autograd-aware sum over ``group`` (identity for a group of one)."""
    if group_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


def to_sequence_parallel(x: torch.Tensor, group, enabled: bool) -> torch.Tensor:
    """[s, b, h] replicated -> [s/tp, b, h] split (backward: all-gather)."""
    if not enabled:
        return x
    return mappings.scatter_to_sequence_parallel_region(x, group=group)


def from_sequence_parallel(x: torch.Tensor, group, enabled: bool) -> torch.Tensor:
    """[s/tp, b, h] split -> [s, b, h] replicated, for consumers that compute the same thing on
    every TP rank (backward: each rank keeps its own slice of the replicated gradient)."""
    if not enabled:
        return x
    return mappings.gather_from_sequence_parallel_region(
        x, tensor_parallel_output_grad=False, group=group
    )


class _InjectLoss(torch.autograd.Function):
    """Returns ``x`` unchanged; in the backward pass seeds ``loss`` with the gradient ``scale``.

    A pipeline stage that is not the last computes part of the objective (an aligner on one of its
    layers). The schedule only back-propagates from the stage's output, so the local loss is tied
    to the output: its gradient is injected when the output's gradient arrives.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.scale), None


def attach_loss(x: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
    """Make ``loss`` (scaled by ``scale``) part of the backward pass that starts at ``x``."""
    return _InjectLoss.apply(x, loss, scale)


def send_to_stage(tensors: Sequence[torch.Tensor], dst: int, pp_group) -> None:
    """Send tensors to pipeline rank ``dst`` (matched by :func:`recv_from_stage`)."""
    peer = dist.get_global_rank(pp_group, dst)
    for tensor in tensors:
        dist.send(tensor.contiguous(), peer, group=pp_group)


def recv_from_stage(
    shapes: Sequence[tuple[tuple[int, ...], torch.dtype]], src: int, pp_group, device
) -> list[torch.Tensor]:
    """Receive tensors of known shapes and dtypes from pipeline rank ``src``."""
    peer = dist.get_global_rank(pp_group, src)
    out = []
    for shape, dtype in shapes:
        tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(tensor, peer, group=pp_group)
        out.append(tensor)
    return out


def all_reduce_tied_grads(modules, tied: dict[str, tuple[int, ...]], pp_group, device) -> None:
    """Sum the gradients of a parameter held in copies by several pipeline chunks.

    Each copy carries ``tied_name``; ``tied`` names the tied parameters (with their shapes) whose
    copies span more than one chunk, identically on every rank. Every pipeline rank joins the
    all-reduce, with zeros where it holds no copy. Runs after the data-parallel reduction, like
    megatron-core's embedding all-reduce; copies live in their own DDP buckets so every stage
    shards them the same way under the distributed optimizer.
    """
    for name, shape in tied.items():
        copies = [p for module in modules for p in module.parameters()
                  if getattr(p, "tied_name", None) == name]
        grad = torch.zeros(shape, dtype=torch.float32, device=device)
        for param in copies:
            grad += param.main_grad
        if group_size(pp_group) > 1:
            dist.all_reduce(grad, group=pp_group)
        for param in copies:
            param.main_grad.copy_(grad)


class _GatherRows(torch.autograd.Function):
    """All-gather [b, ...] -> [ranks * b, ...] in rank order; backward: this rank's rows of the
    gradient summed over the ranks (every rank's loss uses every rank's rows), or, without
    ``sum_grads``, of this rank's gradient alone (the official InternVideo2 gather)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, sum_grads: bool) -> torch.Tensor:
        ctx.group, ctx.rows, ctx.rank = group, x.shape[0], dist.get_rank(group)
        ctx.sum_grads = sum_grads
        parts = [torch.empty_like(x) for _ in range(group.size())]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if ctx.sum_grads:
            dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None, None


def all_gather_rows(x: torch.Tensor, group, sum_grads: bool = True) -> torch.Tensor:
    """Autograd-aware all-gather along dim 0 (identity for a group of one); see
    :class:`_GatherRows` for ``sum_grads``."""
    if group_size(group) == 1:
        return x
    return _GatherRows.apply(x, group, sum_grads)


def gather_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in the group's rank order (autograd-aware
    as :func:`all_gather_rows`)."""
    if group_size(group) == 1:
        return x
    return all_gather_rows(x.movedim(dim, 0).contiguous(), group).movedim(0, dim)


class _FetchRows(torch.autograd.Function):
    """Rows of a tensor split over ranks by blocks of ``b`` rows, picked by global row index."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, group) -> torch.Tensor:
        ranks, rank, b = group.size(), dist.get_rank(group), x.shape[0]
        wanted = [torch.empty_like(index) for _ in range(ranks)]
        dist.all_gather(wanted, index, group=group)
        # rows of mine each rank asked for, in its order; the rows I asked for, by owner
        sends = [w[w // b == rank] - rank * b for w in wanted]
        owner = index // b
        order = torch.argsort(owner, stable=True)
        send_counts = [len(s) for s in sends]
        recv_counts = [int((owner == r).sum()) for r in range(ranks)]
        rows = torch.cat(sends)
        received = x.new_empty((len(index), *x.shape[1:]))
        dist.all_to_all_single(received, x[rows].contiguous(), recv_counts, send_counts,
                               group=group)
        out = torch.empty_like(received)
        out[order] = received
        ctx.save_for_backward(rows, order)
        ctx.group, ctx.counts, ctx.shape = group, (send_counts, recv_counts), x.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, order = ctx.saved_tensors
        send_counts, recv_counts = ctx.counts
        back = grad.new_empty((len(rows), *grad.shape[1:]))
        dist.all_to_all_single(back, grad[order].contiguous(), send_counts, recv_counts,
                               group=ctx.group)
        out = grad.new_zeros(ctx.shape)
        out.index_add_(0, rows, back)
        return out, None, None


def fetch_rows(x: torch.Tensor, index: torch.Tensor, group) -> torch.Tensor:
    """``cat(all ranks' x)[index]`` without gathering everything: each rank sends only the rows
    others ask for (all-to-all), and gradients flow back to the owners. ``x`` holds the same
    number of rows on every rank; every rank asks for the same number of rows."""
    if group_size(group) == 1:
        return x[index]
    return _FetchRows.apply(x, index, group)
