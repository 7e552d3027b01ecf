"""The stage-2 text encoder: BERT as megatron-core modules, its last layers fused with video.

    ids [B, L] -> word + position + token-type embeddings -> LayerNorm -> [L, B, H]
    text mode     layers [0, N - fusion_layers)          -> text features (CLS for the contrast)
    fusion mode   layers [N - fusion_layers, N), each cross-attending to video (or audio + video)
                  tokens                                  -> matching (CLS) and masked-LM heads

Word embeddings and the MLM decoder (tied to them) are split over the vocabulary across the TP
group; the vocabulary is padded to a multiple of :data:`megavideo.config.VOCAB_MULTIPLE` and the
padding logits are masked out of the softmax. No dropout by default, so that every layout computes
the same numbers; the official recipe (``model.official_recipe``) has BERT's, :data:`BERT_DROPOUT`
after the embeddings, on the attention probabilities and on each branch before its residual add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from torch import nn

from kernels.norms import LayerNorm
from megavideo.config import PostNormEncoderConfig, TextConfig, padded_vocab
from megavideo.models.encoders import EncoderLayers
from megavideo.models.init import init_normal, init_with, normal_linear
from megavideo.models.specs import ViTTransformerConfig
from parallel.comm import group_size

BERT_DROPOUT = 0.1  # bert-large-uncased's hidden_dropout_prob and attention_probs_dropout_prob


def padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] with 1 on real tokens -> megatron-core's [B, 1, 1, L], True where masked out."""
    return ~mask.bool()[:, None, None, :]


class TextEncoder(MegatronModule):
    """BERT with cross-attention in its last ``fusion_layers`` layers (see the module docstring)."""

    def __init__(self, text: TextConfig, config: ViTTransformerConfig, vocab_size: int,
                 cross_width: int, tp_group) -> None:
        super().__init__(config=config)
        self.vocab_size = vocab_size
        self.first_fusion = text.num_layers - text.fusion_layers
        h = text.hidden_size
        self.word_embeddings = VocabParallelEmbedding(padded_vocab(vocab_size), h,
                                                      init_method=config.init_method,
                                                      config=config, tp_group=tp_group)
        self.position_embeddings = nn.Embedding(text.max_positions, h, dtype=config.params_dtype)
        self.token_type_embeddings = nn.Embedding(text.type_vocab_size, h, dtype=config.params_dtype)
        for table in (self.position_embeddings, self.token_type_embeddings):
            init_with(table.weight, init_normal)
        self.embed_norm = LayerNorm(config, h, text.norm_eps)
        self.layers = EncoderLayers(text, config, range(self.first_fusion, text.num_layers),
                                    cross_width, padded=True, cross_padded=True)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] -> [L, B, H]."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings(torch.zeros_like(ids))
        x = self.embed_norm(x)
        if self.config.hidden_dropout:  # BERT's (the official recipe)
            x = F.dropout(x, self.config.hidden_dropout, self.training)
        return x.transpose(0, 1).contiguous()

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Text mode: [L, B, H] after the last layer without cross-attention."""
        return self.layers(self.embed(ids), padding_mask(mask), 0, self.first_fusion)

    def fuse(self, text: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor,
             memory_mask: torch.Tensor) -> torch.Tensor:
        """Fusion mode: text features [L, B, H] attend to memory tokens [M, B, W] (memory_mask
        [B, M], 1 where present)."""
        return self.layers(text, padding_mask(mask), self.first_fusion, None, memory,
                           padding_mask(memory_mask))


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense, GELU, LayerNorm, then the word embeddings as the decoder
    (vocab-parallel logits) plus a bias; ``encoder`` has ``word_embeddings`` and
    ``vocab_size`` (the text encoder, or the QFormer as its captioning decoder)."""

    def __init__(self, text: PostNormEncoderConfig, config: ViTTransformerConfig,
                 encoder: nn.Module, tp_group) -> None:
        super().__init__()
        h = text.hidden_size
        self.encoder = [encoder]  # not a submodule: the decoder weight is its word embeddings
        self.dense = normal_linear(h, h, config.params_dtype)
        self.norm = LayerNorm(config, h, text.norm_eps)
        self.decoder = ColumnParallelLinear(h, padded_vocab(encoder.vocab_size), config=config,
                                            init_method=config.init_method, bias=True,
                                            skip_weight_param_allocation=True, tp_group=tp_group)
        with torch.no_grad():
            self.decoder.bias.zero_()
        self.tp_group = tp_group

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [L, B, H] -> this rank's vocabulary slice of the fp32 logits [L, B, V/tp], the
        padding rows at -1e4."""
        x = self.norm(F.gelu(self.dense(hidden)))
        logits, _ = self.decoder(x, weight=self.encoder[0].word_embeddings.weight)
        return logits.float().masked_fill(~self._real(logits), -1e4)

    def _real(self, logits: torch.Tensor) -> torch.Tensor:
        """[V/tp] True on this rank's real (not padding) vocabulary entries."""
        local = logits.shape[-1]
        first = local * (torch.distributed.get_rank(self.tp_group)
                         if group_size(self.tp_group) > 1 else 0)
        vocab_ids = torch.arange(first, first + local, device=logits.device)
        return vocab_ids < self.encoder[0].vocab_size

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, normalizer: torch.Tensor,
             label_smoothing: float = 0.0) -> torch.Tensor:
        """Cross entropy summed over the labelled positions / ``normalizer``; hidden [L, B, H],
        labels [B, L] with -100 elsewhere. ``label_smoothing`` ε: torch's, over the real
        vocabulary: (1 - ε) CE + ε mean over the vocabulary of -log p."""
        target = labels.transpose(0, 1).contiguous()
        logits = self.logits(hidden)
        uniform = self._uniform_nll(logits) if label_smoothing else None
        # megatron-core's cross entropy works in place on the logits it is given
        losses = tensor_parallel.vocab_parallel_cross_entropy(
            logits.clone() if label_smoothing else logits, target.clamp(min=0))
        if uniform is not None:
            losses = (1.0 - label_smoothing) * losses + label_smoothing * uniform
        return (losses * (target != -100)).sum() / normalizer

    def _uniform_nll(self, logits: torch.Tensor) -> torch.Tensor:
        """-mean_v log p_v over the real vocabulary [L, B] of vocab-parallel logits."""
        top = logits.detach().amax(-1, keepdim=True)
        if group_size(self.tp_group) > 1:
            torch.distributed.all_reduce(top, torch.distributed.ReduceOp.MAX, group=self.tp_group)
        exp_sum = (logits - top).exp().sum(-1)
        real_sum = (logits * self._real(logits)).sum(-1)
        if group_size(self.tp_group) > 1:
            exp_sum = reduce_from_tensor_model_parallel_region(exp_sum, self.tp_group)
            real_sum = reduce_from_tensor_model_parallel_region(real_sum, self.tp_group)
        return exp_sum.log() + top.squeeze(-1) - real_sum / self.encoder[0].vocab_size
