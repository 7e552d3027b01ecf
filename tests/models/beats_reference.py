"""An independent BEATs forward for tests, written from the published BEATs code (microsoft/unilm,
``beats/BEATs.py`` and ``beats/backbone.py``) and working on an official state dict by its keys:
fbank -> patches -> LayerNorm -> projection -> + weight-normed positional convolution -> LayerNorm
-> post-norm DeepNorm layers whose attention follows BEATs' own arithmetic (q scaled then divided
by 32, the row maximum subtracted, times 32) plus the gated relative position bias computed by
layer 0 and passed on ungated."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def relative_positions_bucket(relative_positions: Tensor, num_buckets: int,
                              max_distance: int) -> Tensor:
    num_buckets = num_buckets // 2
    relative_buckets = (relative_positions > 0).to(torch.long) * num_buckets
    relative_positions = torch.abs(relative_positions)
    max_exact = num_buckets // 2
    is_small = relative_positions < max_exact
    if_large = max_exact + (torch.log(relative_positions.float() / max_exact)
                            / math.log(max_distance / max_exact)
                            * (num_buckets - max_exact)).to(torch.long)
    if_large = torch.min(if_large, torch.full_like(if_large, num_buckets - 1))
    return relative_buckets + torch.where(is_small, relative_positions, if_large)


def _attention(x: Tensor, s: dict, p: str, heads: int, cfg: dict, position_bias: Tensor | None):
    tgt_len, bsz, dim = x.shape
    head_dim = dim // heads
    scaling = head_dim ** -0.5
    if position_bias is None:
        context = torch.arange(tgt_len)[:, None]
        memory = torch.arange(tgt_len)[None, :]
        bucket = relative_positions_bucket(memory - context, cfg["num_buckets"],
                                           cfg["max_distance"])
        values = F.embedding(bucket, s[p + "relative_attention_bias.weight"]).permute(2, 0, 1)
        position_bias = values.unsqueeze(0).repeat(bsz, 1, 1, 1).view(bsz * heads, tgt_len,
                                                                      tgt_len)
    q = F.linear(x, s[p + "q_proj.weight"], s[p + "q_proj.bias"])
    k = F.linear(x, s[p + "k_proj.weight"], s[p + "k_proj.bias"])
    v = F.linear(x, s[p + "v_proj.weight"], s[p + "v_proj.bias"])
    q = q * scaling
    alpha = 32
    q = q * (1 / alpha)
    q = q.contiguous().view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * heads, head_dim).transpose(0, 1)
    attn_weights = torch.bmm(q, k.transpose(1, 2))
    attn_weights = (attn_weights - attn_weights.max(dim=-1, keepdim=True)[0]) * alpha
    query_layer = q.view(bsz, heads, tgt_len, head_dim) * alpha / scaling
    gates = F.linear(query_layer, s[p + "grep_linear.weight"], s[p + "grep_linear.bias"])
    gate_a, gate_b = torch.sigmoid(gates.view(bsz, heads, tgt_len, 2, 4).sum(-1)).chunk(2, dim=-1)
    gate_a_1 = gate_a * (gate_b * s[p + "grep_a"] - 1.0) + 2.0
    attn_mask_rel_pos = gate_a_1.view(bsz * heads, tgt_len, 1) * position_bias
    attn_weights = attn_weights + attn_mask_rel_pos.view(attn_weights.size())
    attn_probs = F.softmax(attn_weights, dim=-1)
    attn = torch.bmm(attn_probs, v).transpose(0, 1).contiguous().view(tgt_len, bsz, dim)
    return F.linear(attn, s[p + "out_proj.weight"], s[p + "out_proj.bias"]), position_bias


def beats_forward(s: dict, cfg: dict, fbank: Tensor, eps: float = 1e-5) -> Tensor:
    """fbank [B, frames, mel] -> the last layer's output [B, tokens, dim]."""
    ln = lambda x, key: F.layer_norm(x, x.shape[-1:], s[key + ".weight"], s[key + ".bias"], eps)  # noqa: E731
    patch = cfg["input_patch_size"]
    x = F.conv2d(fbank.unsqueeze(1), s["patch_embedding.weight"], stride=patch)
    x = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
    x = ln(x, "layer_norm")
    x = F.linear(x, s["post_extract_proj.weight"], s["post_extract_proj.bias"])
    g, v = s["encoder.pos_conv.0.weight_g"], s["encoder.pos_conv.0.weight_v"]
    weight = g * v / torch.linalg.vector_norm(v, dim=(0, 1), keepdim=True)
    kernel = cfg["conv_pos"]
    x_conv = F.conv1d(x.transpose(1, 2), weight, s["encoder.pos_conv.0.bias"], padding=kernel // 2,
                      groups=cfg["conv_pos_groups"])
    if kernel % 2 == 0:
        x_conv = x_conv[:, :, :-1]
    x = x + F.gelu(x_conv).transpose(1, 2)
    x = ln(x, "encoder.layer_norm").transpose(0, 1)  # [T, B, C]
    layers, heads = cfg["encoder_layers"], cfg["encoder_attention_heads"]
    deep_norm_alpha = math.pow(2 * layers, 1 / 4)
    position_bias = None
    for i in range(layers):
        p = f"encoder.layers.{i}."
        residual = x
        x, position_bias = _attention(x, s, p + "self_attn.", heads, cfg, position_bias)
        x = ln(residual * deep_norm_alpha + x, p + "self_attn_layer_norm")
        residual = x
        x = F.linear(F.gelu(F.linear(x, s[p + "fc1.weight"], s[p + "fc1.bias"])),
                     s[p + "fc2.weight"], s[p + "fc2.bias"])
        x = ln(residual * deep_norm_alpha + x, p + "final_layer_norm")
    return x.transpose(0, 1)


def random_beats(cfg: dict, seed: int = 0) -> dict[str, Tensor]:
    """A random BEATs state dict of ``cfg``'s shape, by the official keys (the relative position
    table under every layer, the same tensor, as the official files store it)."""
    g = torch.Generator().manual_seed(seed)
    dim, ffn, c = cfg["encoder_embed_dim"], cfg["encoder_ffn_embed_dim"], cfg["embed_dim"]
    heads, patch, kernel = cfg["encoder_attention_heads"], cfg["input_patch_size"], cfg["conv_pos"]
    shapes = {"patch_embedding.weight": (c, 1, patch, patch), "layer_norm.weight": (c,),
              "layer_norm.bias": (c,), "post_extract_proj.weight": (dim, c),
              "post_extract_proj.bias": (dim,), "encoder.pos_conv.0.weight_g": (1, 1, kernel),
              "encoder.pos_conv.0.weight_v": (dim, dim // cfg["conv_pos_groups"], kernel),
              "encoder.pos_conv.0.bias": (dim,), "encoder.layer_norm.weight": (dim,),
              "encoder.layer_norm.bias": (dim,)}
    for i in range(cfg["encoder_layers"]):
        p = f"encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{p}self_attn.{name}.weight": (dim, dim), f"{p}self_attn.{name}.bias": (dim,)}
        shapes |= {f"{p}self_attn.grep_linear.weight": (8, dim // heads),
                   f"{p}self_attn.grep_linear.bias": (8,), f"{p}self_attn.grep_a": (1, heads, 1, 1),
                   f"{p}fc1.weight": (ffn, dim), f"{p}fc1.bias": (ffn,),
                   f"{p}fc2.weight": (dim, ffn), f"{p}fc2.bias": (dim,)}
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes |= {f"{p}{norm}.weight": (dim,), f"{p}{norm}.bias": (dim,)}
    state = {}
    for key, shape in shapes.items():
        scale = 0.3 if "grep" in key else 0.1
        centre = 1.0 if key.endswith(("norm.weight", "grep_a", "weight_g")) else 0.0
        state[key] = centre + scale * torch.randn(shape, generator=g)
    table = torch.randn(cfg["num_buckets"], heads, generator=g)  # large enough to matter
    for i in range(cfg["encoder_layers"]):
        state[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"] = table
    return state
