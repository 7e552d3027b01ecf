"""The QFormer reading text (VideoChat2's ``qformer_text_input``, the align sub-stage's captions)
against transformers' InstructBLIP QFormer (the same BLIP-2 layer: one self-attention over
queries and text, cross-attention for the queries only, an FFN each), a tiny random one built
locally and written under VideoChat2's names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dataloaders.tokenizer import QFormerText
from megavideo.config import load_config
from megavideo.weights.qformer import to_megatron
from tests.distributed import spawn
from tests.weights import hf_worker

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "stage3_tiny.yaml")
VOCAB = str(ROOT / "configs" / "vocab" / "synthetic.txt")


def _videochat2_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' InstructBLIP QFormer keys -> VideoChat2's ``qformer.bert.*``."""
    out = {}
    for key, tensor in state.items():
        key = key.replace("attention.attention.", "attention.self.")
        key = key.replace("embeddings.layernorm", "embeddings.LayerNorm")
        out[f"qformer.bert.{key}"] = tensor.contiguous()
    return out


@pytest.fixture(scope="module")
def instructblip(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("qformer_text")
    cfg = load_config(CONFIG)
    q, width = cfg.model.qformer, cfg.model.student.hidden_size
    config = transformers.InstructBlipQFormerConfig(
        vocab_size=len(QFormerText(VOCAB)), hidden_size=q.hidden_size,
        num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
        intermediate_size=q.mlp_hidden_size, layer_norm_eps=q.norm_eps, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        cross_attention_frequency=q.cross_attention_every, encoder_hidden_size=width,
        max_position_embeddings=q.max_positions)
    torch.manual_seed(0)
    model = transformers.InstructBlipQFormerModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name or "layernorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    state = _videochat2_names(model.state_dict())
    state["query_tokens"] = 0.02 * torch.randn(1, q.num_queries, q.hidden_size)
    state["extra_query_tokens"] = 0.02 * torch.randn(1, q.extra_queries, q.hidden_size)
    save_file(state, str(tmp / "qformer.safetensors"))
    spawn(2, hf_worker.qformer_text_hidden, CONFIG, str(tmp / "qformer.safetensors"), VOCAB,
          str(tmp / "out.pt"))
    return model, torch.load(tmp / "out.pt")


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _close(tp: int, ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Bit for bit at encoder tp 1 (measured), within 1e-5 relative at tp 2."""
    if tp == 1:
        assert torch.equal(ours, reference)
    else:
        assert _error(ours, reference) < 1e-5


def _reference(model, got: dict, with_queries: bool = True, with_text: bool = True):
    ids, mask = got["ids"], got["mask"]
    queries = got["queries"].transpose(0, 1).expand(ids.shape[0], -1, -1)
    q = queries.shape[1] if with_queries else 0
    if not with_text:
        ids, mask = ids[:, :0], mask[:, :0]
    attention = torch.cat([torch.ones(ids.shape[0], q, dtype=torch.long), mask.long()], dim=1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention,
                    query_embeds=queries if with_queries else None,
                    encoder_hidden_states=got["memory"].transpose(0, 1) if with_queries else None)
    return out.last_hidden_state.transpose(0, 1)  # [Q + L, B, H]


def test_queries_and_text_equal_instructblip(instructblip):
    """Queries and the instruction seeing each other, the queries cross-attending to the
    video: InstructBlipQFormerModel's outputs bit for bit at encoder tp 1, 2.0e-7 relative at
    tp 2 (measured)."""
    model, got = instructblip
    for tp, out in got.items():
        _close(tp, out["joint"], _reference(model, out))


def test_text_alone_is_bert_with_its_own_ffn(instructblip):
    """Bit for bit at tp 1, 7.1e-8 at tp 2 (measured)."""
    model, got = instructblip
    for tp, out in got.items():
        _close(tp, out["text"], _reference(model, out, with_queries=False))


def test_captioning_keeps_the_queries_blind_to_the_text_and_the_text_causal(instructblip):
    """Under the captioning mask the queries' outputs are InstructBLIP's queries alone (as
    VideoChat2 caches them: bit for bit at tp 1, 1.4e-7 at tp 2, measured), and a text token's
    output does not depend on the tokens after it."""
    model, got = instructblip
    for tp, out in got.items():
        q = out["queries"].shape[0]
        alone = _reference(model, out, with_text=False)
        _close(tp, out["causal"][:q], alone)
        assert torch.equal(out["causal"][: q + 4], out["causal_changed"][: q + 4]), tp
        assert not torch.allclose(out["causal"][q + 4:, 0], out["causal_changed"][q + 4:, 0])


def test_a_bert_base_vocabulary_gains_the_dec_row():
    """bert-base-uncased's 30522 rows become the QFormer's 30523 (with [DEC], drawn N(0, 0.02)),
    padded with zero rows; a file that already has [DEC] is read as it is."""
    qformer = load_config(CONFIG).model.qformer
    table = torch.randn(16, 8)
    padded = to_megatron("qformer.word_embeddings.weight", [table], qformer, 17)
    assert torch.equal(padded[:16], table) and padded[16].abs().max() < 0.1
    assert padded[16].abs().sum() > 0 and not padded[17:].any()
    assert torch.equal(to_megatron("qformer.word_embeddings.weight", [padded[:17]], qformer,
                                   17)[:17], padded[:17])
    with pytest.raises(ValueError, match="rows"):
        to_megatron("qformer.word_embeddings.weight", [table[:10]], qformer, 17)
