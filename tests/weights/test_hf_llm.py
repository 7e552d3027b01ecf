"""Mistral weights in the Hugging Face layout: import into TP/PP shards and export back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megavideo.config import load_config
from megavideo.weights.hf_llm import hf_keys, to_hf, to_megatron
from tests.distributed import spawn
from tests.weights import hf_worker

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "stage3_tiny.yaml")


def _random_mistral(llm) -> dict[str, torch.Tensor]:
    """A randomly initialised Mistral of the config's shape, in the Hugging Face layout (bf16)."""
    g = torch.Generator().manual_seed(0)
    head = llm.hidden_size // llm.num_heads
    shapes = {"model.embed_tokens.weight": (llm.vocab_size, llm.hidden_size),
              "model.norm.weight": (llm.hidden_size,),
              "lm_head.weight": (llm.vocab_size, llm.hidden_size)}
    for i in range(llm.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (llm.hidden_size,),
                   p + "post_attention_layernorm.weight": (llm.hidden_size,),
                   p + "self_attn.q_proj.weight": (llm.num_heads * head, llm.hidden_size),
                   p + "self_attn.k_proj.weight": (llm.num_kv_heads * head, llm.hidden_size),
                   p + "self_attn.v_proj.weight": (llm.num_kv_heads * head, llm.hidden_size),
                   p + "self_attn.o_proj.weight": (llm.hidden_size, llm.num_heads * head),
                   p + "mlp.gate_proj.weight": (llm.mlp_hidden_size, llm.hidden_size),
                   p + "mlp.up_proj.weight": (llm.mlp_hidden_size, llm.hidden_size),
                   p + "mlp.down_proj.weight": (llm.hidden_size, llm.mlp_hidden_size)}
    return {k: (0.05 * torch.randn(s, generator=g) + (1.0 if k.endswith("norm.weight") else 0))
            .to(torch.bfloat16) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    llm = load_config(CONFIG).model.llm
    original = _random_mistral(llm)
    (tmp / "hf").mkdir()
    save_file(original, str(tmp / "hf" / "model.safetensors"))
    base = [f"model.llm.weights={tmp / 'hf'}", "run.tensorboard=false", "train.micro_batch=2",
            "train.global_batch=2", "parallel.encoder_tp=0"]
    spawn(1, hf_worker.logits, CONFIG, base + ["parallel.tp=1", "parallel.pp=1", "parallel.sp=false"],
          str(tmp / "tp1.pt"))
    spawn(4, hf_worker.logits, CONFIG, base + ["parallel.tp=2", "parallel.pp=2", "parallel.sp=true",
                                               "parallel.encoder_tp=1"],
          str(tmp / "tp2pp2.pt"), str(tmp / "ckpt"))
    subprocess.run([sys.executable, "-m", "launch.convert", "export", CONFIG, "--checkpoint",
                    str(tmp / "ckpt"), "--out", str(tmp / "exported")], cwd=ROOT, check=True,
                   timeout=300)
    return tmp, original


def test_import_at_tp2_pp2_gives_the_logits_of_tp1(imported):
    tmp, _ = imported
    one, split = torch.load(tmp / "tp1.pt"), torch.load(tmp / "tp2pp2.pt")
    assert one.shape == split.shape and one.shape[-1] == 256
    assert torch.allclose(one, split, rtol=1e-5, atol=1e-5), (one - split).abs().max()


def test_import_then_export_round_trip_is_exact(imported):
    tmp, original = imported
    exported = load_file(str(tmp / "exported" / "model.safetensors"))
    assert set(exported) == set(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    assert (tmp / "exported" / "config.json").is_file()


def test_fused_layouts_invert():
    llm = load_config(CONFIG).model.llm
    hf = _random_mistral(llm)
    for name in ("llm.decoder.layers.1.self_attention.linear_qkv.weight",
                 "llm.decoder.layers.1.mlp.linear_fc1.weight"):
        fused = to_megatron(name, [hf[k] for k in hf_keys(name)], llm)
        assert all(torch.equal(hf[k], v) for k, v in to_hf(name, fused, llm).items())


@pytest.fixture(scope="module")
def transformers_mistral(tmp_path_factory):
    """A tiny random MistralForCausalLM built locally (transformers), its norms away from their
    all-ones initialisation, saved with save_pretrained; token ids for it."""
    transformers = pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("mistral")
    llm = load_config(CONFIG).model.llm
    config = transformers.MistralConfig(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.mlp_hidden_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads, max_position_embeddings=llm.max_positions,
        rope_theta=llm.rope_base, rms_norm_eps=llm.norm_eps, tie_word_embeddings=False,
        sliding_window=None, head_dim=llm.hidden_size // llm.num_heads)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp / "hf")
    ids = torch.randint(0, llm.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    return transformers, model, tmp, ids


def _relative(got: torch.Tensor, reference: torch.Tensor) -> float:
    return ((got - reference).abs().max() / reference.abs().max()).item()


def test_the_imported_llm_equals_transformers_mistral(transformers_mistral):
    """Imported at tp 1 and tp 2, the LLM's logits on token ids equal transformers' in fp32
    (exactly at tp 1)."""
    _, model, tmp, ids = transformers_mistral
    spawn(2, hf_worker.llm_logits, CONFIG, str(tmp / "hf"), ids, str(tmp / "out.pt"))
    got = torch.load(tmp / "out.pt")
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    assert torch.equal(got[1], reference)  # measured: the same fp32 operations, bit for bit
    relative = _relative(got[2], reference)
    assert relative < 1e-5, relative  # measured 3.7e-7: the row-parallel sums split over 2 ranks


def test_the_llm_with_lora_equals_transformers_mistral_with_lora_merged(transformers_mistral):
    """The imported LLM with LoRA adapters on q, k, v, o, gate, up, down and lm_head (random
    values, as of a LoRA that has trained: the same whole tensors at tp 1 and tp 2), exported
    with the adapters merged and read back by transformers: its logits equal transformers'
    within 1e-5 relative at both layouts, and the export differs from the base model on every
    projection."""
    transformers, model, tmp, ids = transformers_mistral
    spawn(2, hf_worker.llm_logits, CONFIG, str(tmp / "hf"), ids, str(tmp / "lora.pt"), True)
    got = torch.load(tmp / "lora.pt")
    merged = transformers.MistralForCausalLM.from_pretrained(tmp / "lora.pt.merged").eval()
    with torch.no_grad():
        reference = merged(input_ids=ids).logits
    base, after = model.state_dict(), merged.state_dict()
    assert {k for k in base if not torch.equal(base[k], after[k])} == \
        {k for k in base if k.endswith("_proj.weight") or k == "lm_head.weight"}
    for tp in (1, 2):  # measured 5.5e-7 and 5.0e-7: W x + s B A x against (W + s B A) x
        relative = _relative(got[tp], reference)
        assert relative < 1e-5, (tp, relative)
