"""Stage 1: the student distilled from the two frozen teachers on 80%-masked tokens.

Where the teachers run when pp > 1: on the first pipeline stage, before the step's schedule. The
CLIP teacher's attention decides which tokens are visible, and that is needed where the tokens are
dropped, right after the patch embedding, on the first stage. The first stage then computes every
micro-batch's targets once (tensor-parallel over its TP group) and sends each later stage only the
targets of the aligners it holds (and the visible-token indices their position embeddings need);
with the official layouts that is the last stage alone. Stages without aligners receive nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from dataloaders.synthetic import global_indices, sample_keys, synthetic_video
from megavideo.config import Config
from megavideo.models.specs import transformer_config
from megavideo.models.student import Stage1Batch, Stage1Student, aligned_layers
from megavideo.models.teachers import Stage1Teachers
from megavideo.stages.common import PipelineStage
from parallel.comm import recv_from_stage, send_to_stage
from parallel.encoder_groups import encoder_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Needs:
    """What one pipeline rank needs from the first stage for each micro-batch."""

    clip: tuple[int, ...]
    mae: tuple[int, ...]
    final: bool

    @property
    def any(self) -> bool:
        return bool(self.clip or self.mae or self.final)


class Stage1(PipelineStage):
    """This rank's student chunks (and, on the first stage, the teachers) and its step inputs."""

    TERMS = ("clip", "final", "mae")

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        par, model = cfg.parallel, cfg.model
        self.models = [Stage1Student(model, self.config, chunk, self.tokens, self.tp_group).to(device)
                       for chunk in self.layout[self.pp_rank]]
        self.teachers = None
        # the teachers' own TP groups (collective: every rank builds them) below parallel.tp
        groups = encoder_groups(par.teacher_tp_size) if par.teacher_tp_size < par.tp else None
        if self.pp_rank == 0:
            teacher_par = replace(par, tp=par.teacher_tp_size)
            teacher_cfg = {name: transformer_config(getattr(model, name), teacher_par, cfg.train,
                                                    pipelined=False, sequence_parallel=False,
                                                    fp8=cfg.train.fp8.teachers)
                           for name in ("clip_teacher", "mae_teacher")}
            self.teachers = Stage1Teachers(model, teacher_cfg["clip_teacher"],
                                           teacher_cfg["mae_teacher"], self.tp_group,
                                           groups).to(device)
            if groups is not None:
                groups.adopt(self.teachers)
        self.needs = [self._needs(r) for r in range(par.pp)]
        self.tied = self._tied()

    @property
    def loss_weights(self) -> dict[str, float]:
        return dict(zip(self.TERMS, self.cfg.model.loss_weights, strict=True))

    def _clips(self, step: int, indices: list[int]) -> torch.Tensor:
        """The micro-batch's clips [b, 3, frames, size, size] on this rank's device."""
        if not self.from_files:
            return synthetic_video(self._noise(step, indices), self.cfg.model.mae_teacher.num_frames,
                                   self.cfg.model.student.image_size)
        return self._decoded(len(indices))["video"]

    def _needs(self, pp_rank: int) -> Needs:
        clip, mae = aligned_layers(self.cfg.model)
        layers = {i for chunk in self.layout[pp_rank] for i in chunk.layers}
        return Needs(tuple(k for layer, k in clip.items() if layer in layers),
                     tuple(k for layer, k in mae.items() if layer in layers),
                     any(chunk.is_last for chunk in self.layout[pp_rank]))

    def _tied(self) -> dict[str, tuple[int, ...]]:
        """Aligner position embeddings held by more than one chunk, with their shapes."""
        student = self.cfg.model.student
        clip, mae = aligned_layers(self.cfg.model)
        chunks = [c for rank in self.layout for c in rank]
        tied = {}
        for name, layers, tokens in (("clip_pos_embed", clip, 1 + student.num_patches),
                                     ("mae_pos_embed", mae, student.num_patches)):
            holders = [c for c in chunks if any(layer in c.layers for layer in layers)]
            if len(holders) > 1:
                tied[name] = (tokens, student.hidden_size)
        return tied

    def _target_shapes(self, needs: Needs, b: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        model, n = self.cfg.model, self.tokens.real
        dtype = self.config.params_dtype
        shapes = [((b, n), torch.long)]
        shapes += [((b, n, model.clip_teacher.hidden_size), dtype)] * len(needs.clip)
        shapes += [((b, n - 1, model.mae_teacher.hidden_size), dtype)] * len(needs.mae)
        if needs.final:
            shapes.append(((b, model.clip_teacher.pool_dim), dtype))
        return shapes

    def _teacher_pass(self, step: int, indices: list[int]) -> dict:
        """First stage: clips, masks and all targets of one micro-batch, then the sends."""
        video = self._clips(step, indices)
        keys = sample_keys(self.cfg.train.seed, step, indices, "mask", self.device)
        targets = self.teachers(video, keys)
        for rank in range(1, self.cfg.parallel.pp):
            needs = self.needs[rank]
            if needs.any:
                tensors = [targets["visible"]] + [targets["clip"][k] for k in needs.clip]
                tensors += [targets["mae"][k] for k in needs.mae]
                if needs.final:
                    tensors.append(targets["final"])
                send_to_stage(tensors, rank, self.pp_group)
        return targets

    def _received(self, b: int) -> dict:
        needs = self.needs[self.pp_rank]
        if not needs.any:
            return {}
        tensors = recv_from_stage(self._target_shapes(needs, b), 0, self.pp_group, self.device)
        out = {"visible": tensors[0], "clip": {}, "mae": {}}
        rest = iter(tensors[1:])
        out["clip"] = {k: next(rest) for k in needs.clip}
        out["mae"] = {k: next(rest) for k in needs.mae}
        if needs.final:
            out["final"] = next(rest)
        return out

    def micro_batches(self, step: int) -> list[list[Stage1Batch]]:
        """Per model chunk of this rank, the step's micro-batches."""
        train = self.cfg.train
        per_chunk: list[list[Stage1Batch]] = [[] for _ in self.models]
        self.data_wait = 0.0
        for m in range(self.num_microbatches):
            indices = global_indices(step, train.global_batch, self.dp_rank, self.dp, m,
                                     train.micro_batch)
            if self.teachers is not None:
                t = self._teacher_pass(step, indices)
                targets = {"visible": t["visible"], "final": t["final"],
                           "clip": dict(enumerate(t["clip"])), "mae": dict(enumerate(t["mae"])),
                           "video": t["student_frames"]}
            else:
                targets = self._received(len(indices))
            drop_u = self._drop_u(step, indices)
            for c, model in enumerate(self.models):
                per_chunk[c].append(Stage1Batch(
                    drop_u=drop_u,
                    loss_scale=1.0 / self.num_microbatches,
                    video=targets.get("video") if model.pre_process else None,
                    visible=targets.get("visible"),
                    clip={k: v for k, v in targets.get("clip", {}).items()
                          if k in model.clip_at.values()},
                    mae={k: v for k, v in targets.get("mae", {}).items()
                         if k in model.mae_at.values()},
                    final=targets.get("final") if model.post_process else None,
                ))
        return per_chunk
