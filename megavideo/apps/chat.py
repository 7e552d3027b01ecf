"""Greedy answers from a stage-3 checkpoint, with the model partitioned as the config says.

Each new token runs the whole prompt through megatron-core's forward-only pipeline schedule (no
key-value cache: answers are short and the sequence is at most ``model.llm.max_length``); the
last pipeline stage gathers the logits of the last position over its TP group, takes the arg max
and sends the token to the other stages.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from dataloaders.conversation import causal_mask, open_prompt, tokenize
from dataloaders.manifest import Manifest, probe
from megavideo.config import Config, ConfigError, load_config
from megavideo.models.stage3 import Stage3Batch
from megavideo.training import data
from megavideo.training.checkpoint import Checkpointer, resolve
from megavideo.training.loop import Trainer


def chat_config(checkpoint: str | Path, overrides: list[str]) -> Config:
    """The checkpoint's own config for one conversation at a time: its layout from
    ``overrides`` (default tp 1, pp 1), no data parallelism, nothing loaded or written."""
    path = resolve(checkpoint)
    if not (path / "metadata.json").is_file():
        raise ConfigError(f"{checkpoint} is not a MegaVideo checkpoint (no metadata.json).")
    saved = dist_checkpointing.load_common_state_dict(str(path))["meta"]["config"]
    if saved.get("stage") != 3:
        raise ConfigError(f"{checkpoint} is a stage-{saved.get('stage')} checkpoint; chat needs "
                          "a stage-3 one.")
    layout = ["parallel.tp=1", "parallel.pp=1", "parallel.vpp=1", "parallel.sp=false",
              "parallel.encoder_tp=0", "parallel.pipeline_layout=[]",
              "parallel.distributed_optimizer=false", "run.device=auto"]  # this node's, not the run's
    cfg = _from_dict(saved, layout + list(overrides))
    replicas = cfg.parallel.tp // cfg.parallel.encoder_tp_size
    fixed = [f"train.micro_batch={replicas}", f"train.global_batch={replicas}",
             "data.source=synthetic", "checkpoint.load=", "model.llm.weights=",
             "run.tensorboard=false"]
    return _from_dict(saved, layout + list(overrides) + fixed)


def _from_dict(raw: dict, overrides: list[str]) -> Config:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(raw, f)
        f.flush()
        return load_config(f.name, overrides)


def read_video(cfg: Config, path: str) -> torch.Tensor:
    """[3, T, H, W]: the evaluation frames of one file (middle of each segment, centre crop)."""
    row = probe(path)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.jsonl"
        manifest.write_text(json.dumps(row) + "\n")
        return data.normalized(cfg, data.clips(cfg, Manifest(manifest), train=False)
                               .load_rows([0]).video[0])


class Chat:
    """A stage-3 model restored from ``checkpoint`` (every rank of the launch builds its part)."""

    def __init__(self, cfg: Config, checkpoint: str | Path | None) -> None:
        """``checkpoint=None``: the weights the config starts from (``model.llm.weights``)."""
        self.cfg = cfg
        self.trainer = Trainer(cfg)
        self.checkpointer = Checkpointer(cfg, self.trainer)
        if checkpoint is None:
            self.checkpointer.restore()
        else:
            self.checkpointer.load(resolve(checkpoint), weights_only=True)
        for chunk in self.trainer.chunks:
            chunk.eval()
        self.stage = self.trainer.stage

    def logits_at(self, batch: list[Stage3Batch], position: int) -> torch.Tensor | None:
        """The whole vocabulary's logits [V] at ``position`` (last pipeline stage; else None)."""
        got = []

        def forward_step(iterator, model):
            out, _ = model(next(iterator))

            def keep(output):
                if model.module.post_process:
                    got.append(gather_from_tensor_model_parallel_region(output[0, position]))
                return torch.zeros((), device=output.device), {}

            return out, keep

        chunks = self.trainer.chunks
        single = len(chunks) == 1
        iterators = [iter([b]) for b in batch]
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators[0] if single else iterators,
            model=chunks[0] if single else chunks, num_microbatches=1,
            seq_length=self.stage.seq_length, micro_batch_size=self.cfg.train.micro_batch,
            forward_only=True)
        return got[0] if got else None

    @torch.no_grad()
    def answer(self, video: torch.Tensor, question: str, max_new_tokens: int = 32) -> str:
        """Greedy decoding of the answer to ``question`` about ``video`` [3, T, H, W]."""
        tok, llm = self.stage.tokenizer, self.cfg.model.llm
        device, copies = self.trainer.device, self.cfg.train.micro_batch
        prompt = tokenize(tok, open_prompt([], question), self.cfg.model.qformer.queries,
                          llm.max_length, open_ended=True)
        ids, length = prompt.ids.clone(), prompt.length
        clips = video[None].expand(copies, *video.shape).to(device)
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        last = dist.get_global_rank(pp_group, pp_group.size() - 1)
        answer: list[int] = []
        while len(answer) < max_new_tokens and length < llm.max_length:
            batch = [Stage3Batch(attention_mask=causal_mask(llm.max_length, device))
                     for _ in self.trainer.chunks]
            for b, model in zip(batch, self.stage.models, strict=True):
                if model.pre_process:
                    b.video = clips
                    b.ids = ids[None].expand(copies, -1).to(device)
                    b.video_mask = prompt.video[None].expand(copies, -1).to(device)
            logits = self.logits_at(batch, length - 1)
            token = torch.zeros((), dtype=torch.long, device=device)
            if logits is not None:
                token.fill_(int(logits[: len(tok)].argmax()))
            dist.broadcast(token, last, group=pp_group)
            if int(token) == tok.eos:
                break
            answer.append(int(token))
            ids[length] = token.cpu()
            length += 1
        return tok.decode(answer)


__all__ = ["Chat", "chat_config", "read_video"]
