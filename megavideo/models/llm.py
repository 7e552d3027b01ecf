"""Stage 3's LLM decoder: a Mistral-shaped megatron-core GPTModel.

    token ids -> VocabParallelEmbedding -> N x [RMSNorm -> GQA self-attention with RoPE (causal)
    -> + ; RMSNorm -> SwiGLU MLP -> +] -> RMSNorm -> untied vocab-parallel output layer

megatron-core's GPT layer spec (its Transformer Engine spec on a GPU with TE, else its local spec)
with this codebase's fp32-compute RMSNorm in the local spec's norm slots (megatron-core's
fallback norm refuses sequence parallelism). With ``model.llm.tuning=lora`` every linear carries
LoRA adapters (:mod:`megavideo.models.lora`; on the TE spec the norms are not fused into
``linear_qkv`` and ``linear_fc1``, so the adapters see the normed input).
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from kernels.attention import core_attention
from kernels.backends import layer_backend
from kernels.float8 import keep_configured_bf16, local_linears
from kernels.norms import RMSNorm
from megavideo.config import LLMConfig, ParallelConfig, TrainConfig
from megavideo.config.megatron import pipeline_settings, transformer_settings
from megavideo.models.lora import add_adapters
from megavideo.models.specs import LayerConfig


def llm_config(llm: LLMConfig, parallel: ParallelConfig, train: TrainConfig) -> LayerConfig:
    """The decoder's TransformerConfig at the given layout."""
    return LayerConfig(
        num_layers=llm.num_layers,
        hidden_size=llm.hidden_size,
        num_attention_heads=llm.num_heads,
        num_query_groups=llm.num_kv_heads,
        ffn_hidden_size=llm.mlp_hidden_size,
        kv_channels=llm.hidden_size // llm.num_heads,
        tensor_model_parallel_size=parallel.tp,
        **pipeline_settings(llm.num_layers, parallel, pipelined=True),
        sequence_parallel=parallel.sp and parallel.tp > 1,
        normalization="RMSNorm",
        layernorm_epsilon=llm.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        **transformer_settings(train),
    )


def llm_block_spec(llm: LLMConfig, config: LayerConfig,
                   num_layers: int) -> TransformerBlockSubmodules:
    """The specs of ``num_layers`` layers (a pipeline chunk's) and the final norm, for the
    backend this process runs (``config`` gives the core attention and the local spec's FP8
    linears)."""
    if layer_backend() == "te":
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm

        layer = get_gpt_layer_with_transformer_engine_spec()
        norm = TENorm
        if llm.tuning == "lora":  # the adapters need the normed input: norms and linears unfused
            layer.submodules.input_layernorm = TENorm
            layer.submodules.pre_mlp_layernorm = TENorm
            layer.submodules.self_attention.submodules.linear_qkv = TEColumnParallelLinear
            layer.submodules.mlp.submodules.linear_fc1 = TEColumnParallelLinear
    else:
        layer = get_gpt_layer_local_spec(normalization="RMSNorm")
        layer.submodules.input_layernorm = RMSNorm
        layer.submodules.pre_mlp_layernorm = RMSNorm
        attention, mlp = layer.submodules.self_attention.submodules, layer.submodules.mlp.submodules
        attention.core_attention = core_attention(config.attention_backend)
        column, row = local_linears(config.float8)
        attention.linear_qkv, attention.linear_proj = column, row
        mlp.linear_fc1, mlp.linear_fc2 = column, row
        norm = RMSNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=norm)


def build_llm(llm: LLMConfig, config: TransformerConfig, pre_process: bool = True,
              post_process: bool = True, vp_stage: int | None = None,
              scatter_embedding: bool = True, num_layers: int | None = None) -> GPTModel:
    """The decoder, or the pipeline chunk of it holding ``num_layers`` layers.
    ``scatter_embedding=False`` leaves the embedding's output whole under SP, for a caller that
    inserts other tokens first."""
    layers = llm.num_layers if num_layers is None else num_layers
    model = GPTModel(config, llm_block_spec(llm, config, layers), vocab_size=llm.vocab_size,
                    max_sequence_length=llm.max_positions, pre_process=pre_process,
                    post_process=post_process, parallel_output=True,
                    share_embeddings_and_output_weights=False, position_embedding_type="rope",
                    rotary_base=int(llm.rope_base), vp_stage=vp_stage,
                    scatter_embedding_sequence_parallel=scatter_embedding)
    for layer in model.decoder.layers:
        layer.mlp.linear_fc1.weight.glu = True  # [gate; up], split per half over TP
    if llm.tuning == "lora":
        add_adapters(model, llm, config)
    keep_configured_bf16(model.decoder.layers)
    return model
