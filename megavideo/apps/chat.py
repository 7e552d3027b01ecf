"""Answers from a stage-3 checkpoint, with the model partitioned as the config says.

A conversation encodes its video once (the first pipeline stage keeps the query tokens). Each
answer runs its prompt (the conversation so far and the new question, VideoChat2's template)
through megatron-core's forward-only pipeline schedule once, filling megatron-core's static
key-value cache (``StaticInferenceContext``), then one token per step against the cache. The
last pipeline stage gathers the last position's logits over its TP group, picks the token
(greedy, or top-p sampling from a seeded generator: every TP rank picks the same) and sends it to
the other stages. ``cache=False`` runs the whole sequence for every token instead (the reference
the cache is tested against).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from dataloaders.conversation import QA, causal_mask, open_prompt, time_message, tokenize
from dataloaders.manifest import Manifest, probe
from megavideo.config import Config, ConfigError, load_config
from megavideo.models.stage3 import Stage3Batch
from megavideo.training import data
from megavideo.training.checkpoint import Checkpointer, resolve
from megavideo.training.loop import Trainer


def is_config_file(source: str | Path) -> bool:
    """Whether chat's source is a config file (its weights imported at start-up) rather than a
    checkpoint."""
    return Path(source).suffix in (".yaml", ".yml")


def chat_config(source: str | Path, overrides: list[str]) -> Config:
    """The config of one conversation at a time: a checkpoint's own, or a stage-3 config file's
    (its ``model.weights``, ``model.llm.weights``, ``model.qformer.weights`` imported at start-up:
    a released InternVideo2-Chat); its layout from ``overrides`` (default tp 1, pp 1), no data
    parallelism, nothing written."""
    layout = ["parallel.tp=1", "parallel.pp=1", "parallel.vpp=1", "parallel.sp=false",
              "parallel.encoder_tp=0", "parallel.pipeline_layout=[]",
              "parallel.distributed_optimizer=false", "run.device=auto"]  # this node's, not the run's
    fixed = ["data.source=synthetic", "checkpoint.load=", "run.tensorboard=false"]
    if is_config_file(source):
        def build(extra: list[str]) -> Config:
            return load_config(source, extra)
    else:
        path = resolve(source)
        if not (path / "metadata.json").is_file():
            raise ConfigError(f"{source} is not a MegaVideo checkpoint (no metadata.json).")
        saved = dist_checkpointing.load_common_state_dict(str(path))["meta"]["config"]
        fixed.append("model.llm.weights=")

        def build(extra: list[str]) -> Config:
            return _from_dict(saved, extra)
    cfg = build(layout + list(overrides))
    if cfg.stage != 3:
        raise ConfigError(f"{source} is a stage-{cfg.stage} model; chat needs a stage-3 one.")
    replicas = cfg.parallel.tp // cfg.parallel.encoder_tp_size
    return build(layout + list(overrides) + fixed +
                 [f"train.micro_batch={replicas}", f"train.global_batch={replicas}"])


def _from_dict(raw: dict, overrides: list[str]) -> Config:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(raw, f)
        f.flush()
        return load_config(f.name, overrides)


def read_video(cfg: Config, path: str) -> tuple[torch.Tensor, str]:
    """[3, T, H, W]: the evaluation frames of one file (middle of each segment, centre crop),
    and with ``data.time_message`` the video turn's message saying when they were sampled."""
    row = probe(path)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.jsonl"
        manifest.write_text(json.dumps(row) + "\n")
        batch = data.clips(cfg, Manifest(manifest), train=False).load_rows([0])
    fps, *frames = batch.times[0].tolist()
    message = time_message([int(f) for f in frames], fps) \
        if cfg.data.time_message and fps > 0 else ""
    return data.normalized(cfg, batch.video[0]), message


@dataclass(frozen=True)
class Sampling:
    """Greedy decoding (``temperature`` 0), or sampling at ``temperature`` from the smallest set
    of tokens whose probabilities reach ``top_p``, drawn from a generator seeded by ``seed``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None
         ) -> torch.Tensor:
    """The next token (a 0-d long tensor on ``logits``' device) from the logits [V]."""
    if sampling.temperature == 0:
        return logits.argmax()
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(0) - sorted_probs  # the mass of the tokens ranked above
    kept = sorted_probs.masked_fill(before >= sampling.top_p, 0.0)
    return order[torch.multinomial(kept, 1, generator=generator)[0]]


@dataclass
class Stats:
    """The last answer's timing: the prompt's forward and each generated token's."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)


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
        self.copies = cfg.train.micro_batch  # one clip per encoder replica
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.last_rank = dist.get_global_rank(self.pp_group, self.pp_group.size() - 1)
        self.stats = Stats()

    def logits_at(self, batch: list[Stage3Batch], position: int,
                  seq_length: int | None = None) -> torch.Tensor | None:
        """The whole vocabulary's logits [V] at ``position`` of the chunks' output (last
        pipeline stage; else None) for sequences of ``seq_length`` (default
        ``model.llm.max_length``)."""
        got = []
        whole = batch[0].inference_context is not None  # megatron-core gathers the vocabulary

        def forward_step(iterator, model):
            out, _ = model(next(iterator))

            def keep(output):
                if model.module.post_process:
                    row = output[0, position]
                    got.append(row if whole else gather_from_tensor_model_parallel_region(row))
                return torch.zeros((), device=output.device), {}

            return out, keep

        chunks = self.trainer.chunks
        single = len(chunks) == 1
        iterators = [iter([b]) for b in batch]
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators[0] if single else iterators,
            model=chunks[0] if single else chunks, num_microbatches=1,
            seq_length=seq_length or self.stage.seq_length, micro_batch_size=self.copies,
            forward_only=True)
        return got[0] if got else None

    @torch.no_grad()
    def encode(self, video: torch.Tensor, instruction: str = "") -> torch.Tensor | None:
        """The query tokens [copies, Q, H_llm] of ``video`` [3, T, H, W] on the first pipeline
        stage (None elsewhere), encoded once for a whole conversation (the QFormer reading
        ``instruction`` with model.qformer.text_input)."""
        first = next((m for m in self.stage.models if m.pre_process), None)
        if first is None:
            return None
        clips = video[None].expand(self.copies, *video.shape).to(self.trainer.device)
        text = self.stage.instructions([instruction] * self.copies) \
            if self.stage.qformer_text is not None else ()
        return first.video_queries(clips, *text)

    def _cache(self) -> StaticInferenceContext:
        """megatron-core's static KV cache, its memory allocated here on this rank's device
        (megatron-core would put it on a CUDA device)."""
        llm = self.cfg.model.llm
        context = StaticInferenceContext(self.copies, llm.max_length)
        for model in self.stage.models:
            for layer in model.llm.decoder.layers:
                attention = layer.self_attention
                shape = (llm.max_length, self.copies, attention.num_query_groups_per_partition,
                         attention.hidden_size_per_attention_head)
                weight = next(attention.parameters())
                context.key_value_memory_dict[attention.layer_number] = tuple(
                    torch.empty(shape, dtype=weight.dtype, device=weight.device) for _ in range(2))
        return context

    def _batches(self, ids: list[int], video: torch.Tensor, queries: torch.Tensor | None,
                 context: StaticInferenceContext | None) -> list[Stage3Batch]:
        """One forward's micro-batch per chunk: ``ids`` (the prompt, or the token just made
        against the cache) with the queries at the ``video`` positions."""
        device, n = self.trainer.device, len(ids)
        prefill = context is None or context.sequence_len_offset == 0
        out = []
        for model in self.stage.models:
            b = Stage3Batch(attention_mask=causal_mask(n, device) if prefill else None,
                            inference_context=context)
            if model.pre_process:
                b.ids = torch.tensor(ids, device=device)[None].expand(self.copies, -1)
                if prefill:
                    b.queries = queries
                    b.video_mask = video[:n].to(device)[None].expand(self.copies, -1)
            out.append(b)
        return out

    @torch.no_grad()
    def generate(self, text: str, queries: torch.Tensor | None, max_new_tokens: int = 32,
                 sampling: Sampling = Sampling(), cache: bool = True,
                 stream: Callable[[list[int]], None] | None = None,
                 stop: bool = True) -> list[int]:
        """The answer's token ids to the open prompt ``text`` (``</s>`` and what follows left
        out); ``stream`` sees the ids so far after each token. ``stop=False`` runs on past
        ``</s>`` to ``max_new_tokens`` (benchmarks)."""
        tok, llm = self.stage.tokenizer, self.cfg.model.llm
        device = self.trainer.device
        prompt = tokenize(tok, text, self.cfg.model.qformer.queries, llm.max_length,
                          open_ended=True)
        ids = prompt.ids[: prompt.length].tolist()
        context = self._cache() if cache else None
        generator = None
        if sampling.temperature:
            generator = torch.Generator(device=device).manual_seed(sampling.seed)
        self.stats = Stats(prompt_tokens=len(ids))
        answer: list[int] = []
        feed = ids
        while len(answer) < max_new_tokens and len(ids) < llm.max_length:
            start = time.perf_counter()
            batch = self._batches(feed, prompt.video, queries, context)
            logits = self.logits_at(batch, -1, len(feed))
            token = torch.zeros((), dtype=torch.long, device=device)
            if logits is not None:
                token.copy_(pick(logits[: len(tok)], sampling, generator))
            dist.broadcast(token, self.last_rank, group=self.pp_group)
            new = int(token)
            if context is not None:
                context.sequence_len_offset += len(feed)
            elapsed = time.perf_counter() - start
            if not answer:
                self.stats.prefill_s += elapsed  # the prompt's forward, which makes the first token
            else:
                self.stats.decode_s += elapsed
            if new == tok.eos and stop:
                break
            answer.append(new)
            self.stats.new_tokens += 1
            ids.append(new)
            feed = [new] if context is not None else ids
            if stream is not None:
                stream(answer)
        return answer

    def answer(self, video: torch.Tensor, question: str, max_new_tokens: int = 32,
               **kwargs) -> str:
        """One question about ``video`` [3, T, H, W]."""
        return Conversation(self, video).ask(question, max_new_tokens, **kwargs)


class Conversation:
    """Questions about one video: encoded once, the answers so far in each new prompt."""

    def __init__(self, chat: Chat, video: torch.Tensor, instruction: str = "",
                 message: str = "") -> None:
        """``message``: the video turn's (:func:`read_video`'s time message)."""
        self.chat, self.instruction, self.message = chat, instruction, message
        self.queries = chat.encode(video, instruction)
        self.history: list[QA] = []

    def ask(self, question: str, max_new_tokens: int = 32, sampling: Sampling = Sampling(),
            cache: bool = True, stream: Callable[[str], None] | None = None) -> str:
        """The answer to ``question``; ``stream`` sees each new piece of its text."""
        tok = self.chat.stage.tokenizer
        shown = [""]

        def show(ids: list[int]) -> None:
            text = tok.decode(ids)
            stream(text[len(shown[0]):])
            shown[0] = text

        text = open_prompt(self.history, question, msg=self.message, instruction=self.instruction)
        ids = self.chat.generate(text, self.queries, max_new_tokens, sampling, cache,
                                 show if stream else None)
        answer = tok.decode(ids)
        self.history.append(QA(question, answer))
        return answer


__all__ = ["Chat", "Conversation", "Sampling", "Stats", "chat_config", "is_config_file", "pick",
           "read_video"]
