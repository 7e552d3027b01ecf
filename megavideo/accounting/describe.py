"""Parameter counts of a configured model and what each rank holds, built on the meta device.

Each pipeline stage's chunks are built at tensor-parallel size 1 on the meta device (no memory,
no process group); a tensor-parallel parameter's per-rank size follows from megatron-core's
``partition_dim`` and, for attention heads, from the padding to a multiple of tp.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.overrides import TorchFunctionMode

from dataloaders.tokenizer import WordPiece
from kernels.backends import use_layer_backend
from megavideo.config import Config
from megavideo.models.specs import transformer_config
from megavideo.models.stage2 import Stage2Model
from megavideo.models.student import Stage1Student, Tokens
from megavideo.models.teachers import Stage1Teachers
from megavideo.training.state import named_parameters
from parallel.distributed import single_rank_world
from parallel.layout import Chunk, chunks_of, padded_heads, split_layers
from parallel.tensors import is_tp_split


class _OnMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device():
    """Every tensor created inside lives on the meta device, explicit devices included; models
    are built with the local spec (see :func:`kernels.backends.use_layer_backend`), so a GPU node
    with Transformer Engine counts and names them as any other machine."""
    with torch.device("meta"), _OnMeta(), use_layer_backend("local"):
        yield


def local_numel(param: torch.Tensor, tp: int) -> int:
    """Elements of ``param`` (built at tp 1) on one rank of a tensor-parallel group of ``tp``."""
    if not is_tp_split(param):
        return param.numel()
    dim = param.partition_dim
    size = param.shape[dim]
    padding = getattr(param, "head_padding", None)
    if padding is not None:
        size = padding[1] * padded_heads(padding[2], tp)
    return param.numel() // param.shape[dim] * size // tp


def _group(name: str) -> str:
    first = name.split(".")[0]
    return {"blocks": "blocks", "embed": "embeddings", "text": "text", "audio": "audio"}.get(
        first, "heads")


def _whole(cfg: Config, enc) -> TransformerConfig:
    """The config of an encoder built whole at tp = pp = 1."""
    one_rank = replace(cfg.parallel, tp=1, pp=1, vpp=1, sp=False, pipeline_layout=[])
    return transformer_config(enc, one_rank, cfg.train, pipelined=False, sequence_parallel=False)


def _chunk_builder(cfg: Config, tokens: Tokens):
    """chunk, transformer config -> this stage's model chunk, built without a process group."""
    model = cfg.model
    if cfg.stage == 1:
        return lambda chunk, config: Stage1Student(model, config, chunk, tokens, None)
    text = _whole(cfg, model.text)
    audio = _whole(cfg, model.audio) if model.audio.enabled else None
    vocab = len(WordPiece.from_file(model.text.vocab_file))
    return lambda chunk, config: Stage2Model(model, config, chunk, tokens, None, None, text, audio,
                                             vocab, {})


def whole_models(cfg: Config, build=None) -> tuple[MegatronModule, Stage1Teachers | None]:
    """The whole model of the config's stage (1 or 2) and the stage-1 teachers (None in stage 2)
    at tp = pp = 1, on the current device with the current layer backend; ``build`` makes the
    chunks (default: :func:`_chunk_builder`'s). Call inside a process group
    (``single_rank_world``)."""
    model = cfg.model
    build = build or _chunk_builder(cfg, Tokens.of(model, 1, False))
    whole = build(Chunk(0, 0, 0, model.student.num_layers, True, True), _whole(cfg, model.student))
    teachers = None
    if cfg.stage == 1:
        teachers = Stage1Teachers(model, _whole(cfg, model.clip_teacher),
                                  _whole(cfg, model.mae_teacher), None)
    return whole, teachers


def meta_models(cfg: Config, build=None) -> tuple[MegatronModule, Stage1Teachers | None]:
    """:func:`whole_models` on the meta device (no memory) with the local spec, every parameter
    with its layout attributes."""
    with meta_device():
        return whole_models(cfg, build)


def model_parts(stage1: Config, stage2: Config, stage3: Config) -> dict[str, torch.nn.Module]:
    """Every model MegaVideo writes to disk, built whole (tp = pp = 1) on the current device with
    the current layer backend: the stage-1 student and teachers, the stage-2 text and audio
    encoders (``stage2`` with the audio encoder on), the stage-3 QFormer and LLM (and the LLM
    with LoRA adapters). Call inside a process group (``single_rank_world``)."""
    from megavideo.models.llm import build_llm, llm_config
    from megavideo.models.qformer import QFormer

    student, teachers = whole_models(stage1)
    aligned, _ = whole_models(stage2)
    model, one = stage3.model, replace(stage3.parallel, tp=1, pp=1, vpp=1, sp=False,
                                        pipeline_layout=[], encoder_tp=0)
    parts = {"student": student, "clip_teacher": teachers.clip, "mae_teacher": teachers.mae,
             "text": aligned.text, "audio": aligned.audio,
             "qformer": QFormer(model.qformer, _whole(stage3, model.qformer),
                                model.student.hidden_size, model.llm.hidden_size)}
    for name, tuning in (("llm", "full"), ("llm_lora", "lora")):
        llm = replace(model.llm, tuning=tuning)
        parts[name] = build_llm(llm, llm_config(llm, one, stage3.train))
    return parts


def describe(cfg: Config, world_size: int | None = None) -> dict:
    """Counts for the whole model and per pipeline rank; ``world_size`` sets the data-parallel
    size (default: one model replica). Frozen parameters (the teachers, a frozen audio encoder)
    count as weights only."""
    par, model, train = cfg.parallel, cfg.model, cfg.train
    world_size = world_size or par.tp * par.pp
    dp = world_size // (par.tp * par.pp)
    tokens = Tokens.of(model, par.tp, par.sp, cfg.train.precision == "fp8")
    counts = split_layers(model.student.num_layers, par.pp, par.vpp, par.pipeline_layout)
    with single_rank_world():
        build = _chunk_builder(cfg, tokens)  # parameters do not depend on the token count
        whole, teachers = meta_models(cfg, build)
        with meta_device():
            stages = [[build(chunk, whole.config) for chunk in chunks_of(rank, counts, par.pp)]
                      for rank in range(par.pp)]
    totals = {"blocks": 0, "embeddings": 0, "heads": 0}
    if cfg.stage == 2:
        totals |= {"text": 0, "audio": 0}
    for name, param in named_parameters(whole):
        totals[_group(name)] += param.numel()
    totals["model"] = sum(totals.values())
    if teachers is not None:
        totals["clip_teacher"] = sum(p.numel() for p in teachers.clip.parameters())
        totals["mae_teacher"] = sum(p.numel() for p in teachers.mae.parameters())
    teacher_local = sum(local_numel(p, par.tp) for p in teachers.parameters()) if teachers else 0
    ranks = []
    for rank, chunks in enumerate(stages):
        params = [p for c in chunks for p in c.parameters()]
        trained = sum(local_numel(p, par.tp) for p in params if p.requires_grad)
        frozen = sum(local_numel(p, par.tp) for p in params if not p.requires_grad)
        ranks.append({
            "pp_rank": rank,
            "layers": [list(c.layers) for c in chunks_of(rank, counts, par.pp)],
            "trained_params": trained,
            "frozen_params": frozen + (teacher_local if rank == 0 else 0),
            "optimizer_params": -(-trained // dp) if par.distributed_optimizer else trained,
        })
    heads_real = model.student.num_heads
    return {
        "model": model.preset or "custom",
        "stage": cfg.stage,
        "layout": {"tp": par.tp, "pp": par.pp, "vpp": par.vpp, "dp": dp, "sp": par.sp,
                   "distributed_optimizer": par.distributed_optimizer,
                   "layers_per_virtual_stage": counts,
                   "attention_heads": [heads_real, padded_heads(heads_real, par.tp)],
                   "tokens": [tokens.real, tokens.length]},
        "parameters": totals,
        "ranks": ranks,
        "bytes_per_param": bytes_per_param(train.precision, par.distributed_optimizer, dp),
    }


def bytes_per_param(precision: str, distributed_optimizer: bool, dp: int) -> dict[str, float]:
    """Weights, fp32 gradients, and the optimizer's fp32 master copy + Adam moments per param."""
    weights = 2.0 if precision in ("bf16", "fp8") else 4.0
    optimizer = (4.0 if precision in ("bf16", "fp8") else 0.0) + 8.0
    return {"weights": weights, "grads": 4.0,
            "optimizer": optimizer / dp if distributed_optimizer else optimizer}


def format_table(info: dict) -> str:
    def b(n: int) -> str:
        return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"

    lay, par = info["layout"], info["parameters"]
    parts = ", ".join(f"{k} {b(v)}" for k, v in par.items()
                      if k not in ("model", "clip_teacher", "mae_teacher"))
    teachers = (f"; teachers CLIP {b(par['clip_teacher'])}, MAE {b(par['mae_teacher'])}"
                if "clip_teacher" in par else "")
    lines = [f"model {info['model']} stage {info['stage']}: {b(par['model'])} ({parts}){teachers}",
             f"layout tp={lay['tp']} pp={lay['pp']} vpp={lay['vpp']} dp={lay['dp']} sp={lay['sp']} "
             f"distributed_optimizer={lay['distributed_optimizer']}; heads {lay['attention_heads'][0]}"
             f" -> {lay['attention_heads'][1]}, tokens {lay['tokens'][0]} -> {lay['tokens'][1]}",
             f"{'pp rank':>7}  {'layers':<20} {'trained/rank':>13} {'frozen/rank':>14} "
             f"{'optimizer/rank':>15} {'GiB (w+g+opt+frozen)':>24}"]
    per = info["bytes_per_param"]
    for r in info["ranks"]:
        layers = ", ".join(f"{c[0]}-{c[-1]}" for c in r["layers"])
        gib = (r["trained_params"] * (per["weights"] + per["grads"])
               + r["trained_params"] * per["optimizer"] + r["frozen_params"] * per["weights"]) / 2**30
        lines.append(f"{r['pp_rank']:>7}  {layers:<20} {b(r['trained_params']):>13} "
                     f"{b(r['frozen_params']):>14} {b(r['optimizer_params']):>15} {gib:>24.2f}")
    return "\n".join(lines)
