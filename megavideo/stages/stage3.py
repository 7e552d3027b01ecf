"""Stage 3: the LLM learns to talk about video (next-token prediction on instruction data).

The LLM decoder is pipelined (``parallel.pp``/``vpp``, its own layer split) and tensor-parallel
over ``parallel.tp`` with optional SP. The video encoder and the QFormer sit on the first pipeline
stage, whole (not pipelined), tensor-parallel over ``parallel.encoder_tp`` ranks
(:mod:`parallel.encoder_groups`): the first stage already holds the LLM's embedding only, so the
encoder balances the last stage's output layer and loss, and its tokens never cross a pipeline
link (only the LLM's hidden states do).

Each stage builds what it needs of a micro-batch itself: the first the clips and the prompts'
ids, the last the targets and the loss mask, from per-sample generators (synthetic colour clips
with three kinds of question) or from manifest rows with question-answer pairs (the first stage
decodes and sends the rows to the last). In instruction tuning the steps a
:class:`~dataloaders.mixture.Mixture` picks train on images (1-frame clips, ``<Image>`` in the
template) or on text alone (no media turn, the video encoder idle), as VideoChat2 mixes its
instruction sets. The sub-stages (``model.substage``, VideoChat2's):
``instruct`` trains on those conversations; ``caption`` on each clip's caption after a prompt
drawn from ``data.caption_prompts``, the LLM frozen; ``align`` has no LLM
(:mod:`megavideo.stages.align`). With ``model.qformer.text_input`` the QFormer reads each
sample's instruction with its queries.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from dataloaders import conversation
from dataloaders.mixture import IMAGE, TEXT, VIDEO
from dataloaders.synthetic import (
    generator,
    global_indices,
    pattern_caption,
    pattern_of,
    pattern_video,
)
from dataloaders.tokenizer import QFormerText
from megavideo.config import Config
from megavideo.models.llm import llm_config
from megavideo.models.lora import is_lora
from megavideo.models.specs import transformer_config
from megavideo.models.stage3 import Stage3Batch, Stage3Model
from megavideo.models.video import Tokens
from megavideo.stages.common import PipelineStage
from megavideo.training import data
from parallel.comm import recv_from_stage, send_to_stage
from parallel.encoder_groups import encoder_groups
from parallel.layout import split_layers


class Stage3(PipelineStage):
    """This rank's stage-3 chunks and its step inputs."""

    TERMS = ("lm",)
    PER_TOKEN = True

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        par, model = cfg.parallel, cfg.model
        self.tokenizer = conversation.ChatTokenizer(model.llm.tokenizer)
        self.captioning = model.substage == "caption"
        self.prompts = conversation.read_caption_prompts(cfg.data.caption_prompts) \
            if self.captioning else []
        self.qformer_text = QFormerText(model.qformer.vocab_file) if model.qformer.text_input \
            else None
        self.groups = encoder_groups(par.encoder_tp_size)
        self._text_orders: dict[int, list[int]] = {}  # the text rows' order of the current pass
        video_par = replace(par, tp=par.encoder_tp_size, pp=1, vpp=1, pipeline_layout=[])
        video_config = transformer_config(model.student, video_par, cfg.train, pipelined=False,
                                          sequence_parallel=par.sp)
        qformer_config = transformer_config(model.qformer, video_par, cfg.train, pipelined=False,
                                            sequence_parallel=False)
        qformer_config.hidden_dropout = qformer_config.attention_dropout = model.qformer.dropout
        vocab = len(self.qformer_text) if self.qformer_text else 0
        image_tokens = Tokens.whole(self.image_cfg.model, par.encoder_tp_size, par.sp,
                                    cfg.train.precision == "fp8") if cfg.uses_images else None
        self.models = [Stage3Model(model, self.config, chunk, video_config, qformer_config,
                                   self.tokens, self.groups, vocab, image_tokens).to(device)
                       for chunk in self.layout[self.pp_rank]]
        self._freeze()
        for m in self.models:
            for part in m.encoder_parts():
                self.groups.adopt(part)

    def pipelined(self):
        """The LLM's layer split and config; the video encoder's whole token sequence (no
        masking in stage 3) at its own TP degree."""
        par, model = self.cfg.parallel, self.cfg.model
        counts = split_layers(model.llm.num_layers, par.pp, par.vpp, par.pipeline_layout)
        config = llm_config(model.llm, par, self.cfg.train)
        config.calculate_per_token_loss = True
        return counts, Tokens.whole(model, par.encoder_tp_size, par.sp,
                                             self.cfg.train.precision == "fp8"), config

    @property
    def seq_length(self) -> int:
        return self.cfg.model.llm.max_length

    @property
    def loss_weights(self) -> dict[str, float]:
        return {"lm": 1.0}

    def finish_grads(self) -> None:
        self.groups.finish_grads()

    def _freeze(self) -> None:
        """model.video_frozen, model.qformer.frozen, model.llm.tuning (lora: adapters only)."""
        model = self.cfg.model
        for m in self.models:
            for name, param in m.named_parameters():
                part = name.split(".")[0]
                if part == "video":
                    param.requires_grad = not model.video_frozen
                elif part == "qformer":
                    param.requires_grad = not model.qformer.frozen
                elif model.llm.tuning != "full":
                    param.requires_grad = model.llm.tuning == "lora" and is_lora(name)

    def _texts(self, step: int, indices: list[int], rows: list[int] | None,
               medium: str = VIDEO) -> list:
        """Each sample's text: its question-answer pairs (of the clip's, image's or text row),
        or (caption sub-stage) its prompt and caption."""
        seed = self.cfg.train.seed
        if self.captioning:
            def prompt(i: int) -> str:
                g = generator(seed, step, i, "prompt")
                return self.prompts[int(torch.randint(len(self.prompts), (1,), generator=g))]

            if rows is None:
                return [(prompt(i), pattern_caption(pattern_of(seed, i))) for i in indices]
            return [(prompt(i), data.caption(self.manifest, row, self.cfg.data.captions,
                                             generator(seed, step, i, "caption")))
                    for row, i in zip(rows, indices, strict=True)]
        if rows is None:
            return [conversation.synthetic_qa(seed, step, i, pattern_of(seed, i)) for i in indices]
        if medium == TEXT:
            texts = [self.text_rows[row] for row in rows]
        else:
            manifest = self.image_manifest if medium == IMAGE else self.manifest
            texts = [manifest.texts(row) for row in rows]
        return [conversation.manifest_qa(text, generator(seed, step, i, "qa"))
                for text, i in zip(texts, indices, strict=True)]

    def _text_rows(self, step: int, indices: list[int]) -> list[int]:
        """The text-only rows of a text step's samples: its place among the text steps, each
        pass over the rows in its own order."""
        train, n = self.cfg.train, len(self.text_rows)
        base = (self.mixture.ordinal(step) - step) * train.global_batch
        rows = []
        for position in (base + i for i in indices):
            epoch, at = divmod(position, n)
            if epoch not in self._text_orders:  # one pass's order, drawn once
                g = generator(train.seed, epoch, 0, "text order")
                self._text_orders = {epoch: torch.randperm(n, generator=g).tolist()}
            rows.append(self._text_orders[epoch][at])
        return rows

    def _source(self, step: int, indices: list[int]) -> dict:
        """Clips or images (first stage) and question-answer pairs (first and last) of a
        micro-batch of the step's medium."""
        first = any(m.pre_process for m in self.models)
        student, seed = self.cfg.model.student, self.cfg.train.seed
        medium = self.mixture.medium(step)
        out: dict = {"medium": medium}
        rows = times = None
        if medium == TEXT:
            rows = self._text_rows(step, indices) if self.text_rows is not None else None
        elif self.cfg.data.source == "manifest":
            pp, image = self.cfg.parallel.pp, medium == IMAGE
            cfg = self.image_cfg if image else self.cfg
            sent = [k for k in ("rows", "times") if k in data.decoded_shapes(cfg, 1)]
            if self.from_files:
                decoded = self._decoded(len(indices), image)
                out["video"], rows, times = decoded["video"], decoded["rows"], decoded.get("times")
                if pp > 1:
                    send_to_stage([decoded[k] for k in sent], pp - 1, self.pp_group)
            elif self.last:
                shapes = data.decoded_shapes(cfg, len(indices))
                got = recv_from_stage([shapes[k] for k in sent], 0, self.pp_group, self.device)
                rows, times = got[0], got[1] if len(got) > 1 else None
            rows = rows.tolist() if rows is not None else None
            if times is not None and (first or self.last):  # one host copy per micro-batch
                out["messages"] = [conversation.time_message([int(f) for f in t[1:]], t[0])
                                   if t[0] > 0 else "" for t in times.tolist()]
        elif first:
            frames = 1 if medium == IMAGE else student.num_frames
            out["video"] = pattern_video(self._noise(step, indices),
                                         [pattern_of(seed, i) for i in indices],
                                         frames, student.image_size)
        if first or self.last:
            out["texts"] = self._texts(step, indices, rows, medium)
        return out

    def _prompts(self, texts: list, messages: list[str] | None,
                 medium: str = VIDEO) -> list[conversation.Prompt]:
        model = self.cfg.model
        queries, length = model.qformer.queries, model.llm.max_length
        if self.captioning:
            return [conversation.tokenize_caption(self.tokenizer, prompt, caption, queries,
                                                  length, self.cfg.data.caption_tokens)
                    for prompt, caption in texts]
        messages = messages or [""] * len(texts)
        return [conversation.tokenize(self.tokenizer,
                                      conversation.render(turns, medium, msg)[0], queries,
                                      length, medium)
                for turns, msg in zip(texts, messages, strict=True)]

    def instructions(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The QFormer's instruction ids and mask [b, L] on the device (text_input)."""
        ids, mask = self.qformer_text.instructions(texts, self.cfg.model.qformer.max_text_length)
        return ids.to(self.device), mask.to(self.device)

    def make_batch(self, model: Stage3Model, video: torch.Tensor | None, texts: list,
                   messages: list[str] | None = None, medium: str = VIDEO) -> Stage3Batch:
        """A chunk's micro-batch of conversations, each sample's pairs as its turns after its
        video's ``messages`` (data.time_message) or its image, or alone (``medium`` text), or
        its caption after its prompt."""
        length = self.cfg.model.llm.max_length
        batch = Stage3Batch(attention_mask=conversation.causal_mask(length, self.device),
                            image=medium == IMAGE, text_only=medium == TEXT)
        if not (model.pre_process or model.post_process):
            return batch
        tensors = {k: v.to(self.device) for k, v in
                   conversation.batch(self._prompts(texts, messages, medium)).items()}
        if model.pre_process:
            batch.video, batch.ids = video, tensors["ids"]
            batch.video_mask = tensors["video_mask"]
            if self.qformer_text is not None and medium != TEXT:
                batch.instruction, batch.instruction_mask = self.instructions(
                    [conversation.render(turns)[1] for turns in texts])
        if model.post_process:
            batch.labels, batch.loss_mask = tensors["labels"], tensors["loss_mask"]
        return batch

    def micro_batches(self, step: int) -> list[list[Stage3Batch]]:
        """Per model chunk of this rank, the step's micro-batches."""
        train = self.cfg.train
        per_chunk: list[list[Stage3Batch]] = [[] for _ in self.models]
        self.data_wait = 0.0
        for m in range(self.num_microbatches):
            indices = global_indices(step, train.global_batch, self.dp_rank, self.dp, m,
                                     train.micro_batch)
            source = self._source(step, indices)
            for c, model in enumerate(self.models):
                per_chunk[c].append(self.make_batch(model, source.get("video"),
                                                    source.get("texts", []),
                                                    source.get("messages"), source["medium"]))
        return per_chunk


__all__ = ["Stage3"]
