"""Rank code of the released-weights test: bert and BEATs imported at tp 1 and tp 2, the text
encoder's, the MLM head's and the audio encoder's outputs on fixed inputs."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megavideo.config import load_config
from megavideo.models.text import padding_mask
from megavideo.training.checkpoint import Checkpointer
from megavideo.training.loop import Trainer

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "stage2_tiny.yaml"
COMMON = ["run.tensorboard=false", "train.global_batch=2", "train.micro_batch=1",
          "parallel.pp=1", "parallel.sp=false"]


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(group.size())]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def outputs(rank: int, world: int, bert: str, beats: str, ids: torch.Tensor, mask: torch.Tensor,
            fbank: torch.Tensor, root: str, out: str) -> None:
    """For tp 1 and 2, and tp 1 with the whole score matrix: every text layer run as plain
    BERT (no video: the fusion layers skip their cross-attention), the MLM head's logits, the
    fusion layers' cross-attention tensors, and the audio encoder's tokens."""
    got = {}
    for tp, attention in ((1, "auto"), (2, "auto"), (1, "unfused")):
        trainer = Trainer(load_config(CONFIG, COMMON + [
            f"parallel.tp={tp}", f"model.text.weights={bert}", f"model.audio.weights={beats}",
            f"train.attention={attention}", f"run.dir={root}/tp{tp}_{attention}"]))
        Checkpointer(trainer.cfg, trainer).restore()
        model = trainer.chunks[-1].module
        with torch.no_grad():
            text = model.text
            hidden = text.layers(text.embed(ids), padding_mask(mask))  # [L, B, H]
            logits = _gather_vocab(model.mlm_head.logits(hidden))[..., :text.vocab_size]
            audio = model.audio(fbank).transpose(0, 1)  # [B, N, H]
        cross = {n: p.detach().clone() for n, p in model.named_parameters()
                 if ".cross_attention." in n or "pre_cross_attn_layernorm" in n}
        got[tp if attention == "auto" else attention] = {
            "hidden": hidden.transpose(0, 1), "logits": logits.transpose(0, 1), "cross": cross,
            "audio": audio}
    if rank == 0:
        torch.save(got, out)
