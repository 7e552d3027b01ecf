"""What every stage's runner shares: the process groups, the video encoder's pipeline layout and
token count, the micro-batch count, the per-sample stochastic-depth draws, and the decoded clips
(video files are decoded on the first pipeline stage by its TP rank 0, which broadcasts them to
its TP peers)."""

from __future__ import annotations

import functools
import logging
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from dataloaders.manifest import Manifest
from dataloaders.mixture import Mixture
from dataloaders.synthetic import Normal, generator, sample_keys
from kernels.keyed_random import normal
from megavideo.config import Config, megatron
from megavideo.models.specs import transformer_config
from megavideo.models.video import Tokens
from megavideo.training import data
from parallel.layout import chunks_of, split_layers
from parallel.tp_overlap import initialize_userbuffers

log = logging.getLogger(__name__)


class PipelineStage:
    """One rank's share of a stage: subclasses build ``models`` (this rank's chunks), name their
    loss ``TERMS`` with their ``loss_weights``, and produce each step's ``micro_batches``."""

    TERMS: tuple[str, ...] = ()
    PER_TOKEN = False  # the loss is a sum over tokens, normalised by the step's token count

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        par = cfg.parallel
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.last = self.pp_rank == par.pp - 1
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp = parallel_state.get_data_parallel_world_size()
        counts, self.tokens, self.config = self.pipelined()
        self.layout = [chunks_of(r, counts, par.pp) for r in range(par.pp)]
        self.models: list[torch.nn.Module] = []
        self.teachers = None
        self.tied: dict[str, tuple[int, ...]] = {}
        # this step's decodes (skipped, attempts), kept on the device: no host sync per batch
        self.data_counts = torch.zeros(2, dtype=torch.float64, device=device)
        self.data_wait = 0.0  # seconds this step waited for decoded clips
        self.manifest: Manifest | None = None
        self.from_files = cfg.data.source == "manifest" and self.pp_rank == 0
        self.decodes = self.from_files and parallel_state.get_tensor_model_parallel_rank() == 0
        self._batches = None
        self.skipped_files: set[str] = set()  # every file this rank skipped, logged once
        # the image and text steps (stages 2 and 3), and the image steps' config
        self.image_cfg = cfg.image_steps() if cfg.uses_images else None
        self.image_manifest: Manifest | None = None
        self._image_batches = None
        self.text_rows: list[dict] | None = None  # stage 3's text-only rows
        self.mixture = data.mixture(cfg)  # synthetic data's; manifest data's at start_data

    def pipelined(self) -> tuple[list[int], Tokens, TransformerConfig]:
        """The pipelined model's layers per virtual stage, the video encoder's token sequence
        and the pipelined model's config: here (stages 1 and 2) the video encoder's."""
        par, model = self.cfg.parallel, self.cfg.model
        counts = split_layers(model.student.num_layers, par.pp, par.vpp, par.pipeline_layout)
        config = transformer_config(model.student, par, self.cfg.train, pipelined=True,
                                    sequence_parallel=par.sp)
        tokens = Tokens.of(model, par.tp, par.sp, self.cfg.train.precision == "fp8")
        if megatron.tp_comm_overlap(self.cfg):
            config.tp_comm_overlap = True
            initialize_userbuffers(tokens.length * self.cfg.train.micro_batch,
                                   model.student.hidden_size, par.tp,
                                   megatron.fp8_backend(self.cfg.train) == "te",
                                   config.params_dtype)
        return counts, tokens, config

    @property
    def seq_length(self) -> int:
        """The sequence length the pipeline passes between stages."""
        return self.tokens.length

    def seq_length_at(self, step: int) -> int:
        """That of ``step`` (stage 2's image steps have their own)."""
        return self.seq_length

    def finish_grads(self) -> None:
        """Gradient reductions of this stage's own, before megatron-core's (none here)."""

    @property
    def num_microbatches(self) -> int:
        train = self.cfg.train
        return train.global_batch // (train.micro_batch * self.dp)

    def start_data(self, start_step: int, consumed_samples: int, manifest: Manifest | None,
                   images: Manifest | None = None, texts: list[dict] | None = None,
                   mixture: Mixture | None = None) -> None:
        """Begin reading clips of ``manifest`` at ``start_step``, whose data starts at
        ``consumed_samples``; with ``images`` (an image manifest) or ``texts`` (stage 3's
        text-only rows) the image and text steps of ``mixture`` (:func:`data.mixture`) read
        those instead."""
        self.manifest = manifest
        self.image_manifest, self.text_rows = images, texts
        if mixture is not None:
            self.mixture = mixture
        if self.decodes:
            feed = data.feed(self.cfg, manifest, self.dp_rank, self.dp, self.device, self.mixture)
            self._batches = feed.iterate(start_step, self.cfg.train.steps, consumed_samples)
            if images is not None:
                feed = data.feed(self.image_cfg, images, self.dp_rank, self.dp, self.device,
                                 self.mixture, images=True)
                self._image_batches = feed.iterate(start_step, self.cfg.train.steps,
                                                   consumed_samples)

    def _decoded(self, b: int, images: bool = False) -> dict[str, torch.Tensor]:
        """The next decoded micro-batch of ``b`` clips (``images``: of stage 2's image feed) on
        every TP rank of the first stage: ``video`` [b, 3, frames, size, size] (copied and
        broadcast in 8-bit levels, normalised on the device), ``rows`` [b] (the manifest rows,
        replacements included), with audio ``fbank`` [b, frames, bins] and ``has_audio`` [b],
        and in stage 3 with ``data.time_message`` ``times`` [b, 1 + frames] (fps, frames)."""
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)
        cfg = self.image_cfg if images else self.cfg
        if self.decodes:
            start = time.perf_counter()
            batch = next(self._image_batches if images else self._batches)
            self.data_wait += time.perf_counter() - start
            out = {"video": batch.video, "rows": torch.tensor(batch.rows)}
            if batch.fbank is not None:
                out |= {"fbank": batch.fbank, "has_audio": batch.has_audio.long()}
            if "times" in data.decoded_shapes(cfg, b):
                out["times"] = batch.times
            out = {k: v.to(self.device, non_blocking=True) for k, v in out.items()}
            counts += torch.tensor([len(batch.skipped), batch.attempts], dtype=torch.float64,
                                   device=self.device)
            for path, reason in batch.skipped:
                if path not in self.skipped_files:
                    self.skipped_files.add(path)
                    log.warning("skipped %s: %s", path, reason)
        else:
            out = {k: torch.empty(shape, dtype=dtype, device=self.device)
                   for k, (shape, dtype) in data.decoded_shapes(cfg, b).items()}
        if self.cfg.parallel.tp > 1:
            src = parallel_state.get_tensor_model_parallel_src_rank()
            for tensor in (*out.values(), counts):
                dist.broadcast(tensor, src, group=self.tp_group)
        self.data_counts += counts
        out["has_audio"] = out["has_audio"].bool() if "has_audio" in out else None
        out["video"] = data.normalized(self.cfg, out["video"])  # broadcast as uint8
        return out

    def take_data_counts(self) -> torch.Tensor:
        """This step's (skipped, attempts) on the device, and a fresh count for the next."""
        counts, self.data_counts = self.data_counts, torch.zeros_like(self.data_counts)
        return counts

    def _noise(self, step: int, indices: list[int]) -> Normal:
        """The samples' noise for synthetic clips, drawn on this rank's device."""
        return functools.partial(normal, sample_keys(self.cfg.train.seed, step, indices, "video",
                                                     self.device))

    def _drop_u(self, step: int, indices: list[int]) -> torch.Tensor:
        layers = self.cfg.model.student.num_layers
        seed = self.cfg.train.seed
        return torch.stack([torch.rand(layers, 2, generator=generator(seed, step, i, "drop_path"))
                            for i in indices]).to(self.device)
