"""The stage-2 model: the video encoder aligned with a text encoder (and an audio encoder).

Every pipeline chunk is a chunk of the video encoder (same layout as stage 1); the last chunk
also holds the text and audio encoders, the projections and the heads, and computes the loss:

    video tokens [n, B, C] -> attention pool -> vision_proj -> v            (contrast)
                          -> (fusion_proj: Linear + LayerNorm) -> memory    (fusion layers)
    caption ids -> BERT text layers -> [CLS] -> text_proj -> t
    VTC   InfoNCE(v, t)                      VTM   matching head on fused [CLS], hard negatives
    MLM   masked caption -> text layers -> fusion layers over the memory -> vocab-parallel CE
    with audio: fbank -> BEATs -> mean -> audio_proj -> a;  av = av_fusion([a, v])
          audio tokens -> fusion_proj -> [video ; audio] memory (absent audio masked out)
    AVTC, AVTM, AVMLM   the same three with av and the audio-video memory
    image steps: 1-frame clips (their own mask ratio and position embedding), VTC, VTM, MLM

The loss is the weighted sum of the terms (``model.objectives``); all share one learnable
temperature (clamped to [0.001, 0.5]). ``model.official_recipe`` trains as the official code does
where it departs from the exact math: the contrast's gradient 1/W (W data-parallel ranks), a
fresh MLM mask per term averaged per rank, the temperature clamped in place, hard negatives from
each rank's own samples, and BERT's dropout (0.1, :data:`megavideo.models.text.BERT_DROPOUT`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from torch import nn

from kernels.norms import LayerNorm
from megavideo.config import Stage2ModelConfig
from megavideo.models.audio import AudioEncoder
from megavideo.models.init import normal_linear
from megavideo.models.objectives import (
    TEMPERATURE_RANGE,
    contrastive_loss,
    hard_negatives,
    matching_loss,
    mlm_inputs,
)
from megavideo.models.specs import ViTTransformerConfig, without_sequence_parallel
from megavideo.models.text import MLMHead, TextEncoder
from megavideo.models.video import Tokens, VideoChunk
from parallel.comm import all_gather_rows, group_size
from parallel.layout import Chunk

TERMS = ("vtc", "vtm", "mlm", "avtc", "avtm", "avmlm")


@dataclass
class Stage2Batch:
    """What one chunk needs for one micro-batch (batch-first tensors)."""

    drop_u: torch.Tensor  # [B, layers, 2] stochastic-depth draws
    loss_scale: float
    video: torch.Tensor | None = None  # [B, 3, T, H, W], first chunk
    visible: torch.Tensor | None = None  # [B, n] token indices, first chunk
    text_ids: torch.Tensor | None = None  # [B, L], last chunk
    text_mask: torch.Tensor | None = None  # [B, L] 1 on real tokens
    item: torch.Tensor | None = None  # [B] item ids: samples of one item are positives
    keys: dict[str, torch.Tensor] | None = None  # purpose -> [B] the samples' random streams
    fbank: torch.Tensor | None = None  # [B, frames, mel]
    has_audio: torch.Tensor | None = None  # [B] bool
    evaluate: bool = False  # return the clips' evaluation features (embeddings()), no loss
    image: bool = False  # an image step: 1-frame clips, the image tokens, no audio


def _projection(config, n_in: int, n_out: int, tp_group) -> ColumnParallelLinear:
    return ColumnParallelLinear(n_in, n_out, config=config, init_method=config.init_method,
                                bias=True, gather_output=True, tp_group=tp_group)


def _head(config, width: int) -> nn.Linear:
    return normal_linear(width, 2, config.params_dtype)


class FusionProjection(nn.Module):
    """Tokens to the fusion width: Linear + LayerNorm (the official ``av_concat_*_proj``)."""

    def __init__(self, config, n_in: int, n_out: int, tp_group) -> None:
        super().__init__()
        self.linear = _projection(config, n_in, n_out, tp_group)
        self.norm = LayerNorm(config, n_out, 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x)[0])


class Stage2Model(VideoChunk):
    """One pipeline chunk of the stage-2 model (see the module docstring)."""

    def __init__(self, model: Stage2ModelConfig, config: ViTTransformerConfig, chunk: Chunk, tokens: Tokens,
                 tp_group, dp_group, text_config: ViTTransformerConfig,
                 audio_config: ViTTransformerConfig | None, vocab_size: int,
                 special: dict[str, int], image_tokens: Tokens | None = None) -> None:
        super().__init__(model, config, chunk, tokens, tp_group, image_tokens=image_tokens,
                         image_pos=model.image_pos_embed)
        self.model_config = model
        self.dp_group = dp_group
        if not self.post_process:
            return
        obj, text, audio = model.objectives, model.text, model.audio
        self.weights = {name: getattr(obj, name) for name in TERMS
                        if getattr(obj, name) and (audio.enabled or not name.startswith("av"))}
        self.special = special
        heads = without_sequence_parallel(config)
        video_width = model.student.hidden_size
        fusion = obj.fusion_dim or video_width
        self.temperature = nn.Parameter(torch.tensor(obj.temperature),
                                        requires_grad=obj.learn_temperature)
        self.temperature.no_weight_decay = True
        self.vision_proj = _projection(heads, model.student.pool_dim, obj.embed_dim, tp_group)
        self.fusion_proj = FusionProjection(heads, video_width, fusion, tp_group) \
            if obj.fusion_dim else None
        self.text = TextEncoder(text, text_config, vocab_size, fusion, tp_group)
        self.text_proj = _projection(text_config, text.hidden_size, obj.embed_dim, tp_group)
        self.itm_head = _head(text_config, text.hidden_size)
        self.mlm_head = MLMHead(text, text_config, self.text, tp_group)
        if audio.enabled:
            self.audio = AudioEncoder(audio, audio_config, tp_group)
            if audio.frozen:
                self.audio.requires_grad_(False)
            self.audio_proj = _projection(audio_config, audio.hidden_size, obj.embed_dim, tp_group)
            self.audio_fusion_proj = FusionProjection(audio_config, audio.hidden_size, fusion,
                                                      tp_group)
            self.av_fusion = _projection(heads, 2 * obj.embed_dim, obj.embed_dim, tp_group)
            self.avtm_head = _head(text_config, text.hidden_size)

    def forward(self, batch: Stage2Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden, _ = self.encode(batch.video, batch.visible, batch.drop_u, image=batch.image)
        if not self.post_process:
            return hidden, {}
        tokens = self.full_sequence(hidden, batch.image)
        if batch.evaluate:
            return hidden.new_zeros(()), self.embeddings(tokens, batch)
        terms = self._losses(tokens, batch)
        loss = sum(self.weights[name] * value for name, value in terms.items())
        if batch.image and self.model_config.audio.enabled:
            loss = loss + 0.0 * self._audio_side()
        return loss, {k: v.detach() for k, v in terms.items()}

    def _audio_side(self) -> torch.Tensor:
        """The trainable parameters an image step does not use, summed: added at weight 0,
        their gradients are zeros, as megatron-core's bucketed gradient reduce needs one of
        every parameter."""
        modules = (self.audio, self.audio_proj, self.audio_fusion_proj, self.av_fusion,
                   self.avtm_head)
        return sum(p.sum() for m in modules for p in m.parameters() if p.requires_grad)

    def _encode(self, tokens: torch.Tensor, batch: Stage2Batch):
        """The clip's vector v [B, E], the caption's text-mode states [L, B, H] and its vector t
        [B, E] (before normalisation)."""
        v = self.vision_proj(self.pool(tokens))[0]
        text = self.text.encode(batch.text_ids, batch.text_mask)
        return v, text, self.text_proj(text[0])[0]

    def embeddings(self, tokens: torch.Tensor, batch: Stage2Batch) -> dict[str, torch.Tensor]:
        """What evaluation needs of a micro-batch of clips (batch-first): the L2-normalised
        contrastive vector ``video`` [B, E] and the fusion ``memory`` [B, n, W]; with audio the
        audio-video vector ``av`` [B, E] and memory ``av_memory`` [B, n + Na, W] with its mask
        ``av_mask`` [B, n + Na]."""
        v = self.vision_proj(self.pool(tokens))[0]
        memory = self.fusion_proj(tokens) if self.fusion_proj is not None else tokens
        out = {"video": F.normalize(v.float(), dim=-1), "memory": memory.transpose(0, 1)}
        if self.model_config.audio.enabled and batch.fbank is not None:
            memory_mask = batch.fbank.new_ones(tokens.shape[1], tokens.shape[0], dtype=torch.long)
            av, av_memory, av_mask = self._audio_video(batch, v, memory, memory_mask)
            out |= {"av": F.normalize(av.float(), dim=-1), "av_memory": av_memory.transpose(0, 1),
                    "av_mask": av_mask}
        return out

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Captions [B, L] -> the L2-normalised contrastive vector ``text`` [B, E] and the
        text-mode ``states`` [B, L, H] the fusion layers start from."""
        states = self.text.encode(ids, mask)
        t = self.text_proj(states[0])[0]
        return {"text": F.normalize(t.float(), dim=-1), "states": states.transpose(0, 1)}

    def match_logits(self, states: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor,
                     memory_mask: torch.Tensor, audio: bool = False) -> torch.Tensor:
        """The matching head's class-1 logit [k] of k (caption, clip) pairs: states [k, L, H],
        mask [k, L], memory [k, M, W], memory_mask [k, M]; ``audio``: the audio-video head."""
        head = self.avtm_head if audio else self.itm_head
        fused = self.text.fuse(states.transpose(0, 1).contiguous(), mask,
                               memory.transpose(0, 1).contiguous(), memory_mask)
        return head(fused[0])[:, 1]

    def _masked_text(self, batch: Stage2Batch, purpose: str):
        """BERT-masked caption ids (drawn from the samples' ``purpose`` streams) through the text
        layers: the states [L, B, H], the labels [B, L] and the loss normalizer."""
        obj = self.model_config.objectives
        ids, labels = mlm_inputs(batch.text_ids, self.special, self.text.vocab_size,
                                 obj.mlm_probability, batch.keys[purpose])
        return self.text.encode(ids, batch.text_mask), labels, self._mlm_normalizer(labels)

    def _mlm_normalizer(self, labels: torch.Tensor) -> torch.Tensor:
        """The labelled positions of the whole micro-batch / data-parallel ranks (official
        recipe: this rank's, the mean per rank)."""
        count = (labels != -100).sum().float()
        if self.model_config.official_recipe:
            return count.clamp(min=1.0)
        if group_size(self.dp_group) > 1:
            dist.all_reduce(count, group=self.dp_group)
        return (count / group_size(self.dp_group)).clamp(min=1.0)

    def _temperature(self) -> torch.Tensor:
        """The shared temperature in [0.001, 0.5]: clamped out of place (no gradient beyond the
        range), or, with the official recipe, in place before it is used (as the official
        ``clip_contrastive_temperature``)."""
        if not self.model_config.official_recipe:
            return self.temperature.clamp(*TEMPERATURE_RANGE)
        with torch.no_grad():
            self.temperature.clamp_(*TEMPERATURE_RANGE)
        return self.temperature

    def _losses(self, tokens: torch.Tensor, batch: Stage2Batch) -> dict[str, torch.Tensor]:
        """tokens [n, B, C]: the video encoder's whole output sequence."""
        official = self.model_config.official_recipe
        temperature = self._temperature()
        item_all = all_gather_rows(batch.item, self.dp_group)
        v, text, t = self._encode(tokens, batch)
        memory = self.fusion_proj(tokens) if self.fusion_proj is not None else tokens
        memory_mask = batch.text_mask.new_ones(tokens.shape[1], tokens.shape[0])
        masked = {}  # one masked pass shared by the MLM terms (official recipe: one per term)
        # (contrast, matching, MLM term names), the vector to contrast, the fusion memory, its mask
        pairs = [(("vtc", "vtm", "mlm"), v, memory, memory_mask, self.itm_head)]
        if self.model_config.audio.enabled and not batch.image:  # images have no sound
            av, av_memory, av_mask = self._audio_video(batch, v, memory, memory_mask)
            pairs.append((("avtc", "avtm", "avmlm"), av, av_memory, av_mask, self.avtm_head))
        terms = {}
        for (tc, tm, lm), vis, mem, mem_mask, head in pairs:
            if tc in self.weights:
                terms[tc] = contrastive_loss(vis, t, batch.item, item_all, temperature,
                                             self.dp_group, official)
            if tm in self.weights:
                terms[tm] = self._matching(tm, vis, t, text, mem, mem_mask, head, batch, item_all,
                                           temperature)
            if lm in self.weights:
                purpose = lm if official else "mlm"
                if purpose not in masked:
                    masked[purpose] = self._masked_text(batch, purpose)
                mlm_text, labels, normalizer = masked[purpose]
                fused = self.text.fuse(mlm_text, batch.text_mask, mem, mem_mask)
                terms[lm] = self.mlm_head.loss(fused, labels, normalizer)
        return terms

    def _matching(self, term: str, vis, t, text, memory, memory_mask, head, batch, item_all,
                  temperature) -> torch.Tensor:
        """VTM; its hard negatives drawn from the whole data-parallel micro-batch (official
        recipe: from this rank's samples)."""
        group = None if self.model_config.official_recipe else self.dp_group
        items = batch.item if group is None else item_all
        with torch.no_grad():
            v_n, t_n = F.normalize(vis.float(), dim=-1), F.normalize(t.float(), dim=-1)
            v_all, t_all = all_gather_rows(v_n, group), all_gather_rows(t_n, group)
            video_negatives = hard_negatives(t_n @ v_all.T / temperature, batch.item, items,
                                             batch.keys[f"{term}_video"])
            text_negatives = hard_negatives(v_n @ t_all.T / temperature, batch.item, items,
                                            batch.keys[f"{term}_text"])
        def score(*pairs) -> torch.Tensor:  # the head on the fused [CLS]
            return head(self.text.fuse(*pairs)[0])

        return matching_loss(score, text, batch.text_mask, memory, memory_mask, video_negatives,
                             text_negatives, group)

    def _audio_video(self, batch: Stage2Batch, v, memory, memory_mask):
        """The fused audio-video vector [B, E] and the [video ; audio] memory with its mask
        (absent audio last: the right padding TE's fused attention reads from sequence lengths)."""
        frozen = self.model_config.audio.frozen
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            audio = self.audio(batch.fbank)  # [Na, B, Ha]
        present = batch.has_audio.to(audio.dtype)  # [B]
        pooled = audio.mean(0) * present[:, None]  # a clip without audio: zeros
        a = self.audio_proj(pooled)[0]
        av = self.av_fusion(torch.cat([a, v], dim=-1))[0]
        audio_memory = self.audio_fusion_proj(audio)
        audio_mask = batch.has_audio[:, None].to(memory_mask.dtype).expand(-1, audio.shape[0])
        return (av, torch.cat([memory, audio_memory]),
                torch.cat([memory_mask, audio_mask], dim=1))
