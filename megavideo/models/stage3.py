"""Stage 3: next-token prediction on instruction data, the video in the prompt.

    first chunk   video [b, 3, T, H, W] -> ViT (all but its last layer) -> QFormer -> [Q, b, H_llm]
                  (the video encoder group's share of the micro-batch; the shares gathered)
                  prompt ids -> LLM word embeddings, the Q video positions replaced -> SP split
    every chunk   its LLM decoder layers (megatron-core GPTModel)
    last chunk    final norm, vocab-parallel logits, cross entropy summed over the answer tokens

The loss is a sum over answer tokens; the schedule adds up the token counts of the step and
megatron-core divides the gradients by the count over the data-parallel group
(``calculate_per_token_loss``), so every layout computes the mean over the step's answer tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megavideo.config import Stage3ModelConfig
from megavideo.models.llm import build_llm
from megavideo.models.qformer import QFormer
from megavideo.models.specs import ViTTransformerConfig
from megavideo.models.video import Tokens, VideoChunk
from parallel.comm import from_sequence_parallel, to_sequence_parallel
from parallel.encoder_groups import EncoderGroups
from parallel.layout import Chunk


@dataclass
class Stage3Batch:
    """One micro-batch; each chunk reads what it needs."""

    attention_mask: torch.Tensor  # [1, 1, S, S] True where masked
    video: torch.Tensor | None = None  # [b, 3, T, H, W] (first chunk)
    ids: torch.Tensor | None = None  # [b, S] prompt and answer (first chunk)
    video_mask: torch.Tensor | None = None  # [b, S] True on the video's query positions
    labels: torch.Tensor | None = None  # [b, S] the next token (last chunk)
    loss_mask: torch.Tensor | None = None  # [b, S] 1 where the next token is an answer token
    instruction: torch.Tensor | None = None  # [b, L] BERT ids read with the queries (text_input)
    instruction_mask: torch.Tensor | None = None  # [b, L] True on its real tokens
    queries: torch.Tensor | None = None  # [b, Q, H_llm] the video already encoded (generation)
    image: bool = False  # an image step: 1-frame clips, the image tokens
    text_only: bool = False  # a text-only step: no video, no queries in the prompt
    inference_context: object | None = None  # megatron-core's StaticInferenceContext (KV cache)


class Stage3Model(MegatronModule):
    """One pipeline chunk of the LLM; the first also holds the video encoder and the QFormer."""

    def __init__(self, model: Stage3ModelConfig, config: TransformerConfig, chunk: Chunk,
                 video_config: ViTTransformerConfig, qformer_config: ViTTransformerConfig,
                 tokens: Tokens, groups: EncoderGroups, qformer_vocab: int = 0,
                 image_tokens: Tokens | None = None) -> None:
        super().__init__(config=config)
        self.pre_process, self.post_process = chunk.is_first, chunk.is_last
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        self.groups = groups
        if self.pre_process:
            student = model.student
            # the penultimate layer's tokens: the last layer is not built
            whole = Chunk(0, 0, 0, student.num_layers - 1, True, False)
            # an image: its 1-frame tokens, the video table's mean over the frames (the
            # official img_pos_embed the released files carry is not read)
            self.video = VideoChunk(model, video_config, whole, tokens, groups.tp_group,
                                    groups.pg_collection, image_tokens, image_pos="mean")
            self.qformer = QFormer(model.qformer, qformer_config, student.hidden_size,
                                   model.llm.hidden_size, groups.pg_collection, qformer_vocab)
        vp_stage = chunk.vp_stage if config.virtual_pipeline_model_parallel_size else None
        self.llm = build_llm(model.llm, config, self.pre_process, self.post_process, vp_stage,
                             scatter_embedding=False, num_layers=chunk.num_layers)

    def encoder_parts(self) -> list[torch.nn.Module]:
        return [self.video, self.qformer] if self.pre_process else []

    def set_input_tensor(self, input_tensor) -> None:
        self.llm.set_input_tensor(input_tensor)

    def video_queries(self, video: torch.Tensor, instruction: torch.Tensor | None = None,
                      instruction_mask: torch.Tensor | None = None,
                      image: bool = False) -> torch.Tensor:
        """video [b, 3, T, H, W] (``image``: T = 1) -> [b, Q, H_llm]: this encoder group's
        share of the clips encoded (with their instructions [b, L], model.qformer.text_input),
        the shares gathered over the replica group."""
        g = self.groups
        share = video.shape[0] // g.replicas
        mine = slice(g.replica * share, (g.replica + 1) * share)
        tokens = self.video.tokens_of(image).real
        visible = torch.arange(tokens, device=video.device).expand(share, -1)
        frozen = not any(p.requires_grad for p in self.video.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            hidden, _ = self.video.encode(video[mine], visible, None, image=image)
        text = (None, None) if instruction is None else (instruction[mine], instruction_mask[mine])
        queries = self.qformer(self.video.full_sequence(hidden, image),
                               *text).transpose(0, 1).contiguous()
        return from_sequence_parallel(queries, g.replica_group, g.replicas > 1)

    def embed_prompt(self, ids: torch.Tensor, video_mask: torch.Tensor | None,
                     queries: torch.Tensor | None) -> torch.Tensor:
        """The decoder's input [S(/tp), b, H]: word embeddings with the video's queries at the
        video positions (none: words alone, a generated token)."""
        x = self.llm.embedding(input_ids=ids, position_ids=None)  # [S, b, H]
        if queries is not None:  # each sample's queries in order at its own video positions
            words, where = x.transpose(0, 1), video_mask[..., None]  # [b, S, H], [b, S, 1]
            placed = torch.zeros_like(words).masked_scatter(where, queries.to(words.dtype))
            x = torch.where(where, placed, words).transpose(0, 1)
        return to_sequence_parallel(x.contiguous(), self.groups.llm_tp_group,
                                    self.config.sequence_parallel)

    def _encoder_side(self, like: torch.Tensor) -> torch.Tensor:
        """The video encoder's and QFormer's trainable parameters, summed: added at weight 0
        on a text-only step, their gradients are zeros, as megatron-core's bucketed gradient
        reduce needs one of every parameter."""
        return sum((p.sum() for m in self.encoder_parts() for p in m.parameters()
                    if p.requires_grad), like.new_zeros(()))

    def forward(self, batch: Stage3Batch):
        """Returns (output, terms): the answer tokens' summed loss and ``{"lm": it, "tokens":
        their count}`` on the last chunk (without labels: this TP rank's vocabulary slice of the
        logits [b, S, V/tp], or with a KV cache the whole vocabulary's at the last position
        [b, 1, V], as megatron-core's inference gives them), the hidden state elsewhere."""
        decoder_input = None
        if self.pre_process:
            queries = batch.queries
            if queries is None and batch.video is not None:
                queries = self.video_queries(batch.video, batch.instruction,
                                             batch.instruction_mask, batch.image)
            decoder_input = self.embed_prompt(batch.ids, batch.video_mask, queries)
            if batch.text_only:
                decoder_input = decoder_input + 0.0 * self._encoder_side(decoder_input)
        out = self.llm(input_ids=None, position_ids=None, attention_mask=batch.attention_mask,
                       decoder_input=decoder_input,
                       labels=batch.labels if self.post_process else None,
                       inference_context=batch.inference_context,
                       runtime_gather_output=batch.inference_context is not None or None)
        if not self.post_process or batch.labels is None:
            return out, {}
        loss = (out.float() * batch.loss_mask).sum()
        return loss, {"lm": loss.detach(), "tokens": batch.loss_mask.sum().detach()}
