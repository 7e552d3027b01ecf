"""Collectives with the right gradients, sequence-parallel helpers and pipeline side channels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import mappings


def group_size(group) -> int:
    return 1 if group is None or not dist.is_initialized() else group.size()


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
