"""Stage 2: the stage-1 video encoder aligned with text (and audio): VTC, VTM, MLM and the
audio-video variants.

The video encoder keeps stage 1's pipeline layout; the text and audio encoders and the heads live
on the last pipeline stage, tensor-parallel over its TP group, and need no pipeline of their own.
Every stage builds its micro-batches itself: the first stage the clips and their visible tokens
(80% of each frame's patches dropped at random), the last stage the captions, the audio
filterbanks and the draws of the objectives, all from per-sample random streams. With image-text
data, the steps a :class:`~dataloaders.mixture.Mixture` picks train on images instead: 1-frame
clips of the image manifest (50% of their patches dropped), their own token sequence, no audio.
"""

from __future__ import annotations

import torch

from dataloaders.audio import beats_fbank, fit_frames
from dataloaders.synthetic import (
    generator,
    global_indices,
    pattern_caption,
    pattern_of,
    pattern_tone,
    pattern_video,
    sample_keys,
)
from dataloaders.tokenizer import WordPiece, clean_caption
from kernels.keyed_random import uniform
from megavideo.config import Config, Stage2ModelConfig
from megavideo.models.audio import deep_norm_alpha
from megavideo.models.embedding import Tokens, num_visible
from megavideo.models.specs import transformer_config
from megavideo.models.stage2 import TERMS, Stage2Batch, Stage2Model
from megavideo.models.text import BERT_DROPOUT
from megavideo.stages.common import PipelineStage
from megavideo.training import data
from parallel.comm import recv_from_stage, send_to_stage

PURPOSES = ("mlm", "avmlm", "vtm_video", "vtm_text", "avtm_video", "avtm_text")


def random_visible(keys: torch.Tensor, frames: int, per_frame: int, keep: int) -> torch.Tensor:
    """[B, 1 + frames * keep] sorted token indices: the CLS token and ``keep`` patches per frame
    drawn uniformly without replacement from the samples' streams ``keys`` [B], on their device."""
    picked = uniform(keys, (frames, per_frame)).topk(keep, dim=-1).indices  # [B, frames, keep]
    offsets = 1 + torch.arange(frames, device=keys.device)[:, None] * per_frame
    tokens = (offsets + picked).flatten(1).sort(dim=1).values
    return torch.cat([tokens.new_zeros(keys.shape[0], 1), tokens], dim=1)


class Stage2(PipelineStage):
    """This rank's stage-2 chunks and its step inputs."""

    TERMS = TERMS

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        par, model = cfg.parallel, cfg.model
        self.tokenizer = WordPiece.from_file(model.text.vocab_file)
        text_config = transformer_config(model.text, par, cfg.train, pipelined=False,
                                         sequence_parallel=False)
        if model.official_recipe:
            text_config.hidden_dropout = text_config.attention_dropout = BERT_DROPOUT
        audio_config = None
        if model.audio.enabled:
            audio_config = transformer_config(model.audio, par, cfg.train, pipelined=False,
                                              sequence_parallel=False)
            if model.audio.deep_norm:
                audio_config.residual_scale = deep_norm_alpha(model.audio.num_layers)
        special = {"pad": self.tokenizer.pad, "cls": self.tokenizer.cls,
                   "mask": self.tokenizer.mask}
        # image steps: 1-frame clips at their own mask ratio (their own token sequence)
        self.image_tokens = Tokens.of(self.image_cfg.model, par.tp, par.sp,
                                      cfg.train.precision == "fp8") if cfg.uses_images else None
        self.models = [Stage2Model(model, self.config, chunk, self.tokens, self.tp_group,
                                   self.dp_group, text_config, audio_config, len(self.tokenizer),
                                   special, self.image_tokens).to(device)
                       for chunk in self.layout[self.pp_rank]]

    def seq_length_at(self, step: int) -> int:
        return self.image_tokens.length if self.mixture.is_image(step) else self.seq_length

    @property
    def loss_weights(self) -> dict[str, float]:
        """The term weights; the audio-video terms weigh 0 without the audio encoder."""
        obj, audio = self.cfg.model.objectives, self.cfg.model.audio.enabled
        return {name: getattr(obj, name) if audio or not name.startswith("av") else 0.0
                for name in TERMS}

    def _model_of(self, image: bool) -> Stage2ModelConfig:
        """The model section a step's inputs follow (an image step's: 1 frame, no audio)."""
        return self.image_cfg.model if image else self.cfg.model

    def _visible(self, step: int, indices: list[int], image: bool = False) -> torch.Tensor:
        model, seed = self._model_of(image), self.cfg.train.seed
        student = model.student
        keep = num_visible(student.patches_per_frame, model.mask_ratio)
        return random_visible(sample_keys(seed, step, indices, "mask", self.device),
                              student.num_frames, student.patches_per_frame, keep)

    def _synthetic(self, step: int, indices: list[int], patterns: list[int], first: bool,
                   last: bool, image: bool = False) -> dict:
        """A micro-batch of synthetic captioned clips (``image``: their first frames): what the
        first and the last chunk need."""
        model = self._model_of(image)
        student, audio = model.student, model.audio
        out: dict = {"captions": [pattern_caption(p) for p in patterns], "item": patterns}
        if first:
            out["video"] = pattern_video(self._noise(step, indices), patterns,
                                         student.num_frames, student.image_size)
        if last and audio.enabled:
            waves = [pattern_tone(p, audio.seconds) for p in patterns]
            out["fbank"] = torch.stack([
                fit_frames(beats_fbank(w, audio.mel_bins), audio.frames) if w is not None
                else torch.zeros(audio.frames, audio.mel_bins) for w in waves]).to(self.device)
            out["has_audio"] = torch.tensor([w is not None for w in waves], device=self.device)
        return out

    def _from_files(self, step: int, indices: list[int], image: bool = False) -> dict:
        """A micro-batch of decoded clips (first stage; ``image``: images of the image manifest),
        their manifest rows, captions and audio; the first stage sends the rows and audio on to
        the last."""
        pp = self.cfg.parallel.pp
        audio = self._model_of(image).audio.enabled
        out: dict = {}
        if self.from_files:
            out = self._decoded(len(indices), image)
            if pp > 1:
                sent = [out["rows"]] + ([out["has_audio"].long(), out["fbank"]] if audio else [])
                send_to_stage(sent, pp - 1, self.pp_group)
        elif self.last:
            shapes = data.decoded_shapes(self.image_cfg if image else self.cfg, len(indices))
            wanted = ["rows"] + (["has_audio", "fbank"] if audio else [])
            got = recv_from_stage([shapes[k] for k in wanted], 0, self.pp_group, self.device)
            out = dict(zip(wanted, got, strict=True))
            if audio:
                out["has_audio"] = out["has_audio"].bool()
        if self.last:
            rows = out["rows"].tolist()
            seed = self.cfg.train.seed
            manifest = self.image_manifest if image else self.manifest
            out["captions"] = [data.caption(manifest, row, self.cfg.data.captions,
                                            generator(seed, step, i, "caption"))
                               for row, i in zip(rows, indices, strict=True)]
            out["item"] = rows
        return out

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ids and mask [B, max_length] on the device, as the text encoder reads them
        (cleaned first with model.text.clean_captions, [SEP] with model.text.sep)."""
        text = self.cfg.model.text
        if text.clean_captions:
            captions = [clean_caption(c) for c in captions]
        ids, mask = self.tokenizer.encode_batch(captions, text.max_length, text.sep)
        return ids.to(self.device), mask.to(self.device)

    def _batch(self, model, step: int, indices: list[int], source: dict, drop_u: torch.Tensor,
               evaluate: bool = False, image: bool = False) -> Stage2Batch:
        batch = Stage2Batch(drop_u=drop_u, loss_scale=1.0 / self.num_microbatches,
                            evaluate=evaluate, image=image)
        if model.pre_process:
            batch.video, batch.visible = source["video"], self._visible(step, indices, image)
        if model.post_process:
            seed = self.cfg.train.seed
            batch.text_ids, batch.text_mask = self.tokenize(source["captions"])
            batch.item = torch.tensor(source["item"], device=self.device)
            batch.keys = {purpose: sample_keys(seed, step, indices, purpose, self.device)
                          for purpose in PURPOSES}
            batch.fbank, batch.has_audio = source.get("fbank"), source.get("has_audio")
        return batch

    def micro_batches(self, step: int) -> list[list[Stage2Batch]]:
        """Per model chunk of this rank, the step's micro-batches (of images on the mixture's
        image steps)."""
        train, seed = self.cfg.train, self.cfg.train.seed
        image = self.mixture.is_image(step)
        first = any(model.pre_process for model in self.models)
        per_chunk: list[list[Stage2Batch]] = [[] for _ in self.models]
        self.data_wait = 0.0
        for m in range(self.num_microbatches):
            indices = global_indices(step, train.global_batch, self.dp_rank, self.dp, m,
                                     train.micro_batch)
            if self.cfg.data.source == "manifest":
                source = self._from_files(step, indices, image)
            else:
                source = self._synthetic(step, indices, [pattern_of(seed, i) for i in indices],
                                         first, self.last, image)
            drop_u = self._drop_u(step, indices)
            for c, model in enumerate(self.models):
                per_chunk[c].append(self._batch(model, step, indices, source, drop_u,
                                                image=image))
        return per_chunk

    def _eval_source(self, items: list[int]) -> dict:
        """Held-out clips: synthetic patterns (noise of step -1, never trained on) or manifest
        rows (middle frames, centre crop; the first caption of data.captions)."""
        if self.manifest is None:
            return self._synthetic(-1, items, items, True, True)
        batch = data.clips(self.cfg, self.manifest, train=False).load_rows(items)
        out = {"video": data.normalized(self.cfg, batch.video.to(self.device)), "item": items,
               "captions": [self.manifest.captions(row, self.cfg.data.captions)[0]
                            for row in items]}
        if batch.fbank is not None:
            out["fbank"], out["has_audio"] = batch.fbank.to(self.device), batch.has_audio.to(self.device)
        return out

    def eval_micro_batches(self, items: list[int], size: int) -> list[list[Stage2Batch]]:
        """Per model chunk, micro-batches of ``size`` held-out clips with their captions: one
        per synthetic pattern in ``items``, or the manifest rows ``items``."""
        per_chunk: list[list[Stage2Batch]] = [[] for _ in self.models]
        for start in range(0, len(items), size):
            chosen = items[start:start + size]
            drop_u = torch.zeros(len(chosen), self.cfg.model.student.num_layers, 2)
            source = self._eval_source(chosen)
            for c, model in enumerate(self.models):
                per_chunk[c].append(self._batch(model, -1, chosen, source, drop_u.to(self.device),
                                                evaluate=True))
        return per_chunk


__all__ = ["Stage2", "random_visible"]
