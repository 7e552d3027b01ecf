"""Stage 3's first sub-stage: the QFormer aligned to the video encoder, no LLM yet.

VideoChat2's stage 1 (``models/videochat2_qformer.py``), BLIP-2's three objectives on one
QFormer that reads both the clip and its caption:

    video [b, 3, T, H, W] -> ViT (all but its last layer; frozen) -> tokens [n, b, C] (memory)
    queries alone, cross-attending to the memory -> [Q, b, H] -> vision_proj -> v [b, Q, E]
    caption [CLS] ... [SEP] -> BERT alone -> [CLS] -> text_proj -> t [b, E]
    VTC   InfoNCE over sim(v, t) = the queries' mean (or max) of v_q . t / temperature
    VTM   [queries ; caption] seeing each other -> cat(mean of the queries, the text's [CLS])
          -> itm_head, positives and hard negatives 1:2 from the whole data-parallel micro-batch
    CAP   [queries ; [DEC] caption] with queries seeing only queries and the text causal ->
          the QFormer's LM head (tied to its word embeddings) on the next token, label smoothed

The parameters keep stage 3's names (``video.``, ``qformer.``), so the next sub-stage starts
from this one's checkpoint. Negatives are drawn on the device from per-sample keys and the
contrast and the captioning normalise over the whole data-parallel micro-batch, so any layout
computes the loss one process would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule
from torch import nn

from megavideo.config import Stage3ModelConfig
from megavideo.models.init import normal_linear
from megavideo.models.objectives import (
    TEMPERATURE_RANGE,
    hard_negatives,
    info_nce,
    matching_loss,
    query_similarities,
)
from megavideo.models.qformer import QFormer, joint_mask
from megavideo.models.specs import ViTTransformerConfig
from megavideo.models.text import MLMHead
from megavideo.models.video import Tokens, VideoChunk
from parallel.comm import all_gather_rows, group_size
from parallel.layout import Chunk

TERMS = ("vtc", "vtm", "cap")


@dataclass
class AlignBatch:
    """One micro-batch (batch-first)."""

    video: torch.Tensor  # [b, 3, T, H, W]
    text_ids: torch.Tensor  # [b, L] [CLS] caption [SEP], right-padded
    text_mask: torch.Tensor  # [b, L] True on real tokens
    item: torch.Tensor  # [b] item ids: samples of one item are positives
    keys: dict[str, torch.Tensor]  # purpose -> [b] the samples' random streams


class QFormerAlignment(MegatronModule):
    """The align sub-stage's whole model on every rank of a TP group (see the module
    docstring); ``dec`` is the [DEC] token's id in the QFormer's vocabulary."""

    def __init__(self, model: Stage3ModelConfig, video_config: ViTTransformerConfig,
                 qformer_config: ViTTransformerConfig, tokens: Tokens, tp_group, dp_group,
                 vocab_size: int, dec: int, pad: int) -> None:
        super().__init__(config=qformer_config)
        self.pre_process = self.post_process = True
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        self.model_config, self.dp_group = model, dp_group
        self.dec, self.pad = dec, pad
        student, q, align = model.student, model.qformer, model.align
        whole = Chunk(0, 0, 0, student.num_layers - 1, True, False)  # the penultimate layer's
        self.video = VideoChunk(model, video_config, whole, tokens, tp_group)
        self.qformer = QFormer(q, qformer_config, student.hidden_size, vocab_size=vocab_size)
        self.weights = {name: getattr(align, name) for name in TERMS if getattr(align, name)}
        self.temperature = nn.Parameter(torch.tensor(align.temperature))
        self.temperature.no_weight_decay = True
        self.vision_proj, self.text_proj = (
            ColumnParallelLinear(q.hidden_size, align.embed_dim, config=qformer_config,
                                 init_method=qformer_config.init_method, bias=True,
                                 gather_output=True, tp_group=tp_group) for _ in range(2))
        self.itm_head = normal_linear(2 * q.hidden_size, 2, qformer_config.params_dtype)
        self.cap_head = MLMHead(q, qformer_config, self.qformer, tp_group)

    def set_input_tensor(self, input_tensor) -> None:
        """One pipeline stage: nothing comes in."""

    def memory(self, video: torch.Tensor) -> torch.Tensor:
        """The clips' tokens [n, b, C] after the QFormer's video LayerNorm."""
        visible = torch.arange(self.video.tokens.real, device=video.device).expand(
            video.shape[0], -1)
        frozen = not any(p.requires_grad for p in self.video.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            hidden, _ = self.video.encode(video, visible, None)
        return self.qformer.video_norm(self.video.full_sequence(hidden))

    def _joint(self, ids: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor,
               causal: bool) -> torch.Tensor:
        """[queries ; text] through the QFormer: [Q + L, b, H]."""
        q = self.qformer.num_queries
        return self.qformer.run(self.qformer.embed(ids.shape[0], ids),
                                joint_mask(q, mask, causal), memory, q)

    def forward(self, batch: AlignBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        memory = self.memory(batch.video)
        b, q = batch.video.shape[0], self.qformer.num_queries
        empty = batch.text_mask[:, :0]
        queries = self.qformer.run(self.qformer.embed(b), joint_mask(q, empty), memory, q)
        v = F.normalize(self.vision_proj(queries)[0].float(), dim=-1).transpose(0, 1)  # [b, Q, E]
        text = self.qformer.text(batch.text_ids, batch.text_mask)  # [L, b, H]
        t = F.normalize(self.text_proj(text[0])[0].float(), dim=-1)  # [b, E]
        temperature = self.temperature.clamp(*TEMPERATURE_RANGE)
        item_all = all_gather_rows(batch.item, self.dp_group)
        v2t, t2v = query_similarities(v, t, self.dp_group, self.model_config.align.similarity)
        v2t, t2v = v2t / temperature, t2v / temperature
        terms = {}
        if "vtc" in self.weights:
            terms["vtc"] = info_nce(v2t, t2v, batch.item, item_all)
        if "vtm" in self.weights:
            terms["vtm"] = self._matching(batch, memory, v2t, t2v, item_all)
        if "cap" in self.weights:
            terms["cap"] = self._captioning(batch, memory)
        loss = sum(self.weights[name] * value for name, value in terms.items())
        return loss, {k: v.detach() for k, v in terms.items()}

    def _matching(self, batch: AlignBatch, memory: torch.Tensor, v2t: torch.Tensor,
                  t2v: torch.Tensor, item_all: torch.Tensor) -> torch.Tensor:
        """VTM with hard negatives drawn by similarity from the whole data-parallel batch."""
        with torch.no_grad():
            video_negatives = hard_negatives(t2v, batch.item, item_all, batch.keys["vtm_video"])
            text_negatives = hard_negatives(v2t, batch.item, item_all, batch.keys["vtm_text"])
        q = self.qformer.num_queries

        def score(ids, mask, memories, _memories_mask) -> torch.Tensor:
            out = self._joint(ids.transpose(0, 1), mask, memories, causal=False)
            return self.itm_head(torch.cat([out[:q].mean(0), out[q]], dim=-1))

        memory_mask = batch.text_mask.new_ones(memory.shape[1], memory.shape[0])
        return matching_loss(score, batch.text_ids.transpose(0, 1), batch.text_mask, memory,
                             memory_mask, video_negatives, text_negatives, self.dp_group)

    def _captioning(self, batch: AlignBatch, memory: torch.Tensor) -> torch.Tensor:
        """The caption predicted token by token after [DEC] (which replaces [CLS]) from the
        queries: label-smoothed cross entropy, the mean over the batch's caption tokens."""
        ids = batch.text_ids.clone()
        ids[:, 0] = self.dec
        out = self._joint(ids, batch.text_mask, memory, causal=True)[self.qformer.num_queries:]
        labels = ids.masked_fill(ids == self.pad, -100)
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        count = (labels != -100).sum().float()
        if group_size(self.dp_group) > 1:
            dist.all_reduce(count, group=self.dp_group)
        normalizer = (count / group_size(self.dp_group)).clamp(min=1.0)
        return self.cap_head.loss(out, labels, normalizer, self.model_config.align.label_smoothing)
