"""Full (unsharded, unpadded) views of tensor-parallel parameters, and the way back.

Tensor-parallel parameters carry megatron-core's ``tensor_model_parallel``/``partition_dim``
attributes. Parameters of padded attention heads also carry ``head_padding = (dim, rows per head,
real heads)``: along ``dim`` the first ``real heads x rows per head`` entries are real, the rest
belong to zero padding heads. A gated MLP's fused input projection [gate; up] carries ``glu``:
each TP rank holds [its gate rows; its up rows], so it is split per half.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.distributed.param_and_grad_buffer import shard_buffer

from parallel.comm import group_size


def is_tp_split(param: torch.nn.Parameter) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def unpad_heads(param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    padding = getattr(param, "head_padding", None)
    if padding is None:
        return full
    dim, rows, heads = padding
    return full.narrow(dim, 0, rows * heads)


def pad_heads(param: torch.nn.Parameter, full: torch.Tensor, padded_size: int) -> torch.Tensor:
    padding = getattr(param, "head_padding", None)
    if padding is None or full.shape[padding[0]] == padded_size:
        return full
    dim = padding[0]
    shape = list(full.shape)
    shape[dim] = padded_size - shape[dim]
    return torch.cat([full, full.new_zeros(shape)], dim=dim)


def gather_full(param: torch.nn.Parameter, local: torch.Tensor, tp_group) -> torch.Tensor:
    """The whole tensor (``local`` is ``param``'s shard, or its gradient), padding removed."""
    tp = group_size(tp_group)
    if is_tp_split(param) and tp > 1:
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local.contiguous(), group=tp_group)
        if getattr(param, "glu", False):
            halves = [p.chunk(2, dim=param.partition_dim) for p in parts]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves],
                             dim=param.partition_dim)
        local = torch.cat(parts, dim=param.partition_dim)
    return unpad_heads(param, local)


def whole_shape(param: torch.nn.Parameter, tp: int) -> tuple[int, ...]:
    """The single-rank shape of a parameter (TP shards joined, padding heads removed)."""
    shape = list(param.shape)
    if is_tp_split(param):
        shape[param.partition_dim] *= tp
    padding = getattr(param, "head_padding", None)
    if padding is not None:
        shape[padding[0]] = padding[1] * padding[2]
    return tuple(shape)


def take_shard(param: torch.nn.Parameter, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's shard of a whole, unpadded tensor (zero padding heads added first)."""
    if not is_tp_split(param):
        return full
    dim = param.partition_dim
    if getattr(param, "glu", False):
        return torch.cat([half.chunk(tp, dim=dim)[tp_rank] for half in full.chunk(2, dim=dim)],
                         dim=dim)
    padded = pad_heads(param, full, param.shape[dim] * tp)
    return padded.chunk(tp, dim=dim)[tp_rank]


def zero_padding_heads(param: torch.nn.Parameter, tp_rank: int) -> None:
    """Zero this rank's slice of the padding heads (they must stay zero to change nothing)."""
    padding = getattr(param, "head_padding", None)
    if padding is None:
        return
    dim, rows, heads = padding
    local = param.shape[dim]
    real_here = min(max(rows * heads - tp_rank * local, 0), local)
    with torch.no_grad():
        param.narrow(dim, real_here, local - real_here).zero_()


def gather_grad_shards(ddp_modules) -> None:
    """After the distributed optimizer's reduce-scatter each data-parallel rank holds only its
    shard of every gradient bucket; all-gather the shards so ``main_grad`` is whole again."""
    for module in ddp_modules:
        if not module.ddp_config.use_distributed_optimizer:
            continue
        for bucket_group in module.bucket_groups:
            group = bucket_group.intra_distributed_optimizer_instance_group
            size, rank = group.size(), group.rank()
            for bucket in bucket_group.buckets:
                shard = shard_buffer(bucket.grad_data, size)[rank].clone()
                dist.all_gather_into_tensor(bucket.grad_data, shard, group=group)
