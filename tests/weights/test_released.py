"""Released weights in: bert-large-uncased's layout (Hugging Face BertForMaskedLM) and official
BEATs files, imported at tp 1 and tp 2, against transformers' BERT and an independent BEATs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dataloaders.tokenizer import WordPiece
from megavideo.config import ConfigError, load_config
from megavideo.weights.adapters import HuggingFaceBert, OfficialBeats
from tests.distributed import spawn
from tests.models.beats_reference import beats_forward, random_beats
from tests.weights import bert_worker

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
CONFIG = load_config(ROOT / "configs" / "stage2_tiny.yaml")
TEXT, AUDIO = CONFIG.model.text, CONFIG.model.audio
BEATS_CFG = {"encoder_layers": AUDIO.num_layers, "encoder_embed_dim": AUDIO.hidden_size,
             "encoder_ffn_embed_dim": AUDIO.mlp_hidden_size,
             "encoder_attention_heads": AUDIO.num_heads, "embed_dim": AUDIO.patch_dim,
             "input_patch_size": AUDIO.patch_size, "conv_pos": AUDIO.pos_conv_kernel,
             "conv_pos_groups": AUDIO.pos_conv_groups, "deep_norm": True,
             "relative_position_embedding": True, "gru_rel_pos": True,
             "num_buckets": AUDIO.num_buckets, "max_distance": AUDIO.max_distance,
             "layer_norm_first": False, "dropout": 0.1, "encoder_layerdrop": 0.05}


def _bert(vocab: int):
    config = transformers.BertConfig(
        vocab_size=vocab, hidden_size=TEXT.hidden_size, num_hidden_layers=TEXT.num_layers,
        num_attention_heads=TEXT.num_heads, intermediate_size=TEXT.mlp_hidden_size,
        max_position_embeddings=TEXT.max_positions, layer_norm_eps=TEXT.norm_eps,
        hidden_act="gelu")
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():  # norms and biases away from their 1 / 0 initialisation
        for name, param in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("released")
    tokenizer = WordPiece.from_file(TEXT.vocab_file)
    bert = _bert(len(tokenizer))
    bert.save_pretrained(tmp / "bert")
    beats = random_beats(BEATS_CFG)
    torch.save({"cfg": BEATS_CFG, "model": beats}, tmp / "beats.pt")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, len(tokenizer), (2, TEXT.max_length), generator=g)
    ids[:, 0] = tokenizer.cls
    mask = torch.ones_like(ids)
    mask[1, 5:], ids[1, 5:] = 0, tokenizer.pad
    fbank = torch.randn(2, AUDIO.frames, AUDIO.mel_bins, generator=g)
    spawn(2, bert_worker.outputs, str(tmp / "bert"), str(tmp / "beats.pt"), ids, mask, fbank,
          str(tmp / "runs"), str(tmp / "out.pt"))
    with torch.no_grad():
        reference = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return {"got": torch.load(tmp / "out.pt"), "bert": reference, "mask": mask.bool(),
            "beats": beats_forward(beats, BEATS_CFG, fbank), "beats_state": beats,
            "fbank": fbank, "tmp": tmp}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("tp", [1, 2, "unfused"])
def test_bert_import_equals_transformers(imported, tp):
    got, ref, real = imported["got"][tp], imported["bert"], imported["mask"]
    assert _relative(got["hidden"][real], ref.hidden_states[-1][real]) < 1e-5
    assert _relative(got["logits"][real], ref.logits[real]) < 1e-5


@pytest.mark.parametrize("tp", [1, 2])
def test_fusion_cross_attention_starts_as_a_fresh_bert_layer(imported, tp):
    """bert-large has no cross-attention: the official code gets BERT's initialisation for it
    (weights N(0, 0.02), zero biases, LayerNorm 1 and 0), as here."""
    cross = imported["got"][tp]["cross"]
    assert cross, "no cross-attention parameters"
    for name, tensor in cross.items():
        if name.endswith("layernorm.weight"):
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        elif name.endswith("bias"):
            assert torch.equal(tensor, torch.zeros_like(tensor)), name
        else:
            assert abs(tensor.std().item() - 0.02) < 0.004, name


@pytest.mark.parametrize("tp", [1, 2, "unfused"])
def test_beats_import_equals_the_reference_forward(imported, tp):
    assert _relative(imported["got"][tp]["audio"], imported["beats"]) < 1e-5


def test_the_reference_sees_the_relative_position_bias(imported):
    """The comparison above would catch a missing bias: without it the output moves by far more
    than the tolerance."""
    state = dict(imported["beats_state"])
    for key in state:
        if key.endswith("relative_attention_bias.weight"):
            state[key] = torch.zeros_like(state[key])
    unbiased = beats_forward(state, BEATS_CFG, imported["fbank"])
    assert _relative(unbiased, imported["beats"]) > 1e-2


def test_files_of_another_model_are_refused_in_one_sentence(imported):
    tmp = imported["tmp"]
    with pytest.raises(ConfigError, match=r"is not a BertForMaskedLM checkpoint .*no "
                                          r"bert\.embeddings\.word_embeddings\.weight"):
        HuggingFaceBert(str(tmp / "beats.pt"), TEXT, 16)
    with pytest.raises(ConfigError, match=r"is not a BEATs checkpoint \(it has no "
                                          r"patch_embedding\.weight\)"):
        OfficialBeats(str(tmp / "bert"), AUDIO)
    other = dict(BEATS_CFG, encoder_layers=3, max_distance=1280)
    torch.save({"cfg": other, "model": imported["beats_state"]}, tmp / "other.pt")
    with pytest.raises(ConfigError, match=r"holds another BEATs than model.audio: encoder_layers "
                                          r"3 != model.audio.num_layers 2; max_distance 1280"):
        OfficialBeats(str(tmp / "other.pt"), AUDIO)


def test_tensorflow_layernorm_names_and_a_plain_positional_convolution_are_read(imported):
    """Old BERT files spell LayerNorm's parameters gamma/beta; some InternVideo2 BEATs copies have
    a plain positional convolution weight instead of its weight norm."""
    tmp = imported["tmp"]
    from safetensors.torch import load_file

    state = load_file(str(tmp / "bert" / "model.safetensors"))
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                        "LayerNorm.beta"): v
              for k, v in state.items()}
    torch.save(legacy, tmp / "legacy.bin")
    bert = HuggingFaceBert(str(tmp / "legacy.bin"), TEXT, len(WordPiece.from_file(TEXT.vocab_file)))
    name = "text.layers.layers.1.input_layernorm.bias"
    assert bert.find(bert.sources(name)[0]).endswith("LayerNorm.beta")
    beats = dict(imported["beats_state"])
    g, v = beats.pop("encoder.pos_conv.0.weight_g"), beats.pop("encoder.pos_conv.0.weight_v")
    beats["encoder.pos_conv.0.weight"] = g * v / v.norm(dim=(0, 1), keepdim=True)
    torch.save({"cfg": BEATS_CFG, "model": beats}, tmp / "plain.pt")
    adapter = OfficialBeats(str(tmp / "plain.pt"), AUDIO)
    g_name = "audio.pos_conv.parametrizations.weight.original0"
    magnitude = adapter.read(g_name, (1, 1, AUDIO.pos_conv_kernel))
    assert torch.allclose(magnitude, g, rtol=1e-5)
