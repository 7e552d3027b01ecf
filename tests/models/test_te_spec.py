"""What the Transformer Engine spec changes, shown on the CPU: parameter names and attention masks.

TE cannot build a module without CUDA, so the TE spec's module tree is built with stand-ins that
have TE's parameter layout (:mod:`tests.models.te_twins`); the GPU check builds the real one
(``te_names`` in :mod:`megavideo.apps.gpu_check`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from megatron.core.transformer.attention import Attention

from kernels.backends import layer_backend, use_layer_backend
from megavideo.accounting.describe import meta_device, model_parts
from megavideo.config import load_config
from megavideo.models.specs import cross_attention_mask
from megavideo.models.text import padding_mask
from megavideo.training.state import FUSED_NORMS, canonical_name, named_parameters
from parallel.distributed import single_rank_world
from tests.models import te_twins

ROOT = Path(__file__).resolve().parents[2]
ONE_RANK = ["parallel.tp=1", "parallel.pp=1", "parallel.sp=false", "parallel.encoder_tp=0"]
# the attention of every model: (kind, mask type), as TE needs them (a padding type only where a
# padding mask is handed over; the LLM causal)
MASKS = {
    "student": {("SelfAttention", "no_mask")},
    "clip_teacher": {("SelfAttention", "no_mask")},
    "mae_teacher": {("SelfAttention", "no_mask")},
    "text": {("SelfAttention", "padding"), ("CrossAttention", "padding")},
    "audio": {("SelfAttention", "no_mask")},
    "qformer": {("SelfAttention", "no_mask"), ("CrossAttention", "no_mask")},
    "llm": {("SelfAttention", "causal")},
    "llm_lora": {("SelfAttention", "causal")},
}
# the models whose norms the TE spec holds inside the next linear (LoRA's adapters need them apart)
FUSED = {"student", "clip_teacher", "mae_teacher", "llm"}


def _configs() -> list:
    """The tiny configs of stages 1, 2 and 3 at one rank."""
    return [load_config(ROOT / "configs" / f"stage{i}_tiny.yaml", ONE_RANK) for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def parts():
    """Every model written to disk, built with the local spec and with the TE spec's layout."""
    configs = _configs()
    with pytest.MonkeyPatch.context() as monkeypatch, single_rank_world():
        te_twins.install(monkeypatch)
        built = {}
        for backend in ("local", "te"):
            with use_layer_backend(backend):
                built[backend] = model_parts(*configs)
    return built


def test_the_name_map_is_megatron_cores_own_declaration():
    assert FUSED_NORMS == {"self_attention.linear_qkv.layer_norm_": "input_layernorm.",
                           "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."}
    assert canonical_name("blocks.layers.3.self_attention.linear_qkv.layer_norm_weight") == \
        "blocks.layers.3.input_layernorm.weight"
    assert canonical_name("llm.decoder.layers.0.mlp.linear_fc1.layer_norm_bias") == \
        "llm.decoder.layers.0.pre_mlp_layernorm.bias"
    assert canonical_name("mlp.linear_fc1.layer_norm_weight") == "pre_mlp_layernorm.weight"
    assert canonical_name("text.layers.layers.0.input_layernorm.weight") == \
        "text.layers.layers.0.input_layernorm.weight"  # unfused names are their own


@pytest.mark.parametrize("part", sorted(MASKS))
def test_te_names_map_both_ways_onto_the_local_spec(parts, part):
    local, te = parts["local"][part], parts["te"][part]
    ours = dict(named_parameters(local))
    assert {n: tuple(p.shape) for n, p in ours.items()} == \
        {n: tuple(p.shape) for n, p in named_parameters(local)}  # canonical on the local spec
    raw = dict(te.named_parameters())
    back = {canonical_name(n): n for n in raw}  # canonical -> the TE build's own name
    assert len(back) == len(raw)  # one to one
    assert {n: tuple(raw[b].shape) for n, b in back.items()} == \
        {n: tuple(p.shape) for n, p in ours.items()}
    renamed = {n for n in raw if canonical_name(n) != n}
    assert bool(renamed) == (part in FUSED)
    assert all(".layer_norm_" in n for n in renamed)


def test_te_linears_without_bias_are_not_marked_as_head_parameters(parts):
    qkv = parts["te"]["student"].blocks.layers[0].self_attention.linear_qkv
    assert not isinstance(qkv.bias, torch.nn.Parameter) and not hasattr(qkv.bias, "head_padding")
    assert qkv.weight.head_padding[2] == _configs()[0].model.student.num_heads  # the weight is


@pytest.mark.parametrize("backend", ["local", "te"])
def test_attention_mask_types(parts, backend):
    for part, expected in MASKS.items():
        found = {(type(m).__name__, m.attn_mask_type.name) for m in parts[backend][part].modules()
                 if isinstance(m, Attention)}
        assert found == expected, part


def test_padded_video_tokens_get_a_padding_mask():
    from megavideo.models.specs import transformer_config
    from megavideo.models.vit import block_stack

    cfg = load_config(ROOT / "configs" / "stage1_tiny.yaml", ONE_RANK)
    config = transformer_config(cfg.model.student, cfg.parallel, cfg.train, pipelined=False,
                                sequence_parallel=False)
    with single_rank_world(), meta_device():
        for padded, kind in ((True, "padding"), (False, "no_mask")):
            stack = block_stack(cfg.model.student, config, 1, padded=padded)
            assert stack.layers[0].self_attention.attn_mask_type.name == kind


def test_cross_attention_mask_as_each_backend_reads_it():
    kv = padding_mask(torch.tensor([[1, 1, 0], [1, 0, 0]]))  # [2, 1, 1, 3], True on absent
    with use_layer_backend("local"):
        assert cross_attention_mask(kv, 5) is kv
    with use_layer_backend("te"):
        query, memory = cross_attention_mask(kv, 5)
    assert memory is kv
    assert query.shape == (2, 1, 1, 5) and query.dtype == torch.bool and not query.any()
    assert cross_attention_mask(None, 5) is None


@pytest.mark.parametrize("backend", ["local", "te"])
def test_fusion_layers_hand_their_attention_the_backends_masks(backend, monkeypatch):
    """BERT's fusion layer (built with the local spec, run under each backend's mask rule): the
    self-attention gets the text's [b, 1, 1, L] mask, the cross-attention the local broadcast
    mask or TE's (query, memory) pair."""
    configs = _configs()
    with single_rank_world():
        text = model_parts(*configs)["text"]
        _run_fusion_layer(text, configs[1], backend, monkeypatch)


def _run_fusion_layer(text, cfg, backend: str, monkeypatch) -> None:
    layer = text.layers.layers[text.first_fusion]
    seen = {}

    def attend(kind):
        def run(x, attention_mask=None, key_value_states=None, **_kwargs):
            seen[kind] = attention_mask
            return torch.zeros_like(x), None
        return run

    monkeypatch.setattr(layer.self_attention, "forward", attend("self"))
    monkeypatch.setattr(layer.cross_attention, "forward", attend("cross"))
    ids_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    memory_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    x = torch.randn(4, 2, cfg.model.text.hidden_size)
    memory = torch.randn(6, 2, layer.cross_attention.linear_kv.weight.shape[1])
    with use_layer_backend(backend):
        assert layer_backend() == backend
        layer(x, padding_mask(ids_mask), memory, padding_mask(memory_mask))
    assert torch.equal(seen["self"], padding_mask(ids_mask))
    if backend == "local":
        assert torch.equal(seen["cross"], padding_mask(memory_mask))
    else:
        query, kv = seen["cross"]
        assert query.shape == (2, 1, 1, 4) and not query.any()
        assert torch.equal(kv, padding_mask(memory_mask))


def test_models_on_the_meta_device_use_the_local_spec():
    with use_layer_backend("te"):
        with meta_device():
            assert layer_backend() == "local"
        assert layer_backend() == "te"


def _right_padded(mask: torch.Tensor) -> bool:
    """[b, n] with 1 (or True) on present tokens: every row's present tokens come first."""
    return bool((mask.long().diff(dim=1) <= 0).all())  # never absent, then present again


def test_silent_clips_mask_the_end_of_the_audio_video_memory():
    """TE's fused attention reads a padding mask as sequence lengths (the present tokens first):
    the stage-2 [video ; audio] memory of a clip without audio has its masked tokens last."""
    from megavideo.accounting.describe import whole_models
    from megavideo.models.stage2 import Stage2Batch

    cfg = load_config(ROOT / "configs" / "stage2_tiny.yaml", ONE_RANK)
    with single_rank_world():
        model, _ = whole_models(cfg)
        audio = cfg.model.audio
        batch = Stage2Batch(drop_u=torch.zeros(2, 1, 2), loss_scale=1.0,
                            fbank=torch.randn(2, audio.frames, audio.mel_bins),
                            has_audio=torch.tensor([True, False]))
        width = cfg.model.objectives.fusion_dim
        memory, memory_mask = torch.randn(7, 2, width), torch.ones(2, 7, dtype=torch.long)
        v = torch.randn(2, cfg.model.objectives.embed_dim)
        _, av_memory, av_mask = model._audio_video(batch, v, memory, memory_mask)
    assert torch.equal(av_memory[:7], memory)  # the video tokens first
    assert av_mask[0].all() and av_mask[1, :7].all() and not av_mask[1, 7:].any()
    assert _right_padded(av_mask)
    assert not _right_padded(torch.tensor([[0, 1, 1]]))
