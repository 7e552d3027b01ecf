"""What every stage's runner shares: the process groups, the video encoder's pipeline layout and
token count, the micro-batch count, the per-sample stochastic-depth draws."""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from dataloaders.synthetic import generator
from megavideo.config import Config
from megavideo.models.specs import transformer_config
from megavideo.models.video import Tokens
from parallel.layout import chunks_of, split_layers


class PipelineStage:
    """One rank's share of a stage: subclasses build ``models`` (this rank's chunks), name their
    loss ``TERMS`` with their ``loss_weights``, and produce each step's ``micro_batches``."""

    TERMS: tuple[str, ...] = ()

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        par, model = cfg.parallel, cfg.model
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp = parallel_state.get_data_parallel_world_size()
        counts = split_layers(model.student.num_layers, par.pp, par.vpp, par.pipeline_layout)
        self.layout = [chunks_of(r, counts, par.pp) for r in range(par.pp)]
        self.tokens = Tokens.of(model, par.tp, par.sp)
        self.config = transformer_config(model.student, par, cfg.train, pipelined=True,
                                         sequence_parallel=par.sp)
        self.models: list[torch.nn.Module] = []
        self.teachers = None
        self.tied: dict[str, tuple[int, ...]] = {}
        self.data_counts = torch.zeros(2, dtype=torch.float64)  # this step: skipped, attempts
        self.data_wait = 0.0  # seconds this step waited for decoded clips

    @property
    def num_microbatches(self) -> int:
        train = self.cfg.train
        return train.global_batch // (train.micro_batch * self.dp)

    def take_data_counts(self) -> torch.Tensor:
        counts, self.data_counts = self.data_counts, torch.zeros(2, dtype=torch.float64)
        return counts

    def _drop_u(self, step: int, indices: list[int]) -> torch.Tensor:
        layers = self.cfg.model.student.num_layers
        seed = self.cfg.train.seed
        return torch.stack([torch.rand(layers, 2, generator=generator(seed, step, i, "drop_path"))
                            for i in indices]).to(self.device)
