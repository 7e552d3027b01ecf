"""The training loop: megatron-core DDP, (distributed) optimizer, pipeline schedules, metrics."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from dataloaders.manifest import Manifest
from dataloaders.mixture import TEXT, Mixture
from kernels import backends
from megavideo.accounting.meter import StepMeter
from megavideo.config import Config, megatron, validate_device, validate_world
from megavideo.models.init import initialize
from megavideo.stages.align import Align
from megavideo.stages.stage1 import Stage1
from megavideo.stages.stage2 import Stage2
from megavideo.stages.stage3 import Stage3
from megavideo.training import data
from megavideo.training.checkpoint import (
    EXIT_REQUEUE,
    Checkpointer,
    SaveClock,
    StopSignal,
    teacher_params,
)
from megavideo.training.metrics import MetricsWriter
from megavideo.training.state import canonical_params
from parallel.comm import all_reduce_tied_grads
from parallel.distributed import detect_launch, device, init_distributed, init_model_parallel

log = logging.getLogger(__name__)

STAGES = {1: Stage1, 2: Stage2, 3: Stage3}


def stage_class(cfg: Config) -> type:
    """The runner of the config's stage (stage 3's align sub-stage has its own)."""
    if cfg.stage == 3 and cfg.model.substage == "align":
        return Align
    return STAGES[cfg.stage]


class Trainer:
    """Everything one rank needs to run the steps of a validated config's stage."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        par, train = cfg.parallel, cfg.train
        validate_device(cfg)  # before any process group
        self.launch = init_distributed(megatron.process_group_timeout(cfg))
        log.info("GPU stack: %s", backends.detect().summary())
        init_model_parallel(par.tp, par.pp, par.vpp, train.seed)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        # Megatron-LM's convention for what is drawn while building; the initial weights are then
        # re-drawn per parameter from train.seed alone, so that every layout starts the same run
        torch.manual_seed(train.seed + 100 * pp_rank)
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(train.seed + 100 * pp_rank)
        self.device = device()
        self.stage = stage_class(cfg)(cfg, self.device)
        self._initialize(train.seed)
        config = self.stage.config
        self.chunks = [
            DistributedDataParallel(config=config, ddp_config=megatron.ddp_config(cfg), module=model,
                                    disable_bucketing=i > 0)
            for i, model in enumerate(self.stage.models)
        ]
        self.optimizer = get_megatron_optimizer(megatron.optimizer_config(cfg, config.params_dtype),
                                                self.chunks,
                                                config_overrides=megatron.no_weight_decay())
        self.scheduler = megatron.scheduler(cfg, self.optimizer)
        config.finalize_model_grads_func = self._finalize_grads
        for name, hook in megatron.overlap_hooks(cfg, self.chunks).items():
            setattr(config, name, hook)
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.skips = data.SkipBudget(cfg.data.max_skip_rate, cfg.data.skip_window)
        self.manifest: Manifest | None = None
        self.meter = StepMeter(cfg, dist.get_world_size(), self.stage)

    def _initialize(self, seed: int) -> None:
        """Every random initial weight re-drawn from ``seed`` and its canonical name, as on one
        rank (:func:`megavideo.models.init.initialize`); a checkpoint restored later replaces
        them."""
        start = time.perf_counter()
        teachers = self.stage.teachers
        named = canonical_params(self.stage.models) + list(teacher_params(teachers).items())
        modules = [*self.stage.models, *([teachers] if teachers is not None else [])]
        initialize(named, modules, seed, parallel_state.get_tensor_model_parallel_rank(),
                   parallel_state.get_tensor_model_parallel_world_size())
        log.info("initial weights drawn per parameter from train.seed=%d in %.1f s", seed,
                 time.perf_counter() - start)

    @contextlib.contextmanager
    def gathered_params(self) -> Iterator[None]:
        """The model's parameters up to date inside the block: with the parameter all-gather
        overlapped, the last step's gather otherwise waits for the next forward pass (Megatron-LM
        does the same before it saves)."""
        if not megatron.overlap(self.cfg)[1]:
            yield
            return
        for chunk in self.chunks:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in self.chunks:
                chunk.enable_forward_pre_hook()

    def _finalize_grads(self, model, num_tokens=None, **kwargs) -> None:
        self.stage.finish_grads()
        finalize_model_grads(model, num_tokens, **kwargs)
        all_reduce_tied_grads([c.module for c in model], self.stage.tied, self.pp_group, self.device)

    def forward_backward(self, step: int, forward_only: bool = False) -> dict[str, float]:
        """Run the schedule over this step's micro-batches; returns the loss terms of the step
        (averaged over micro-batches and data-parallel ranks, summed over pipeline stages; a
        per-token loss is its sum over the step's tokens divided by their count)."""
        stage = self.stage
        batches = stage.micro_batches(step)
        terms_names = stage.TERMS
        summed = terms_names + (("tokens",) if stage.PER_TOKEN else ())
        # on the device: the terms are added up without a host sync per micro-batch
        sums = torch.zeros(len(summed), dtype=torch.float64, device=self.device)

        def forward_step(data_iterator, model):
            output, terms = model(next(data_iterator))
            for name, value in terms.items():
                sums[summed.index(name)] += value.detach().double()
            if stage.PER_TOKEN:
                return output, lambda out: (out, terms["tokens"].to(torch.int), {})
            return output, lambda out: (out, {})

        single = len(self.chunks) == 1
        iterators = [iter(b) for b in batches]
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators[0] if single else iterators,
            model=self.chunks[0] if single else self.chunks,
            num_microbatches=stage.num_microbatches,
            seq_length=stage.seq_length_at(step),
            micro_batch_size=self.cfg.train.micro_batch,
            forward_only=forward_only,
        )
        if not stage.PER_TOKEN:
            sums /= stage.num_microbatches
        finite = torch.isfinite(sums).all()
        # the data counts (skipped, attempts) ride along: TP peers hold the same, others zeros
        totals = torch.cat([sums, stage.take_data_counts()])
        dist.all_reduce(totals, group=self.pp_group)
        dist.all_reduce(totals, group=self.dp_group)
        totals, self.locally_finite = totals.cpu(), bool(finite)
        if stage.PER_TOKEN:
            sums = totals[: len(terms_names)] / totals[len(terms_names)].clamp(min=1)
        else:
            sums = totals[: len(terms_names)] / parallel_state.get_data_parallel_world_size()
        weights = stage.loss_weights
        terms = {f"loss/{name}": float(v) for name, v in zip(terms_names, sums, strict=True)
                 if weights[name]}
        terms["loss"] = float(sum(weights[name] * v for name, v in zip(terms_names, sums,
                                                                        strict=True)))
        if self.cfg.data.source == "manifest":
            terms["data/skipped"], terms["data/attempts"] = (
                int(v) for v in totals[len(summed):])
        if self.cfg.uses_images:  # the audio-video terms are 0 on image steps
            terms["data/image"] = float(stage.mixture.is_image(step))
        if self.cfg.uses_text:
            terms["data/text"] = float(stage.mixture.medium(step) == TEXT)
        return terms

    def skipped_files(self) -> list[str]:
        """Every file a decoding rank has skipped in this run (collective: all ranks call it)."""
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(self.stage.skipped_files))
        return sorted({path for paths in gathered for path in paths})

    def data_state(self) -> dict:
        """What a checkpoint keeps of the data: the skip counts and which manifest it was."""
        if self.manifest is None:
            return self.skips.state()
        return self.skips.state() | {"manifest_rows": len(self.manifest),
                                     "manifest_digest": self.manifest.digest}

    def start_data(self, start: int, resumed: dict, manifest: Manifest | None,
                   images: Manifest | None = None, texts: list[dict] | None = None,
                   mixture: Mixture | None = None) -> None:
        """Feed from step ``start`` on, continuing the data state of the checkpoint ``resumed``
        (its metadata; empty for a new run); ``images``: the image manifest, ``texts``: stage
        3's text-only rows, ``mixture``: their steps (:func:`data.mixture`)."""
        self.manifest = manifest
        if manifest is not None:
            saved = resumed.get("data", {})
            self.skips.restore(saved)
            if saved.get("manifest_digest", manifest.digest) != manifest.digest:
                log.warning("the manifest changed since the checkpoint (%d rows, now %d): the "
                            "order of the current epoch changes from here on",
                            saved.get("manifest_rows", 0), len(manifest))
        consumed = resumed.get("consumed_samples", start * self.cfg.train.global_batch)
        self.stage.start_data(start, consumed, manifest, images, texts, mixture)

    def train_step(self, step: int) -> dict[str, float]:
        with self.meter.step():
            for chunk in self.chunks:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
            metrics = self.forward_backward(step)
            data_wait = self.stage.data_wait
            _, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics |= self.meter.metrics(self.stage.mixture.medium(step))
        if "data/skipped" in metrics:
            metrics["data/wait_s"] = data_wait
        return metrics


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm: the run stops and saves nothing."""


def _check_finite(step: int, metrics: dict[str, float], local_ok: bool,
                  checkpointer: Checkpointer) -> None:
    """Raise NonFiniteError on every rank (with the ranks where it appeared) if a loss term or the
    gradient norm is not finite; the values are the same on every rank, so all stop together."""
    checked = {k: v for k, v in metrics.items() if k.startswith("loss") or k == "grad_norm"}
    if all(math.isfinite(v) for v in checked.values()):
        return
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, local_ok)
    ranks = [r for r, ok in enumerate(flags) if not ok] or list(range(len(flags)))
    shown = ", ".join(f"{k} {v:.4g}" for k, v in checked.items())
    checkpointer.finish()  # a background save of a good step still counts
    last = checkpointer.latest()
    where = f"the last good checkpoint is {last}" if last else "there is no checkpoint yet"
    raise NonFiniteError(f"step {step}: non-finite loss or gradient norm on rank(s) "
                         f"{', '.join(map(str, ranks))} ({shown}); stopped without saving, {where}.")


def run(cfg: Config) -> list[dict]:
    """Train until ``train.steps``, resuming from the run's latest checkpoint if it has one.

    Saves every ``checkpoint.interval`` steps, at the end, and at the step boundary after a
    SIGUSR1/SIGTERM (then exits with :data:`EXIT_REQUEUE`). Rank 0 writes the metrics.
    Returns the metrics of the steps run.
    """
    validate_world(cfg, detect_launch().world_size)  # before any process group exists
    manifest, images, texts = data.check(cfg), data.images(cfg), data.texts(cfg)
    mixture = data.mixture(cfg, manifest, images, texts)
    stop = StopSignal()  # from the start: a signal during start-up is honoured after one step
    trainer = Trainer(cfg)
    checkpointer = Checkpointer(cfg, trainer)
    start = checkpointer.restore()
    trainer.start_data(start, checkpointer.resumed, manifest, images, texts, mixture)
    if start >= cfg.train.steps:
        log.info("nothing to do: the run is at step %d of train.steps=%d", start, cfg.train.steps)
    writer = MetricsWriter(cfg.run.dir, cfg.run.tensorboard, start) if dist.get_rank() == 0 else None
    history = []
    interval = cfg.checkpoint.interval
    clock = SaveClock(cfg.checkpoint.every_minutes)
    if dist.get_rank() == 0:
        run_dir = Path(cfg.run.dir).resolve()
        log.info("run %s: metrics %s, checkpoints %s; steps %d to %d, %s", run_dir,
                 run_dir / "metrics.jsonl", cfg.checkpoint_dir.resolve(), start, cfg.train.steps,
                 checkpointer.origin)
    try:
        for step in range(start, cfg.train.steps):
            metrics = trainer.train_step(step)
            _check_finite(step, metrics, trainer.locally_finite, checkpointer)
            if "data/skipped" in metrics:
                metrics["data/skip_rate"] = trainer.skips.add(
                    step, metrics["data/skipped"], metrics["data/attempts"], trainer.skipped_files)
            history.append(metrics)
            if writer is not None:
                writer.write(step, metrics)
                if step % cfg.run.log_interval == 0:
                    parts = " ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items()
                                     if k.startswith("loss/"))
                    mfu = f"  MFU {100 * metrics['perf/mfu']:.1f}%" if "perf/mfu" in metrics else ""
                    log.info("step %d  loss %.4f  (%s)  grad_norm %.3f  %.2f samples/s  "
                             "%.3g TFLOP/s/device%s  peak %.2f GiB", step, metrics["loss"], parts,
                             metrics["grad_norm"], metrics["samples_per_s"],
                             metrics["perf/model_tflops"], mfu, metrics["mem/peak_gib"])
            done = step + 1
            stopping, due = stop.agreed(clock.due())
            at_end = done == cfg.train.steps and cfg.checkpoint.save_at_end
            if stopping or at_end or due or (interval and done % interval == 0):
                with trainer.gathered_params():
                    checkpointer.save(done)
                clock.saved()
            else:
                checkpointer.poll()
            if stopping:
                checkpointer.finish()
                raise SystemExit(EXIT_REQUEUE)
        checkpointer.finish()
    finally:
        if writer is not None:
            writer.close()
    return history


__all__ = ["NonFiniteError", "Trainer", "run"]
