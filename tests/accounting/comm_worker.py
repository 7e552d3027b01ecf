"""Rank code of the communication-accounting test: known calls, then one step per layout, counted
by megavideo.accounting.comm_volume.CommCounter; each rank writes what it counted to ``<out>/rank<r>.json``.

megatron-core and the Trainer are imported by the ranks only (inside the functions): the pytest
process that spawns them then does not pay their import.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
import torch.distributed as dist

from megavideo.accounting.comm_volume import CommCounter, megatron_groups
from parallel.distributed import init_distributed

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "stage1_tiny.yaml"
BASE = ["train.steps=1", "train.warmup_steps=0", "train.global_batch=4", "train.micro_batch=2",
        "run.tensorboard=false", "parallel.tp=1", "parallel.pp=1", "parallel.sp=false"]


def _counts(counter: CommCounter) -> dict:
    return {"bytes": dict(counter.bytes), "calls": dict(counter.calls),
            "wire": counter.wire_bytes(),
            "by_op": {f"{label}/{op}": v for (label, op), v in counter.by_op.items()},
            "by_kind": {f"{label}/{kind}": v for (label, kind), v in counter.by_kind().items()}}


def _primitives(rank: int) -> dict:
    """Calls of known sizes on the default group, a labelled and an unlabelled subgroup, through
    torch.distributed and through megatron-core's import-time aliases."""
    from megatron.core.tensor_parallel import layers, mappings

    sub, unlabelled = dist.new_group([0, 1]), dist.new_group([0, 1])
    x = torch.ones(10)  # 40 bytes
    before = (mappings.dist_all_gather_func, layers.dist_reduce_scatter_func, dist.all_reduce,
              dist.distributed_c10d.isend)
    counter = CommCounter({"sub": sub})
    with counter:
        dist.all_reduce(x)  # world: 40
        mappings.dist_all_gather_func(torch.empty(20), x, group=sub)  # sub all_gather: 80
        layers.dist_reduce_scatter_func(torch.empty(5), torch.ones(10), group=sub)  # sub: 40
        dist.broadcast(x, 0, group=unlabelled)  # other: 40
        peer = 1 - rank
        ops = [dist.P2POp(dist.isend, torch.ones(3), peer, group=sub),
               dist.P2POp(dist.irecv, torch.empty(3), peer, group=sub)]  # sub: 12 + 12
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        if rank == 0:  # on the default group, labelled by the peer's group: sub send / recv 16
            dist.send(torch.ones(4), 1)
        else:
            dist.recv(torch.empty(4), 0)
    after = (mappings.dist_all_gather_func, layers.dist_reduce_scatter_func, dist.all_reduce,
             dist.distributed_c10d.isend)
    return _counts(counter) | {"restored": all(a is b for a, b in zip(before, after, strict=True))}


def _trainable(tr) -> dict:
    params = [p for chunk in tr.chunks for p in chunk.module.parameters() if p.requires_grad]
    buckets = sum(len(buffer.buckets) for chunk in tr.chunks
                  for buffer in chunk.buffers + chunk.expert_parallel_buffers)
    return {"params": sum(p.numel() for p in params), "tensors": len(params), "buckets": buckets}


def run_cases(rank: int, world: int, cases: list[tuple[str, list[str], str]], out: str) -> None:
    """For each (name, overrides, "forward_backward" | "train_step"): build the stage-1 tiny
    Trainer, count the bytes of one call of that method on every megatron-core group."""
    from megatron.core import parallel_state

    from megavideo.config import load_config
    from megavideo.training.loop import Trainer

    init_distributed()
    results = {"primitives": _primitives(rank)}
    for name, overrides, method in cases:
        tr = Trainer(load_config(CONFIG, BASE + overrides))
        counter = CommCounter(megatron_groups())
        with counter:
            if method == "train_step":
                tr.train_step(0)
            else:
                tr.forward_backward(step=0)
        results[name] = _counts(counter) | _trainable(tr) | {
            "tokens": tr.stage.seq_length,
            "micro_batches": tr.stage.num_microbatches,
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        }
        del tr
        gc.collect()
        dist.barrier()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
