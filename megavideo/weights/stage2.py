"""Released InternVideo2 stage-2 checkpoints <-> the MegaVideo stage-2 model.

Official keys (OpenGVLab/InternVideo, ``InternVideo2/multi_modality``, e.g.
``InternVideo2-stage2_1b-224p-f4.pt``)::

    vision_encoder.*            the video encoder (:mod:`megavideo.weights.internvideo2`, VISION)
    text_encoder.bert.*, text_encoder.cls.predictions.*   BERT (:mod:`megavideo.weights.hf_bert`)
    audio_encoder.*             BEATs (:mod:`megavideo.weights.beats`), 6B
    vision_proj, text_proj, audio_proj, av_fusion, itm_head, avtm_head   the same names
    av_concat_vision_proj.{0,1}  fusion_proj.{linear,norm}  (6B: tokens to the fusion width)
    av_concat_audio_proj.{0,1}   audio_fusion_proj.{linear,norm}
    temp                        temperature

The released files also keep what stage 2 does not use (the stage-1 CLIP decoders and their
position embeddings; the image position embedding, ``vision_encoder.img_pos_embed``, unless
``model.image_pos_embed`` is own), BERT's ``position_ids`` buffer, the MLM
decoder tied to the word embeddings and BEATs' shared position table under every layer; these
are not read, and :func:`to_official` writes the tied and shared copies back.
"""

from __future__ import annotations

import torch

from megavideo.config import Stage2ModelConfig
from megavideo.weights import beats, hf_bert, internvideo2
from megavideo.weights.internvideo2 import VISION, KeyMismatch

Tensor = torch.Tensor
VISION_PREFIX, TEXT_PREFIX, AUDIO_PREFIX = "vision_encoder.", "text_encoder.", "audio_encoder."
VIDEO_ENCODER = ("embed.", "blocks.", "pool.")
HEADS = {"temperature": "temp", "fusion_proj.linear": "av_concat_vision_proj.0",
         "fusion_proj.norm": "av_concat_vision_proj.1",
         "audio_fusion_proj.linear": "av_concat_audio_proj.0",
         "audio_fusion_proj.norm": "av_concat_audio_proj.1"}
PLAIN_HEADS = ("vision_proj", "text_proj", "audio_proj", "av_fusion", "itm_head", "avtm_head")
# official keys stage 2 does not read
UNUSED = (f"{VISION_PREFIX}clip_decoder.", f"{VISION_PREFIX}final_clip_decoder.",
          f"{VISION_PREFIX}clip_pos_embed", f"{VISION_PREFIX}clip_img_pos_embed",
          f"{VISION_PREFIX}img_pos_embed", f"{VISION_PREFIX}mae_decoder.",
          f"{VISION_PREFIX}mae_pos_embed", f"{TEXT_PREFIX}bert.embeddings.position_ids",
          f"{TEXT_PREFIX}cls.predictions.decoder.", f"{TEXT_PREFIX}bert.pooler.",
          f"{AUDIO_PREFIX}predictor.")


def _unused(model: Stage2ModelConfig) -> tuple[str, ...]:
    """The official keys not read; the image table is read where the model has its own."""
    own = f"{VISION_PREFIX}img_pos_embed"
    return tuple(k for k in UNUSED if k != own or model.image_pos_embed != "own")


def head_key(name: str) -> str:
    """The official key of a projection, head or the temperature."""
    module, _, kind = name.rpartition(".")
    if name in HEADS:
        return HEADS[name]
    if module in HEADS:
        return f"{HEADS[module]}.{kind}"
    if module in PLAIN_HEADS:
        return name
    raise KeyError(f"{name} has no counterpart in the official stage-2 layout")


def _is_video(name: str) -> bool:
    return name.startswith(VIDEO_ENCODER)


def from_official(model: Stage2ModelConfig, state: dict[str, Tensor], names: list[str],
                  vocab: int) -> dict[str, Tensor]:
    """An official stage-2 state dict -> the single-rank tensors of this model's parameters
    ``names``; raises KeyMismatch listing every missing and unknown key."""
    unused = _unused(model)
    vision = {k[len(VISION_PREFIX):]: v for k, v in state.items()
              if k.startswith(VISION_PREFIX) and not k.startswith(unused)}
    out = internvideo2.from_official(VISION, model, vision)
    used = {VISION_PREFIX + k for k in vision}
    missing = []
    for name in names:
        if _is_video(name):
            continue
        if hf_bert.is_text(name):
            keys = [TEXT_PREFIX + k for k in hf_bert.hf_keys(name)]
            convert = lambda ts, n=name: hf_bert.to_megatron(n, ts, model.text, vocab)  # noqa: E731
        elif beats.is_audio(name):
            keys = [beats.spelling(AUDIO_PREFIX + k, state, AUDIO_PREFIX) or AUDIO_PREFIX + k
                    for k in beats.beats_keys(name)]
            convert = lambda ts, n=name: beats.to_megatron(n, ts, model.audio)  # noqa: E731
        else:
            keys, convert = [head_key(name)], lambda ts: ts[0]
        absent = [k for k in keys if k not in state]
        if absent:
            missing += absent
            continue
        out[name] = convert([state[k] for k in keys])
        used.update(keys)
    shared = {k for k in state if ".self_attn.relative_attention_bias." in k}  # layer 0's is read
    unknown = sorted(set(state) - used - shared - {k for k in state if k.startswith(unused)})
    if missing or unknown:
        parts = [f"{len(missing)} missing ({', '.join(missing[:5])})"] if missing else []
        parts += [f"{len(unknown)} unknown ({', '.join(unknown[:5])})"] if unknown else []
        raise KeyMismatch(f"the stage-2 state dict does not match the config: {'; '.join(parts)}.")
    return out


def to_official(model: Stage2ModelConfig, state: dict[str, Tensor], vocab: int) -> dict[str, Tensor]:
    """The inverse of :func:`from_official` (with the tied MLM decoder and BEATs' shared table
    under every layer, as the official model's state dict holds them)."""
    video = {n: t for n, t in state.items() if _is_video(n)}
    out = {VISION_PREFIX + k: v for k, v in internvideo2.to_official(VISION, model, video).items()}
    for name, tensor in state.items():
        if _is_video(name):
            continue
        if hf_bert.is_text(name):
            out.update({TEXT_PREFIX + k: v for k, v in
                        hf_bert.to_hf(name, tensor, model.text, vocab).items()})
        elif beats.is_audio(name):
            out.update({AUDIO_PREFIX + k: v for k, v in
                        beats.to_beats(name, tensor, model.audio).items()})
        else:
            out[head_key(name)] = tensor
    predictions = f"{TEXT_PREFIX}cls.predictions."
    out[predictions + "decoder.weight"] = out[f"{TEXT_PREFIX}bert.{hf_bert.WORD_EMBEDDINGS}"]
    out[predictions + "decoder.bias"] = out[predictions + "bias"]
    return out


__all__ = ["from_official", "head_key", "to_official"]
