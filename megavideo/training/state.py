"""The model as one layout-independent state: canonical names, whole unpadded tensors.

A parameter's canonical name is its name in the single-rank model built with megatron-core's
local spec: DDP's ``module.`` prefix dropped, the layer index made global (``blocks.layers.<global
layer>``, the stage-3 LLM's ``llm.decoder.layers.<global layer>``) and a norm that the Transformer
Engine spec fuses into the next linear named as the local spec names it (:func:`canonical_name`).
Copies of a tied parameter report under one name (the last chunk's copy). Everything written to
disk (checkpoints, converted weights) uses these names, whichever backend wrote or reads it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from parallel.tensors import gather_full, take_shard

_LAYER = re.compile(r"^((?:.*\.)?(?:blocks|decoder)\.layers)\.(\d+)\.")
# The TE specs hold a block's pre-norms inside the next linear (``self_attention.linear_qkv.
# layer_norm_weight`` for ``input_layernorm.weight``, ``mlp.linear_fc1.layer_norm_*`` for
# ``pre_mlp_layernorm.*``); megatron-core's local GPT spec declares that correspondence (local ->
# TE prefix) for its own checkpoints. Read the other way, it gives every TE name its local one.
FUSED_NORMS = {te: local for local, te in
               get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map.items()}


def canonical_name(name: str) -> str:
    """The local spec's name of a parameter named ``name`` under either spec."""
    for fused, local in FUSED_NORMS.items():
        at = name.find(fused)
        if at == 0 or at > 0 and name[at - 1] == ".":
            return name[:at] + local + name[at + len(fused):]
    return name


def named_parameters(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``module.named_parameters()`` under canonical names (layer indices as the module has them)."""
    for name, param in module.named_parameters():
        yield canonical_name(name), param


def _unwrap(module):
    return getattr(module, "module", module)


def canonical_params(chunks) -> list[tuple[str, torch.nn.Parameter]]:
    """(canonical name, parameter) for every trainable parameter this rank holds."""
    out = []
    for chunk in chunks:
        model = _unwrap(chunk)
        for name, param in named_parameters(model):
            match = _LAYER.match(name)
            if match:
                stack, index = match.groups()
                layer = model.get_submodule(f"{stack}.{index}").layer_number - 1
                name = f"{stack}.{layer}." + name[match.end():]
            out.append((name, param))
    return out


def full_state(chunks, grads: bool = False) -> dict[str, torch.Tensor]:
    """Whole, unpadded tensors of this pipeline rank's parameters (or of the trainable ones'
    ``main_grad``).

    Every rank of the TP group joins; every TP and DP rank gets the same result.
    """
    tp_group = parallel_state.get_tensor_model_parallel_group()
    state = {}
    for name, param in canonical_params(chunks):
        if getattr(param, "shared", False) and name in state or grads and not param.requires_grad:
            continue
        local = param.main_grad if grads else param.data
        group = getattr(param, "tp_group", tp_group)  # stage 3's video encoder: its own group
        state[name] = gather_full(param, local, group).detach().float().cpu().clone()
    return state


def load_full_state(chunks, state: dict[str, torch.Tensor]) -> None:
    """Copy whole, unpadded tensors (single-rank names) into this rank's shards."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    missing = [name for name, _ in canonical_params(chunks) if name not in state]
    if missing:
        raise KeyError(f"the state lacks {len(missing)} parameters, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, param in canonical_params(chunks):
            rank, size = getattr(param, "tp_coords", (tp_rank, tp))
            param.copy_(take_shard(param, state[name].to(param.dtype), rank, size))
