"""The released InternVideo2-Chat-8B layout (model.weights): a tiny stage-3 model written under
the released file's names (video encoder, QFormer with its text, Mistral with peft's unmerged
LoRA) imports back exactly at tp 1 and tp 2, its names are the released index's, and peft's
adapters merge to what the Mistral export (checked against transformers) writes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dataloaders.tokenizer import QFormerText
from megavideo.config import load_config
from megavideo.weights import hf_llm, videochat2
from tests.distributed import spawn
from tests.weights import hf_worker
from tests.weights.test_qformer_weights import _released

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "stage3_tiny.yaml")
VOCAB = ROOT / "configs" / "vocab" / "synthetic.txt"
MODEL = ["model.llm.tuning=lora", "model.llm.lora_rank=4", "model.qformer.text_input=true",
         f"model.qformer.vocab_file={VOCAB}"]
# the distinct key patterns of OpenGVLab/InternVideo2-Chat-8B's model.safetensors.index.json
# (layer numbers as N), the tensors the stage-3 model reads
RELEASED = {
    "vision_encoder.cls_token", "vision_encoder.pos_embed",
    "vision_encoder.patch_embed.proj.weight", "vision_encoder.patch_embed.proj.bias",
    *(f"vision_encoder.blocks.N.{k}" for k in (
        "norm1.weight", "attn.qkv.weight", "attn.q_norm.weight", "attn.k_norm.weight",
        "attn.proj.weight", "attn.proj.bias", "ls1", "norm2.weight", "mlp.fc1.weight",
        "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2")),
    "vision_layernorm.weight", "vision_layernorm.bias", "query_tokens", "extra_query_tokens",
    "project_up.weight", "project_up.bias",
    "lm.base_model.model.model.embed_tokens.weight", "lm.base_model.model.model.norm.weight",
    "lm.base_model.model.lm_head.weight",
    *(f"lm.base_model.model.lm_head.lora_{x}.default.weight" for x in "AB"),
    *(f"lm.base_model.model.model.layers.N.{k}" for k in (
        "input_layernorm.weight", "post_attention_layernorm.weight")),
    *(f"lm.base_model.model.model.layers.N.{m}.{p}.{w}" for m, ps in (
        ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("mlp", ("gate_proj", "up_proj", "down_proj")))
      for p in ps for w in ("weight", "lora_A.default.weight", "lora_B.default.weight")),
}


def _qformer(name: str, tensor: torch.Tensor, vocab: int) -> dict[str, torch.Tensor]:
    """A QFormer parameter under VideoChat2's names, its text parts included."""
    bert = "qformer.bert."
    if name == "qformer.word_embeddings.weight":
        return {f"{bert}embeddings.word_embeddings.weight": tensor[:vocab]}
    if name == "qformer.position_embeddings.weight":
        return {f"{bert}embeddings.position_embeddings.weight": tensor}
    match = re.match(r"qformer\.layers\.layers\.(\d+)\.(text_mlp\.linear_fc1|text_mlp\.linear_fc2|"
                     r"text_mlp_norm)\.(weight|bias)$", name)
    if match:
        layer, module, kind = match.groups()
        part = {"text_mlp.linear_fc1": "intermediate.dense", "text_mlp.linear_fc2": "output.dense",
                "text_mlp_norm": "output.LayerNorm"}[module]
        return {f"{bert}encoder.layer.{layer}.{part}.{kind}": tensor}
    out = _released(name, tensor)
    return {("project_up" + k.removeprefix("mistral_proj") if k.startswith("mistral_proj") else k): v
            for k, v in out.items()}


def _file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stage-3 single-rank state under the released names."""
    model = load_config(CONFIG, MODEL).model
    out = videochat2.llm_to_file({k: v for k, v in state.items() if k.startswith("llm.")}, model)
    for name, tensor in state.items():
        if name.startswith("video."):
            out[videochat2.video_key(name, model)] = videochat2.video_to_file(name, tensor, model)
        elif name.startswith("qformer."):
            out.update(_qformer(name, tensor, len(QFormerText(VOCAB))))
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat8b")
    spawn(2, hf_worker.chat_state, CONFIG, MODEL, str(tmp / "seeded.pt"))
    seeded = torch.load(tmp / "seeded.pt")[1]
    file = _file(seeded)
    save_file({k: v.contiguous() for k, v in file.items()}, str(tmp / "chat.safetensors"))
    spawn(2, hf_worker.chat_state, CONFIG, MODEL + [f"model.weights={tmp / 'chat.safetensors'}",
                                                    "train.seed=99"], str(tmp / "imported.pt"))
    return (seeded, file, torch.load(tmp / "imported.pt"), tmp / "chat.safetensors",
            tmp / "seeded.pt.checkpoints")


def test_the_released_names_are_the_index_ones(imported):
    _, file, _, _, _ = imported
    patterns = {re.sub(r"\.\d+\.", ".N.", k) for k in file}
    text_only = {p for p in patterns if p.startswith("qformer.bert.")}
    assert patterns - text_only == RELEASED


def test_a_chat_file_imports_every_tensor_exactly_at_tp1_and_tp2(imported):
    """(The QFormer's vocabulary padding rows, which no token reads, are zero after import.)"""
    seeded, _, got, _, _ = imported
    vocab = len(QFormerText(VOCAB))
    for tp, state in got.items():
        assert set(state) == set(seeded), tp
        for name, tensor in seeded.items():
            mine = state[name]
            if name == "qformer.word_embeddings.weight":
                assert not mine[vocab:].any()
                mine, tensor = mine[:vocab], tensor[:vocab]
            assert torch.equal(mine, tensor), (tp, name)


def test_pefts_adapters_merge_to_the_mistral_export(imported):
    """W + alpha / r B A from the file's peft tensors = the export's merged projection (whose
    merge is checked against transformers in tests/weights/test_hf_llm.py)."""
    seeded, file, _, _, _ = imported
    llm = load_config(CONFIG, MODEL).model.llm
    merged = hf_llm.hf_state({k: v for k, v in seeded.items() if k.startswith("llm.")}, llm)
    scale = llm.lora_alpha / llm.lora_rank
    for key, expected in merged.items():
        stem = videochat2.LM_PREFIX + key.removesuffix(".weight")
        if f"{stem}.lora_A.default.weight" not in file:
            continue
        a, b = file[f"{stem}.lora_A.default.weight"], file[f"{stem}.lora_B.default.weight"]
        ours = file[f"{stem}.weight"].float() + scale * b.float() @ a.float()
        assert torch.allclose(ours, expected.float(), rtol=0, atol=1e-6), key


def test_chat_talks_with_a_released_model_from_its_config(imported, tmp_path):
    """``launch.chat`` given a config file (not a checkpoint) imports model.weights at start-up
    and answers."""
    from dataloaders.clips import write_clip
    from tests.stages.test_stage3 import _painter

    clip = write_clip(tmp_path / "clip", "mjpeg", frames=16, width=64, height=64,
                      draw=_painter("red", "blue", 16))
    file = imported[3]
    out = subprocess.run([sys.executable, "-m", "launch.chat", CONFIG, str(clip),
                          "what happens in the video ?", *MODEL, f"model.weights={file}",
                          "--max-new-tokens", "4"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "imported" in out.stderr and out.stdout.strip()


def test_a_checkpoint_exports_as_the_released_files(imported, tmp_path):
    """``launch.convert export --layout internvideo2-chat`` of the model saved at tp 2: the
    released names and tensors as written above, LoRA unmerged, and the image table the video
    table's mean over its frames."""
    from safetensors.torch import load_file

    _, file, _, _, checkpoints = imported
    out = subprocess.run([sys.executable, "-m", "launch.convert", "export", CONFIG, *MODEL,
                          "--checkpoint", str(checkpoints), "--out", str(tmp_path),
                          "--layout", "internvideo2-chat", "--dtype", "float32"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    written = load_file(str(tmp_path / "model.safetensors"))
    image = written.pop("vision_encoder.img_pos_embed")
    assert set(written) == set(file)
    for key, tensor in file.items():
        assert torch.equal(written[key], tensor.float()), key
    pos = file["vision_encoder.pos_embed"][0]
    frames = load_config(CONFIG, MODEL).model.student.num_frames
    assert torch.equal(image[0, 0], pos[0])
    assert torch.allclose(image[0, 1:], pos[1:].reshape(frames, -1, pos.shape[-1]).mean(0))

