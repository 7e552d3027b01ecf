"""The rules of ``train.precision=fp8``, checked before any process group.

FP8 GEMMs (Transformer Engine's and ``torch._scaled_mm``, which torchao calls) take matrices whose
dimensions are multiples of 16: every linear's per-rank input and output widths, and the rows
(tokens x micro-batch) of the weight gradient's GEMM. The video encoder's sequence is padded to a
multiple of 16 under FP8 (:func:`megavideo.models.embedding.padding_multiple`); the widths and the
other encoders' sequences must already be multiples.
"""

from __future__ import annotations

from megavideo.config.schema import (
    FP8_BACKENDS,
    FP8_RECIPES,
    Config,
    ConfigError,
    EncoderConfig,
    LLMConfig,
)
from parallel.layout import padded_heads

MULTIPLE = 16


def validate_fp8(config: Config) -> None:
    """The fp8 section's own rules and the shapes FP8 GEMMs need (no-op for other precisions)."""
    train = config.train
    if train.precision != "fp8":
        return
    f = train.fp8
    recipes = sorted({r for rs in FP8_RECIPES.values() for r in rs})
    if f.backend not in FP8_BACKENDS or f.format not in ("hybrid", "e4m3") or f.recipe not in recipes:
        raise ConfigError(f"train.fp8: backend must be one of {', '.join(FP8_BACKENDS)}, format "
                          f"hybrid or e4m3 and recipe one of {', '.join(recipes)}, got "
                          f"'{f.backend}', '{f.format}', '{f.recipe}'.")
    if f.backend != "auto":
        check_recipe(f.backend, f.recipe)
    if f.amax_history < 1 or f.margin < 0 or f.amax_algo not in ("max", "most_recent"):
        raise ConfigError("train.fp8: amax_history must be >= 1, margin >= 0 and amax_algo max or "
                          "most_recent.")
    if f.bf16_first_layers < 0 or f.bf16_last_layers < 0:
        raise ConfigError("train.fp8.bf16_first_layers and bf16_last_layers must be >= 0.")
    if (f.bf16_first_layers or f.bf16_last_layers) and f.recipe == "delayed":
        raise ConfigError("train.fp8: delayed scaling runs the whole stack in one FP8 context, so "
                          "no layer can stay bf16: set bf16_first_layers=0 and bf16_last_layers=0 "
                          "or another recipe.")
    for key, value in _widths(config) + _rows(config):
        if value % MULTIPLE:
            raise ConfigError(f"train.precision=fp8 needs {key} ({value}) to be a multiple of "
                              f"{MULTIPLE} (FP8 GEMMs).")


def check_recipe(backend: str, recipe: str) -> None:
    if recipe not in FP8_RECIPES[backend]:
        raise ConfigError(f"train.fp8.recipe={recipe} is not one of {backend}'s: "
                          f"{', '.join(FP8_RECIPES[backend])}.")


def _encoder_widths(enc: EncoderConfig | LLMConfig, name: str, tp: int,
                    kv_heads: int = 0) -> list[tuple[str, int]]:
    heads, head_dim = padded_heads(enc.num_heads, tp) // tp, enc.hidden_size // enc.num_heads
    return [(f"model.{name}.hidden_size", enc.hidden_size),
            (f"model.{name}.mlp_hidden_size / tp", enc.mlp_hidden_size // tp),
            (f"the heads per rank x head dim of model.{name}", heads * head_dim),
            *([(f"the kv heads per rank x head dim of model.{name}",
                kv_heads // tp * head_dim)] if kv_heads else [])]


def _widths(config: Config) -> list[tuple[str, int]]:
    model, par = config.model, config.parallel
    out = _encoder_widths(model.student, "student", par.encoder_tp_size)
    if config.stage == 1 and config.train.fp8.teachers:
        out += _encoder_widths(model.clip_teacher, "clip_teacher", par.tp)
        out += _encoder_widths(model.mae_teacher, "mae_teacher", par.tp)
    if config.stage == 2:
        out += _encoder_widths(model.text, "text", par.tp)
        if model.audio.enabled:
            out += _encoder_widths(model.audio, "audio", par.tp)
    if config.stage == 3:
        out += _encoder_widths(model.qformer, "qformer", par.encoder_tp_size)
        out += _encoder_widths(model.llm, "llm", par.tp, model.llm.num_kv_heads)
    return out


def _rows(config: Config) -> list[tuple[str, int]]:
    """Token rows of the encoders whose sequence is not padded for FP8 (per micro-batch)."""
    model, b = config.model, config.train.micro_batch
    if config.stage == 1 and config.train.fp8.teachers:
        clip, mae = model.clip_teacher, model.mae_teacher
        return [("the CLIP teacher's tokens x train.micro_batch",
                 (1 + clip.patches_per_frame) * clip.num_frames * b),
                ("the MAE teacher's tokens x train.micro_batch", mae.num_patches * b)]
    if config.stage == 2:
        out = [("model.text.max_length x train.micro_batch", model.text.max_length * b)]
        if model.audio.enabled:
            out.append(("the audio tokens x train.micro_batch", model.audio.tokens * b))
        return out
    if config.stage == 3:
        return [("model.llm.max_length x train.micro_batch", model.llm.max_length * b),
                ("model.qformer queries x train.micro_batch", model.qformer.queries * b)]
    return []
