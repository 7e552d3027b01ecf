"""The stage-3 QFormer from BERT in the Hugging Face layout (transformers' BertModel, a tiny
random one built locally) and from a released VideoChat2-style QFormer file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megavideo.config import load_config
from megavideo.weights.hf_bert import interleave
from tests.distributed import spawn
from tests.weights import hf_worker

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "stage3_tiny.yaml")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny random BertModel of the tiny QFormer's shape, with zero position and token-type
    embeddings (so its embeddings are LayerNorm(inputs)), its FFN and embedding norms away from
    1/0; the QFormer imported from it at encoder tp 1 and 2."""
    transformers = pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("qformer")
    cfg = load_config(CONFIG)
    q = cfg.model.qformer
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=q.hidden_size, num_hidden_layers=q.num_layers,
        num_attention_heads=q.num_heads, intermediate_size=q.mlp_hidden_size,
        layer_norm_eps=q.norm_eps, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        model.embeddings.position_embeddings.weight.zero_()
        model.embeddings.token_type_embeddings.weight.zero_()
        for name, param in model.named_parameters():
            if "output.LayerNorm" in name and "attention" not in name or "embeddings.LayerNorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp / "bert")
    spawn(2, hf_worker.qformer_hidden, CONFIG, str(tmp / "bert"), str(tmp / "out.pt"))
    return model, torch.load(tmp / "out.pt"), tmp


def test_the_qformer_from_bert_equals_transformers_bert(bert):
    """With the (fresh) cross-attention adding nothing, the QFormer's layers are BERT's encoder
    on its query tokens: within 1e-5 of transformers' BertModel at encoder tp 1 and 2."""
    model, got, _ = bert
    for tp, (hidden, state) in got.items():
        queries = torch.cat([state["qformer.queries"], state["qformer.extra_queries"]]).transpose(0, 1)
        with torch.no_grad():
            reference = model(inputs_embeds=queries).last_hidden_state.transpose(0, 1)
        error = ((hidden - reference).abs().max() / reference.abs().max()).item()
        assert error < 1e-5, (tp, error)  # measured 8.1e-8 at both


def test_what_bert_lacks_keeps_the_official_initialisation(bert):
    model, got, _ = bert
    hf = model.state_dict()
    _, state = got[1]
    assert torch.equal(state["qformer.extra_queries"], torch.zeros_like(state["qformer.extra_queries"]))
    assert 0.01 < state["qformer.queries"].std() < 0.03  # N(0, 0.02)
    fused = interleave([hf[f"encoder.layer.1.attention.self.{p}.weight"] for p in ("query", "key", "value")],
                       model.config.num_attention_heads)
    assert torch.equal(state["qformer.layers.layers.1.self_attention.linear_qkv.weight"], fused)
    assert torch.equal(state["qformer.embed_norm.weight"], hf["embeddings.LayerNorm.weight"])
    cross = state["qformer.layers.layers.0.cross_attention.linear_q.weight"]
    assert 0.01 < cross.std() < 0.03  # a fresh BERT layer's, as VideoChat2 starts it
    assert torch.equal(got[2][1]["qformer.layers.layers.1.mlp.linear_fc1.weight"],
                       hf["encoder.layer.1.intermediate.dense.weight"])


def test_a_released_qformer_file_gives_every_part(bert, tmp_path):
    """VideoChat2's names (``qformer.bert.*`` with the queries' own FFN, ``query_tokens``,
    ``extra_query_tokens``, ``vision_layernorm``, ``mistral_proj``): every QFormer parameter
    comes from the file."""
    _, got, tmp = bert
    _, state = got[1]
    g = torch.Generator().manual_seed(2)
    released = {}
    for name, tensor in state.items():
        released.update(_released(name, tensor + 0.01 * torch.randn(tensor.shape, generator=g)))
    save_file(released, str(tmp_path / "qformer.safetensors"))
    spawn(2, hf_worker.qformer_hidden, CONFIG, str(tmp_path / "qformer.safetensors"),
          str(tmp_path / "out.pt"))
    for tp, (_, loaded) in torch.load(tmp_path / "out.pt").items():
        for name in state:
            parts = _released(name, loaded[name])
            assert all(torch.equal(released[k], v) for k, v in parts.items()), (tp, name)


def _released(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A single-rank QFormer parameter under VideoChat2's names (its fused qkv split per head)."""
    from megavideo.weights.hf_bert import IN_LAYER, split_heads

    cfg = load_config(CONFIG).model.qformer
    kind = name.rsplit(".", 1)[-1]
    top = {"qformer.queries": "query_tokens", "qformer.extra_queries": "extra_query_tokens",
           "qformer.video_norm": "vision_layernorm",
           "qformer.embed_norm": "qformer.bert.embeddings.LayerNorm", "qformer.proj": "mistral_proj"}
    if name in top:
        return {top[name]: tensor.transpose(0, 1).contiguous()}
    stem = name.rsplit(".", 1)[0]
    if stem in top:
        return {f"{top[stem]}.{kind}": tensor}
    _, _, _, layer, module = stem.split(".", 4)
    parts = [{"intermediate.dense": "intermediate_query.dense", "output.dense": "output_query.dense",
              "output.LayerNorm": "output_query.LayerNorm"}.get(p, p) for p in IN_LAYER[module]]
    tensors = split_heads(tensor, cfg.num_heads, len(parts)) if len(parts) > 1 else [tensor]
    return {f"qformer.bert.encoder.layer.{layer}.{p}.{kind}": t.contiguous()
            for p, t in zip(parts, tensors, strict=True)}
