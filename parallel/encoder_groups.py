"""Stage 3's video encoder at its own tensor-parallel degree on the LLM's first pipeline stage.

The LLM's TP group of ``tp`` ranks is cut into ``tp / etp`` encoder groups of ``etp`` consecutive
ranks; each encodes its share of the micro-batch. The ranks holding the same encoder shard form a
replica group, which gathers the clips' query tokens so every LLM rank holds the whole
micro-batch::

    LLM TP group    [0 1 2 3]        tp = 4, etp = 2
    encoder groups  [0 1] [2 3]      clips 0..b/2-1 and b/2..b-1
    replica groups  [0 2] [1 3]

Gradients of the encoder's parameters: the replicas' are summed over the replica group (each saw
other clips); sequence-parallel ones (norms, layer scales, row-parallel biases) are partial sums
over the encoder group's sequence shards and the replicas, so they are summed over the whole LLM
TP group. Both happen before megatron-core's data-parallel reduction
(:meth:`EncoderGroups.finish_grads`), which is why those parameters lose the ``sequence_parallel``
mark megatron-core would otherwise reduce over the LLM's TP group itself. Replicas other than the
first mark their parameters ``shared``: the gradient norm and the checkpoint count each once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection


@dataclass
class EncoderGroups:
    """This rank's encoder group, replica group and coordinates in them."""

    tp_group: dist.ProcessGroup
    replica_group: dist.ProcessGroup | None
    tp_rank: int
    tp_size: int
    replica: int
    replicas: int
    llm_tp_group: dist.ProcessGroup
    pg_collection: ProcessGroupCollection
    _sp_params: list[torch.nn.Parameter] = field(default_factory=list)
    _params: list[torch.nn.Parameter] = field(default_factory=list)

    def adopt(self, module: torch.nn.Module) -> None:
        """Take over ``module``'s parameters (built on this group): make the replicas equal,
        move the sequence-parallel marks, record the TP coordinates the checkpoint uses."""
        for param in module.parameters():
            if self.replicas > 1:
                src = dist.get_global_rank(self.replica_group, 0)
                with torch.no_grad():
                    dist.broadcast(param.data, src, group=self.replica_group)
                param.shared = self.replica > 0
            param.tp_group, param.tp_coords = self.tp_group, (self.tp_rank, self.tp_size)
            if getattr(param, "sequence_parallel", False):
                param.sequence_parallel = False
                self._sp_params.append(param)
            else:
                self._params.append(param)

    def finish_grads(self) -> None:
        """Sum the encoder's gradients as the module docstring says (before the DP reduction)."""
        jobs = [(self._sp_params, self.llm_tp_group)]
        if self.replicas > 1:
            jobs.append((self._params, self.replica_group))
        for params, group in jobs:
            grads = [p.main_grad for p in params if p.requires_grad]
            if not grads or group.size() == 1:
                continue
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=group)
            for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(part.view_as(g))


def encoder_groups(etp: int) -> EncoderGroups:
    """Build the groups for encoder TP degree ``etp`` (collective: every rank calls it)."""
    llm_tp = parallel_state.get_tensor_model_parallel_group()
    tp, rank = llm_tp.size(), llm_tp.rank()
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    if etp == tp:
        return EncoderGroups(llm_tp, None, rank, tp, 0, 1, llm_tp, pgs)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, dist.get_process_group_ranks(llm_tp))
    mine_tp = mine_replica = None
    for ranks in sorted({tuple(r) for r in every}):  # the same order on every rank
        for j in range(tp // etp):
            group = dist.new_group(list(ranks[j * etp:(j + 1) * etp]))
            if dist.get_rank() in ranks[j * etp:(j + 1) * etp]:
                mine_tp = group
        for v in range(etp):
            group = dist.new_group(list(ranks[v::etp]))
            if dist.get_rank() in ranks[v::etp]:
                mine_replica = group
    pgs.tp = mine_tp
    pgs.tp_cp = mine_tp
    return EncoderGroups(mine_tp, mine_replica, rank % etp, etp, rank // etp, tp // etp, llm_tp,
                         pgs)


__all__ = ["EncoderGroups", "encoder_groups"]
