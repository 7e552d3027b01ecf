"""Per-step throughput accounting of the training loop: FLOP/s, MFU, tokens/s, memory.

Every step's metrics gain (see docs/performance.md):

    perf/model_tflops      model FLOPs of the step (every part: student, teachers, encoders,
                           QFormer, LLM; forward and backward) / step time / devices, in TFLOP/s
    perf/hardware_tflops   the same with recomputation and TP head / SP token padding added
    perf/mfu, perf/hfu     the two above over the device's peak (only where the peak is known)
    perf/video_tokens_per_s, perf/step_s
    mem/peak_gib           the largest peak over the ranks: CUDA's max allocated bytes this step,
                           or on CPU the process's peak resident set
and, when ``profile.comm`` / ``profile.pipeline`` are on, the collective bytes per group (measured
and analytic) and the pipeline bubble (measured and the formula's).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time

import torch
import torch.distributed as dist

from dataloaders.mixture import IMAGE, TEXT, VIDEO
from megavideo.accounting.comm_volume import (
    CommCounter,
    dp_volume,
    megatron_groups,
    pp_volume,
    tp_layer_grad_volume,
    tp_layer_volume,
)
from megavideo.accounting.devices import peak_tflops
from megavideo.accounting.flops import step_flops, video_tokens
from megavideo.accounting.pipeline_timing import PipelineTimer, bubble_fraction
from megavideo.config import Config
from megavideo.stages.common import PipelineStage
from parallel.comm import group_device

log = logging.getLogger(__name__)


def peak_memory_bytes() -> int:
    """This process's peak device memory: CUDA's max allocated, else the peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class StepMeter:
    """Turns one step of a Trainer into throughput metrics (and, when the config asks, its
    collective bytes and pipeline bubble)."""

    def __init__(self, cfg: Config, world_size: int, stage: PipelineStage) -> None:
        flops = step_flops(cfg, stage.dp)
        self.world = world_size
        # per medium: (model FLOPs, hardware FLOPs, video tokens) of its steps
        self.costs = {VIDEO: (flops.model, flops.hardware, video_tokens(cfg))}
        if cfg.uses_images:
            images = cfg.image_steps()
            image_flops = step_flops(images, stage.dp)
            self.costs[IMAGE] = (image_flops.model, image_flops.hardware, video_tokens(images))
        if cfg.uses_text:
            text_flops = step_flops(cfg, stage.dp, video=False)
            self.costs[TEXT] = (text_flops.model, text_flops.hardware, 0)
        self.samples = cfg.train.global_batch
        self.peak = peak_tflops(cfg.profile.device, cfg.train.precision, cfg.profile.peak_tflops)
        self.device = group_device()  # of the step's max-over-ranks all-reduces
        self.elapsed = 0.0
        if dist.get_rank() == 0:
            log.info("step cost: %.4g model TFLOP (%s), %.4g with recomputation and padding; "
                     "MFU against %s", flops.model / 1e12,
                     ", ".join(f"{k} {(v + flops.backward.get(k, 0.0)) / 1e12:.3g}"
                               for k, v in flops.forward.items()),
                     flops.hardware / 1e12,
                     f"{self.peak:g} TFLOP/s per device" if self.peak else "no known peak")

        self.comm = CommCounter(megatron_groups()) if cfg.profile.comm else None
        self.analytic = analytic_volume(cfg, stage) if cfg.profile.comm else {}
        self.group_sizes = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": stage.dp}
        self.pp_group = stage.pp_group
        self.timer = PipelineTimer(stage.pp_group) if cfg.profile.pipeline else None
        self.bubble_formula = bubble_fraction(cfg.parallel.pp, stage.num_microbatches,
                                              cfg.parallel.vpp)

    @contextlib.contextmanager
    def step(self):
        """Times the step (counting its collectives and timing its schedule when asked) and
        resets the peak-memory counter at its start."""
        with contextlib.ExitStack() as stack:
            if self.comm is not None:
                stack.enter_context(self.comm)
                self.comm.reset()
            if self.timer is not None:
                self.timer.steps.clear()
                stack.enter_context(self.timer)
                stack.enter_context(self.timer.step())
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            yield
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.elapsed = time.perf_counter() - started

    def metrics(self, medium: str = VIDEO) -> dict[str, float]:
        """The last step's throughput metrics (``medium``: what the step trained on, see
        :class:`~dataloaders.mixture.Mixture`; collective: every rank calls it)."""
        elapsed = self.elapsed
        memory = torch.tensor([float(peak_memory_bytes())], device=self.device)
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        per_device = 1e12 * elapsed * self.world
        model, hardware, tokens = self.costs[medium]
        out = {
            "perf/step_s": elapsed,
            "samples_per_s": self.samples / elapsed,
            "perf/video_tokens_per_s": tokens / elapsed,
            "perf/model_tflops": model / per_device,
            "perf/hardware_tflops": hardware / per_device,
            "mem/peak_gib": float(memory) / 2**30,
        }
        if self.peak:
            out["perf/mfu"] = out["perf/model_tflops"] / self.peak
            out["perf/hfu"] = out["perf/hardware_tflops"] / self.peak
        if self.comm is not None:
            for label, size in self.group_sizes.items():  # a one-rank group moves nothing
                out[f"comm/{label}_bytes"] = self.comm.bytes.get(label, 0.0) if size > 1 else 0.0
                out[f"comm/{label}_analytic_bytes"] = self.analytic[label]
        if self.timer is not None and self.timer.steps:
            bubble = torch.tensor([self.timer.steps[-1].bubble / self.group_sizes["pp"]],
                                  device=self.device)
            dist.all_reduce(bubble, group=self.pp_group)  # the mean over the pipeline ranks
            out["pipeline/bubble"] = float(bubble)
            out["pipeline/bubble_formula"] = self.bubble_formula
        return out


def analytic_volume(cfg: Config, stage: PipelineStage) -> dict[str, float]:
    """This rank's analytic payload bytes per step: ``tp`` the pipelined model's transformer
    layers (and, with SP, their replicated gradients; not the teachers, heads or embeddings),
    ``pp`` their activations and gradients between stages, ``dp`` the gradient reduction of
    this rank's trained parameters."""
    par, config = cfg.parallel, stage.config
    tokens, m = stage.seq_length, stage.num_microbatches
    width = config.params_dtype.itemsize
    layers = sum(chunk.num_layers for chunk in stage.layout[stage.pp_rank])
    qk_norm = getattr(config, "full_width_qk_norm", False)
    sp = config.sequence_parallel
    tp = m * sum(tp_layer_volume(tokens, cfg.train.micro_batch, config.hidden_size, width, par.tp,
                                 sp, qk_norm, cfg.train.recompute).values())
    tp += sum(tp_layer_grad_volume(config.hidden_size, par.tp, sp,
                                   norm_bias=config.normalization == "LayerNorm",
                                   layer_scale=bool(getattr(config, "layer_scale_init", 0.0)),
                                   linear_bias=config.add_bias_linear).values())
    pp = pp_volume(tokens, cfg.train.micro_batch, config.hidden_size, width, m, par.pp,
                   stage.pp_rank, par.vpp, par.tp, sp)
    trained = sum(p.numel() for chunk in stage.models for p in chunk.parameters() if p.requires_grad)
    dp = dp_volume(trained, stage.dp, par.distributed_optimizer, 4, width)
    return {"tp": tp * layers, "pp": sum(pp.values()), "dp": sum(dp.values())}
