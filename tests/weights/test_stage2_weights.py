"""Released InternVideo2 stage-2 checkpoints in and out: the official key layout, an exact round
trip through a MegaVideo checkpoint (launch.convert), one sentence for keys of another model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataloaders.tokenizer import WordPiece
from megavideo.config import load_config, padded_vocab
from megavideo.weights.internvideo2 import KeyMismatch, meta_params
from megavideo.weights.stage2 import from_official, to_official
from parallel.distributed import single_rank_world

ROOT = Path(__file__).resolve().parents[2]
TINY = "configs/stage2_tiny.yaml"
CFG = load_config(ROOT / TINY)
VOCAB = len(WordPiece.from_file(ROOT / CFG.model.text.vocab_file))


@pytest.fixture(scope="module")
def ours() -> dict[str, torch.Tensor]:
    """A random stage-2 model in MegaVideo's single-rank layout (vocabulary padding rows zero)."""
    with single_rank_world():
        params = meta_params(CFG)["student"]
    g = torch.Generator().manual_seed(0)
    state = {name: torch.randn(p.shape, generator=g) for name, p in params.items()}
    for name in ("text.word_embeddings.weight", "mlm_head.decoder.bias"):
        state[name][VOCAB:] = 0
    return state


def test_the_official_layout(ours):
    official = to_official(CFG.model, ours, VOCAB)
    words = official["text_encoder.bert.embeddings.word_embeddings.weight"]
    assert words.shape[0] == VOCAB < padded_vocab(VOCAB)
    assert torch.equal(official["text_encoder.cls.predictions.decoder.weight"], words)
    for key in ("vision_encoder.blocks.1.attn.qkv.weight", "vision_encoder.clip_projector.cross_attn.q_bias",
                "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight",
                "audio_encoder.encoder.layers.1.self_attn.grep_a",
                "audio_encoder.encoder.layers.1.self_attn.relative_attention_bias.weight",
                "av_concat_vision_proj.1.weight", "av_concat_audio_proj.0.bias", "av_fusion.weight",
                "avtm_head.weight", "itm_head.bias", "temp"):
        assert key in official, key
    assert official["temp"].shape == ()


def test_import_inverts_export_exactly(ours):
    official = to_official(CFG.model, ours, VOCAB)
    official["vision_encoder.clip_decoder.0.head.weight"] = torch.zeros(2, 2)  # stage-1 leftovers
    official["text_encoder.bert.embeddings.position_ids"] = torch.arange(8)[None]
    back = from_official(CFG.model, official, list(ours), VOCAB)
    assert set(back) == set(ours)
    for name, tensor in ours.items():
        assert torch.equal(back[name], tensor), name


def test_another_models_keys_are_one_sentence(ours):
    official = to_official(CFG.model, ours, VOCAB)
    del official["itm_head.weight"]
    official["vision_encoder.blocks.9.attn.qkv.weight"] = torch.zeros(1)
    with pytest.raises(KeyMismatch, match=r"^the vision state dict does not match the config: "
                                          r"1 unknown \(blocks\.9\.attn\.qkv\.weight\)\.$"):
        from_official(CFG.model, official, list(ours), VOCAB)
    del official["vision_encoder.blocks.9.attn.qkv.weight"]
    official["text_encoder.extra"] = torch.zeros(1)
    with pytest.raises(KeyMismatch, match=r"^the stage-2 state dict does not match the config: "
                                          r"1 missing \(itm_head\.weight\); 1 unknown "
                                          r"\(text_encoder\.extra\)\.$"):
        from_official(CFG.model, official, list(ours), VOCAB)


def test_convert_round_trip_through_a_checkpoint(ours, tmp_path):
    official = to_official(CFG.model, ours, VOCAB)
    torch.save({"model": official}, tmp_path / "released.pt")
    for args in (["import", TINY, "--stage2", str(tmp_path / "released.pt"), "--out",
                  str(tmp_path / "ckpt")],
                 ["export", TINY, "--checkpoint", str(tmp_path / "ckpt"), "--out",
                  str(tmp_path / "out")]):
        proc = subprocess.run([sys.executable, "-m", "launch.convert", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    exported = torch.load(tmp_path / "out" / "stage2.pth")
    assert set(exported) == set(official)
    for key, tensor in official.items():
        assert torch.equal(exported[key], tensor), key


def test_an_own_image_table_round_trips():
    """InternVideo2-1B keeps vision_encoder.img_pos_embed: read and written with
    model.image_pos_embed own, skipped otherwise."""
    cfg = load_config(ROOT / TINY, ["model.image_pos_embed=own"])
    with single_rank_world():
        params = meta_params(cfg)["student"]
    state = {name: torch.randn(p.shape) for name, p in params.items()}
    for name in ("text.word_embeddings.weight", "mlm_head.decoder.bias"):
        state[name][VOCAB:] = 0
    official = to_official(cfg.model, state, VOCAB)
    assert official["vision_encoder.img_pos_embed"].shape == (1, *state["embed.img_pos_embed"].shape)
    back = from_official(cfg.model, official, list(state), VOCAB)
    assert torch.equal(back["embed.img_pos_embed"], state["embed.img_pos_embed"])
    mean = from_official(CFG.model, official, [n for n in state if n != "embed.img_pos_embed"],
                         VOCAB)
    assert "embed.img_pos_embed" not in mean
