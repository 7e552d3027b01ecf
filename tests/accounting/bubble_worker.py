"""Rank code of the bubble test: timed steps of megatron-core's pipeline schedules, over stand-in
stages of a fixed cost and over the stage-1 student."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.pipeline_parallel import get_forward_backward_func, schedules
from megatron.core.transformer import TransformerConfig

from megavideo.accounting.pipeline_timing import PipelineTimer, StepTiming
from megavideo.config import load_config
from megavideo.training.loop import Trainer
from parallel.distributed import init_distributed, init_model_parallel

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "stage1_tiny.yaml"


class _Sleep(torch.autograd.Function):
    """Identity whose forward and backward each take a fixed wall time (sleeping, so the two
    ranks do not compete for the cores)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_s: float, backward_s: float) -> torch.Tensor:
        time.sleep(forward_s)
        ctx.backward_s = backward_s
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        time.sleep(ctx.backward_s)
        return grad, None, None


class UniformChunk(torch.nn.Module):
    """A model chunk of exactly known cost: what the formula assumes of every stage."""

    def __init__(self, config: TransformerConfig, first: bool, forward_s: float, backward_s: float):
        super().__init__()
        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        self.first, self.forward_s, self.backward_s = first, forward_s, backward_s
        self.weight = torch.nn.Parameter(torch.ones(config.hidden_size))
        self.input_tensor = None

    def set_input_tensor(self, tensors) -> None:
        self.input_tensor = tensors[0] if isinstance(tensors, list) else tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [s, b, h]
        hidden = x if self.first else self.input_tensor
        return _Sleep.apply(hidden * self.weight, self.forward_s, self.backward_s)


def _uniform_steps(world: int, vpp: int, microbatches: int, forward_s: float, backward_s: float,
                   steps: int) -> list[StepTiming]:
    init_model_parallel(1, world, vpp, 0)
    config = TransformerConfig(
        num_layers=world * vpp, hidden_size=8, num_attention_heads=1,
        pipeline_model_parallel_size=world,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        pipeline_dtype=torch.float32, batch_p2p_comm=False, batch_p2p_sync=False)  # the student's p2p
    rank = parallel_state.get_pipeline_model_parallel_rank()
    chunks = [UniformChunk(config, rank == 0 and v == 0, forward_s / vpp, backward_s / vpp)
              for v in range(vpp)]

    def forward_step(data_iterator, model):
        return model(next(data_iterator)), lambda out: (out.sum(), {})

    with PipelineTimer(group=parallel_state.get_pipeline_model_parallel_group()) as timer:
        for _ in range(steps):
            inputs = [iter([torch.ones(4, 1, 8)] * microbatches) for _ in chunks]
            with timer.step():
                get_forward_backward_func()(
                    forward_step_func=forward_step, data_iterator=inputs if vpp > 1 else inputs[0],
                    model=chunks if vpp > 1 else chunks[0], num_microbatches=microbatches,
                    seq_length=4, micro_batch_size=1)
    return timer.steps


def interleaving_accepted(world: int, microbatches: range) -> dict[int, bool]:
    """Per micro-batch count, whether megatron-core's interleaved schedule (pp ``world``, vpp 2)
    starts a forward-only step or refuses it at start-up."""
    init_model_parallel(1, world, 2, 0)
    config = TransformerConfig(
        num_layers=world * 2, hidden_size=8, num_attention_heads=1,
        pipeline_model_parallel_size=world, virtual_pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32, batch_p2p_comm=False, batch_p2p_sync=False)
    rank = parallel_state.get_pipeline_model_parallel_rank()
    chunks = [UniformChunk(config, rank == 0 and v == 0, 0.0, 0.0) for v in range(2)]
    accepted = {}
    for m in microbatches:
        try:
            get_forward_backward_func()(
                forward_step_func=lambda it, model: (model(next(it)), lambda out: (out.sum(), {})),
                data_iterator=[iter([torch.ones(4, 1, 8)] * m) for _ in chunks], model=chunks,
                num_microbatches=m, seq_length=4, micro_batch_size=1, forward_only=True)
            accepted[m] = True
        except (ValueError, RuntimeError):  # its two start-up checks, before any communication
            accepted[m] = False
    return accepted


def _student_steps(overrides: list[str], steps: int) -> list[StepTiming]:
    trainer = Trainer(load_config(CONFIG, overrides))
    with PipelineTimer(group=trainer.pp_group) as timer:
        for step in range(steps):
            with timer.step():
                trainer.forward_backward(step)
    return timer.steps


def measure(rank: int, world: int, uniform: dict, student: dict, steps: int, out: str) -> None:
    """``steps`` timed steps of each case; rank 0 saves ``{name: [StepTimings of each rank]}`` and
    whether megatron-core's schedule functions were restored afterwards, to ``out``.

    ``uniform``: name -> (vpp, micro-batches, forward_s, backward_s), the stand-in stages' cost
    per micro-batch (all chunks of a rank together); ``student``: name -> config overrides.
    """
    torch.set_num_threads(1)
    init_distributed()
    original = schedules.forward_step, schedules.backward_step
    results = {}
    for name, case in uniform.items():
        results[name] = _gather(_uniform_steps(world, *case, steps), world)
    for name, overrides in student.items():
        results[name] = _gather(_student_steps(overrides, steps), world)
    results["restored"] = (schedules.forward_step, schedules.backward_step) == original
    results["interleaving"] = interleaving_accepted(world, range(1, 9))
    if rank == 0:
        torch.save(results, out)


def _gather(steps: list[StepTiming], world: int) -> list[list[StepTiming]]:
    gathered = [None] * world
    dist.all_gather_object(gathered, steps)
    return gathered
