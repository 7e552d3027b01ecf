"""Official InternVideo2 state dicts <-> MegaVideo checkpoints.

Official key layouts (OpenGVLab/InternVideo, ``InternVideo2/single_modality/models``):

- the student, ``internvideo2_pretrain.py`` (PretrainInternVideo2): ``cls_token``, ``pos_embed``,
  ``clip_pos_embed``, ``mae_pos_embed``, ``patch_embed.proj``, ``blocks.<i>.{norm1, attn.qkv,
  attn.q_norm, attn.k_norm, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}``,
  ``clip_projector.{norm1_q, norm1_k, norm1_v, cross_attn.{q, k, v, q_bias, k_bias, v_bias,
  proj}}``, ``clip_decoder.<k>.{head, norm}``, ``final_clip_decoder.{head, norm}``,
  ``mae_decoder.<k>.{head.0, head.2, norm}``;
- the CLIP teacher, ``internvl_clip_vision.py`` (InternVL_CLIP, InternViT-6B): the same block,
  embedding and ``clip_projector`` keys;
- the MAE teacher, ``videomae.py`` (VideoMAEv2-g): ``patch_embed.proj``, ``blocks.<i>.{norm1,
  attn.qkv, attn.q_bias, attn.v_bias, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm`` (the
  pre-training file prefixes them with ``encoder.``: pass ``strip="encoder."``).

Two layouts differ beyond names: the official qkv rows are ordered (q|k|v, head, dim) while
megatron-core's are (head, q|k|v, dim), and VideoMAE has q and v biases but no k bias (zero in
MegaVideo's fused qkv bias). Position embeddings lose the official leading batch axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from megavideo.config import Config, ModelConfig, Stage1ModelConfig, ViTConfig

Tensor = torch.Tensor

_BLOCK = {
    "norm1.weight": "input_layernorm.weight",
    "norm1.bias": "input_layernorm.bias",
    "attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "attn.proj.weight": "self_attention.linear_proj.weight",
    "attn.proj.bias": "self_attention.linear_proj.bias",
    "ls1.gamma": "ls1.gamma",
    "ls2.gamma": "ls2.gamma",
    "norm2.weight": "pre_mlp_layernorm.weight",
    "norm2.bias": "pre_mlp_layernorm.bias",
    "mlp.fc1.weight": "mlp.linear_fc1.weight",
    "mlp.fc1.bias": "mlp.linear_fc1.bias",
    "mlp.fc2.weight": "mlp.linear_fc2.weight",
    "mlp.fc2.bias": "mlp.linear_fc2.bias",
}
_POOL = {
    **{f"norm1_{x}.{p}": f"norm_{x}.{p}" for x in "qkv" for p in ("weight", "bias")},
    **{f"cross_attn.{x}.weight": f"{x}.weight" for x in "qkv"},
    **{f"cross_attn.{x}_bias": f"{x}.bias" for x in "qkv"},
    "cross_attn.proj.weight": "proj.weight",
    "cross_attn.proj.bias": "proj.bias",
}
_LINEAR_NORM = {f"{a}.{p}": f"{b}.{p}" for a, b in (("head", "head"), ("norm", "norm"))
                for p in ("weight", "bias")}
_MLP_NORM = {f"{a}.{p}": f"{b}.{p}" for a, b in (("head.0", "fc1"), ("head.2", "fc2"), ("norm", "norm"))
             for p in ("weight", "bias")}


def qkv_to_megatron(w: Tensor, heads: int) -> Tensor:
    """[(3, H, D), ...] rows -> [(H, 3, D), ...]."""
    rest = w.shape[1:]
    return w.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(w.shape)


def qkv_to_official(w: Tensor, heads: int) -> Tensor:
    rest = w.shape[1:]
    return w.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(w.shape)


class KeyMismatch(ValueError):
    """Unknown or missing keys, or tensors of other shapes, all of them listed in one message."""


VISION = "vision"  # a later stage's video encoder: the student without its stage-1 aligners


def _vit(kind: str, model: ModelConfig) -> ViTConfig:
    return model.student if kind == VISION else getattr(model, kind)


def _mapping(kind: str, model: Stage1ModelConfig) -> dict[str, str]:
    """Official name -> MegaVideo name for every plain (renamed only) tensor."""
    vit = _vit(kind, model)
    prefix = "" if kind in (VISION, "student") else "vit."
    embed = f"{prefix}embed."
    blocks = f"{prefix}blocks.layers."
    out = {"patch_embed.proj.weight": embed + "patch_embed.proj.weight",
           "patch_embed.proj.bias": embed + "patch_embed.proj.bias"}
    if vit.cls_token:
        out["cls_token"] = embed + "cls_token"
    block = {a: b for a, b in _BLOCK.items()
             if not (a.startswith("norm") and a.endswith("bias") and vit.norm == "rmsnorm")
             and not ("_norm." in a and not vit.qk_norm)
             and not (a.startswith("ls") and not vit.layer_scale_init)}
    for i in range(vit.num_layers):
        for a, b in block.items():
            out[f"blocks.{i}.{a}"] = f"{blocks}{i}.{b}"
    if vit.final_norm:
        out.update({f"norm.{p}": f"{prefix}blocks.final_layernorm.{p}" for p in ("weight", "bias")})
    if vit.pool_heads:
        out.update({f"clip_projector.{a}": f"pool.{b}" for a, b in _POOL.items()})
    if kind == "student":
        for k in range(model.clip_layers):
            out.update({f"clip_decoder.{k}.{a}": f"clip_aligners.{k}.{b}" for a, b in _LINEAR_NORM.items()})
        out.update({f"final_clip_decoder.{a}": f"final_aligner.{b}" for a, b in _LINEAR_NORM.items()})
        for k in range(model.mae_layers):
            out.update({f"mae_decoder.{k}.{a}": f"mae_aligners.{k}.{b}" for a, b in _MLP_NORM.items()})
    return out


def _pos_embeds(kind: str, model: Stage1ModelConfig) -> list[tuple[str, str]]:
    vit = _vit(kind, model)
    if not vit.learnable_pos_embed:
        return []
    prefix = "" if kind in (VISION, "student") else "vit."
    out = [("pos_embed", f"{prefix}embed.pos_embed")]
    if kind == VISION and getattr(model, "image_pos_embed", "") == "own":
        out.append(("img_pos_embed", "embed.img_pos_embed"))  # stage 2's own image table
    if kind == "student":
        out += [("clip_pos_embed", "clip_pos_embed"), ("mae_pos_embed", "mae_pos_embed")]
    return out


def _check_keys(given: set[str], expected: set[str], what: str) -> None:
    unknown, missing = sorted(given - expected), sorted(expected - given)
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing)})")
        if unknown:
            parts.append(f"{len(unknown)} unknown ({', '.join(unknown)})")
        raise KeyMismatch(f"the {what} state dict does not match the config: {'; '.join(parts)}.")


def strip_keys(state: dict[str, Tensor], strip: str = "", ignore: tuple[str, ...] = ()) -> dict:
    """Drop keys starting with any ``ignore`` prefix, then remove the prefix ``strip``."""
    out = {}
    for key, value in state.items():
        if any(key.startswith(p) for p in ignore):
            continue
        out[key[len(strip):] if strip and key.startswith(strip) else key] = value
    return out


def from_official(kind: str, model: Stage1ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An official state dict of ``kind`` (student, clip_teacher, mae_teacher; or ``VISION``, a
    later stage's video encoder, from ``model.student``) -> MegaVideo
    single-rank names and layouts. Raises KeyMismatch listing every unknown and missing key."""
    vit = _vit(kind, model)
    names = _mapping(kind, model)
    qkv = {f"blocks.{i}.attn.qkv.weight" for i in range(vit.num_layers)}
    biases = ({f"blocks.{i}.attn.{x}_bias" for i in range(vit.num_layers) for x in "qv"}
              if vit.qkv_bias else set())
    pos = dict(_pos_embeds(kind, model))
    _check_keys(set(state), set(names) | qkv | biases | set(pos), kind)
    prefix = "" if kind in (VISION, "student") else "vit."
    out = {names[k]: v for k, v in state.items() if k in names}
    embed = names["patch_embed.proj.weight"]
    if out[embed].dim() == 4 and vit.tubelet_size == 1:
        # InternVL-C's vision tower stores a Conv2d [C, 3, p, p]; the official loader inflates
        # it to the Conv3d of one frame, [C, 3, 1, p, p]
        out[embed] = out[embed].unsqueeze(2)
    for k in pos:
        out[pos[k]] = state[k].reshape(state[k].shape[-2:])
    heads = vit.num_heads
    for i in range(vit.num_layers):
        target = f"{prefix}blocks.layers.{i}.self_attention.linear_qkv"
        out[f"{target}.weight"] = qkv_to_megatron(state[f"blocks.{i}.attn.qkv.weight"], heads)
        if vit.qkv_bias:
            q, v = state[f"blocks.{i}.attn.q_bias"], state[f"blocks.{i}.attn.v_bias"]
            out[f"{target}.bias"] = qkv_to_megatron(torch.cat([q, torch.zeros_like(q), v]), heads)
    return out


def to_official(kind: str, model: Stage1ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`from_official`."""
    vit = _vit(kind, model)
    names = {b: a for a, b in _mapping(kind, model).items()}
    prefix = "" if kind in (VISION, "student") else "vit."
    qkv = {f"{prefix}blocks.layers.{i}.self_attention.linear_qkv.{p}" for i in range(vit.num_layers)
           for p in (("weight", "bias") if vit.qkv_bias else ("weight",))}
    _check_keys(set(state), set(names) | qkv | {ours for _, ours in _pos_embeds(kind, model)},
                f"MegaVideo {kind}")
    out = {names[k]: v for k, v in state.items() if k in names}
    for official, ours in _pos_embeds(kind, model):
        out[official] = state[ours][None]
    heads, width = vit.num_heads, vit.hidden_size
    for i in range(vit.num_layers):
        source = f"{prefix}blocks.layers.{i}.self_attention.linear_qkv"
        out[f"blocks.{i}.attn.qkv.weight"] = qkv_to_official(state[f"{source}.weight"], heads)
        if vit.qkv_bias:
            q, k, v = qkv_to_official(state[f"{source}.bias"], heads).split(width)
            if k.abs().max() > 0:
                raise ValueError(f"{kind} block {i} has a non-zero k bias, which VideoMAE's "
                                 "layout cannot hold.")
            out[f"blocks.{i}.attn.q_bias"], out[f"blocks.{i}.attn.v_bias"] = q, v
    return out


def progress(total: int, label: str) -> Callable[[int], None]:
    """A text progress bar on stderr for ``total`` items (one line, rewritten in place)."""
    import sys

    def tick(done: int) -> None:
        filled = int(30 * done / max(total, 1))
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return tick


KINDS = ("student", "clip_teacher", "mae_teacher")


def meta_params(cfg: Config) -> dict[str, dict[str, torch.nn.Parameter]]:
    """The single-rank parameters (meta device) of the model a checkpoint of ``cfg`` holds
    (``student``: the whole model of a later stage) and of the stage-1 teachers; call inside
    :func:`parallel.distributed.single_rank_world`."""
    from megavideo.accounting.describe import meta_models
    from megavideo.training.state import named_parameters

    student, teachers = meta_models(cfg)
    out = {"student": dict(named_parameters(student))}
    if teachers is not None:
        out |= {"clip_teacher": dict(named_parameters(teachers.clip)),
                "mae_teacher": dict(named_parameters(teachers.mae))}
    return out


def check_shapes(states: dict[str, dict[str, Tensor]],
                 params: dict[str, dict[str, torch.nn.Parameter]]) -> None:
    """Raise KeyMismatch listing every tensor whose shape is not its parameter's (keys first)."""
    wrong = []
    for kind, state in states.items():
        _check_keys(set(state), set(params[kind]), f"converted {kind}")
        wrong += [f"{kind} {name} {list(t.shape)}, the model's {list(params[kind][name].shape)}"
                  for name, t in state.items() if t.shape != params[kind][name].shape]
    if wrong:
        shown = "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        what = "1 tensor has a shape" if len(wrong) == 1 else f"{len(wrong)} tensors have shapes"
        raise KeyMismatch(f"{what} the config does not: {shown}.")


def write_checkpoint(cfg: Config, states: dict[str, dict[str, Tensor]], out: Path) -> None:
    """Write MegaVideo-layout tensors as a checkpoint root ``out``: the student as
    ``step_00000000`` (weights only, ``latest`` points at it), the teachers as ``teachers/``.
    Every tensor's name and shape is checked against the model first, so a file of another
    model writes nothing. ``checkpoint.load=<out>`` then starts a run from them."""
    from megavideo.training.checkpoint import FORMAT, checkpoint_key, point_latest, save_atomically
    from parallel.checkpointing import sharded_tensors
    from parallel.distributed import single_rank_world

    if ("clip_teacher" in states) != ("mae_teacher" in states):
        raise ValueError("give both teachers or neither: a run loads them together.")
    with single_rank_world():
        params = meta_params(cfg)
        check_shapes(states, params)  # every tensor, before anything is written
        tick = progress(sum(len(s) for s in states.values()), "writing")
        done = 0

        def shards(kind: str) -> dict:
            nonlocal done
            out_shards = {}
            for name, tensor in states[kind].items():
                out_shards[name] = sharded_tensors(checkpoint_key(kind, name), params[kind][name],
                                                   tensor.float().contiguous(), 0, 1, (0, 0))
                done += 1
                tick(done)
            return out_shards

        out.mkdir(parents=True, exist_ok=True)
        if "clip_teacher" in states:
            teachers = {checkpoint_key(k, n): v for k in ("clip_teacher", "mae_teacher")
                        for n, v in shards(k).items()}
            save_atomically(out, "teachers", {"teachers": teachers, "meta": {"format": FORMAT}})
        if "student" in states:
            meta = {"format": FORMAT, "step": 0, "consumed_samples": 0, "scheduler": {},
                    "config": cfg.to_dict(), "layout": {"tp": 1, "pp": 1, "vpp": 1, "world": 1},
                    "optimizer_states": []}
            save_atomically(out, "step_00000000", {"model": shards("student"), "meta": meta})
            point_latest(out, "step_00000000")


def read_checkpoint(cfg: Config, root: Path) -> dict[str, dict[str, Tensor]]:
    """MegaVideo-layout fp32 tensors of a checkpoint root (or step directory): the student of
    the checkpoint ``latest`` names, the teachers of ``teachers/`` when there."""
    from megatron.core import dist_checkpointing

    from megavideo.training.checkpoint import checkpoint_key, resolve
    from parallel.checkpointing import assemble, sharded_tensors
    from parallel.distributed import single_rank_world

    step_dir = resolve(root)
    teachers_dir = step_dir.parent / "teachers"
    out: dict[str, dict[str, Tensor]] = {}
    with single_rank_world():
        params = meta_params(cfg)
        sources = []
        if (step_dir / "metadata.json").is_file():
            sources.append((step_dir, ("student",)))
        if teachers_dir.is_dir():
            sources.append((teachers_dir, ("clip_teacher", "mae_teacher")))
        for directory, kinds in sources:
            request = {kind: {name: sharded_tensors(checkpoint_key(kind, name), p, None, 0, 1, (0, 0),
                                                    torch.float32)
                              for name, p in params[kind].items()} for kind in kinds}
            flat = {checkpoint_key(k, n): v for k in kinds for n, v in request[k].items()}
            group = "model" if kinds == ("student",) else "teachers"
            loaded = dist_checkpointing.load({group: flat}, str(directory))[group]
            for kind in kinds:
                out[kind] = {name: assemble(p, loaded[checkpoint_key(kind, name)], 0)
                             for name, p in params[kind].items()}
    return out


def read_llm(cfg: Config, root: Path) -> dict[str, Tensor]:
    """The stage-3 LLM decoder's single-rank fp32 tensors (``llm.*``, its LoRA adapters too)
    of a checkpoint root or step directory."""
    return read_stage3(cfg, root, parts=("llm",))


def read_stage3(cfg: Config, root: Path, parts: tuple[str, ...] = ("video", "qformer", "llm")
                ) -> dict[str, Tensor]:
    """The single-rank fp32 tensors of a stage-3 checkpoint root or step directory: the video
    encoder (``video.*``), the QFormer (``qformer.*``, its text with model.qformer.text_input)
    and the LLM (``llm.*``, its LoRA adapters too), those of ``parts``."""
    from megatron.core import dist_checkpointing

    from megavideo.accounting.describe import meta_device
    from megavideo.models.llm import build_llm, llm_config
    from megavideo.models.qformer import QFormer
    from megavideo.models.specs import transformer_config
    from megavideo.models.video import Tokens, VideoChunk
    from megavideo.training.checkpoint import checkpoint_key, resolve
    from megavideo.training.state import named_parameters
    from megavideo.weights.qformer import text_vocab
    from parallel.checkpointing import assemble, sharded_tensors
    from parallel.distributed import single_rank_world
    from parallel.layout import Chunk

    model = cfg.model
    one = dataclasses.replace(cfg.parallel, tp=1, pp=1, vpp=1, sp=False, pipeline_layout=[],
                              encoder_tp=0)
    params: dict[str, torch.nn.Parameter] = {}
    with single_rank_world(), meta_device():
        if "video" in parts:
            whole = Chunk(0, 0, 0, model.student.num_layers - 1, True, False)
            video = VideoChunk(model, transformer_config(model.student, one, cfg.train,
                                                         pipelined=False, sequence_parallel=False),
                               whole, Tokens.whole(model, 1, False), None)
            params |= {f"video.{n}": p for n, p in named_parameters(video)}
        if "qformer" in parts:
            vocab = text_vocab(model)
            qformer = QFormer(model.qformer, transformer_config(model.qformer, one, cfg.train,
                                                                pipelined=False,
                                                                sequence_parallel=False),
                              model.student.hidden_size, model.llm.hidden_size, vocab_size=vocab)
            params |= {f"qformer.{n}": p for n, p in named_parameters(qformer)}
        if "llm" in parts:
            llm = build_llm(model.llm, llm_config(model.llm, one, cfg.train))
            params |= {f"llm.{n}": p for n, p in named_parameters(llm)}
    with single_rank_world():
        request = {n: sharded_tensors(checkpoint_key("student", n), p, None, 0, 1, (0, 0),
                                      torch.float32) for n, p in params.items()}
        loaded = dist_checkpointing.load({"model": request}, str(resolve(root)))["model"]
    return {n: assemble(p, loaded[n], 0) for n, p in params.items()}
