"""Rank code of the Hugging Face import test: import at a layout, logits of a fixed prompt."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.distributed as dist

from dataloaders.conversation import QA
from dataloaders.synthetic import pattern_video, sample_keys
from kernels.keyed_random import normal


def logits(rank: int, world: int, config: str, overrides: list[str], out: str,
           save_to: str = "") -> None:
    from megavideo.apps.chat import Chat
    from megavideo.config import load_config
    from megavideo.models.stage3 import Stage3Batch

    cfg = load_config(config, overrides)
    chat = Chat(cfg, None)
    stage = chat.stage
    copies = cfg.train.micro_batch
    qa = [[QA("which colour comes first ?", "red")]] * copies
    noise = functools.partial(normal, sample_keys(0, 0, [0] * copies, "video"))
    video = pattern_video(noise, [1] * copies, cfg.model.student.num_frames,
                          cfg.model.student.image_size)
    batches = [stage.make_batch(m, video, qa) for m in stage.models]
    for b in batches:
        b.labels = None  # logits, not the loss
    got = [chat.logits_at([Stage3Batch(**vars(b)) for b in batches], p) for p in range(20, 26)]
    if got[0] is not None and dist.get_rank() == world - 1:
        torch.save(torch.stack(got), out)
    if save_to:
        chat.checkpointer.root = type(chat.checkpointer.root)(save_to)
        chat.checkpointer.save(0)


def llm_logits(rank: int, world: int, config: str, weights: str, ids: torch.Tensor,
               out: str, lora: bool = False) -> None:
    """The imported LLM alone on token ids (no video), at tp 1 and tp 2: the whole vocabulary's
    logits [b, s, V] per tp. ``lora``: with LoRA adapters of random seeded values (the same whole
    tensors at both layouts) on every projection, and the tp-1 model exported merged to
    ``out.merged`` (fp32)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megavideo.config import load_config
    from megavideo.models.lora import is_lora
    from megavideo.training.checkpoint import Checkpointer
    from megavideo.training.loop import Trainer
    from megavideo.training.state import full_state, load_full_state
    from megavideo.weights.hf_llm import write_hf

    adapters = ["model.llm.tuning=lora", "model.llm.lora_rank=4", "model.llm.lora_dropout=0"]
    got = {}
    for tp in (1, 2):
        cfg = load_config(config, [f"model.llm.weights={weights}", "run.tensorboard=false",
                                   "train.micro_batch=2", "train.global_batch=4",
                                   "parallel.pp=1", "parallel.sp=false", f"parallel.tp={tp}",
                                   "parallel.encoder_tp=0", f"run.dir={out}.tp{tp}"]
                          + (adapters if lora else []))
        trainer = Trainer(cfg)
        Checkpointer(cfg, trainer).restore()
        if lora:
            state = full_state(trainer.chunks)
            g = torch.Generator().manual_seed(0)
            for name in sorted(n for n in state if is_lora(n)):
                state[name] = 0.01 * torch.randn(state[name].shape, generator=g)
            load_full_state(trainer.chunks, state)
            if tp == 1 and rank == 0:
                llm_state = {n: t for n, t in state.items() if n.startswith("llm.")}
                write_hf(llm_state, cfg.model.llm, Path(f"{out}.merged"), torch.float32)
        llm = trainer.chunks[0].module.llm
        llm.eval()
        with torch.no_grad():
            logits = llm(input_ids=ids, position_ids=None, attention_mask=None)  # [b, s, V/tp]
            got[tp] = gather_from_tensor_model_parallel_region(logits.contiguous())
    if rank == 0:
        torch.save(got, out)


def qformer_hidden(rank: int, world: int, config: str, weights: str, out: str) -> None:
    """The QFormer imported from ``weights`` at encoder tp 1 and 2, its cross-attention's output
    projection zeroed: the layers' output [Q, 1, H] on random video tokens, and its whole
    parameters."""
    from megavideo.config import load_config
    from megavideo.training.checkpoint import Checkpointer
    from megavideo.training.loop import Trainer
    from megavideo.training.state import full_state

    got = {}
    for tp in (1, 2):
        cfg = load_config(config, [f"model.qformer.weights={weights}", "run.tensorboard=false",
                                   "train.micro_batch=2", "train.global_batch=4", "parallel.pp=1",
                                   "parallel.sp=false", f"parallel.tp={tp}",
                                   f"parallel.encoder_tp={tp}", f"run.dir={out}.tp{tp}"])
        trainer = Trainer(cfg)
        Checkpointer(cfg, trainer).restore()
        state = {k: v for k, v in full_state(trainer.chunks).items() if k.startswith("qformer.")}
        qformer = trainer.chunks[0].module.qformer
        qformer.eval()
        with torch.no_grad():
            for layer in qformer.layers.layers:
                if layer.crosses:
                    layer.cross_attention.linear_proj.weight.zero_()
                    layer.cross_attention.linear_proj.bias.zero_()
            queries = torch.cat([qformer.queries, qformer.extra_queries])
            width = qformer.video_norm.weight.shape[0]
            memory = qformer.video_norm(torch.randn(12, 1, width,
                                                    generator=torch.Generator().manual_seed(1)))
            hidden = qformer.layers(qformer.embed_norm(queries), None, context=memory)
        got[tp] = (hidden, state)
    if rank == 0:
        torch.save(got, out)


def qformer_text_hidden(rank: int, world: int, config: str, weights: str, vocab: str,
                        out: str) -> None:
    """The QFormer with text (model.qformer.text_input) imported from ``weights`` at encoder tp
    1 and 2: its outputs on random video tokens and two texts (the second padded) with queries
    and text seeing each other (``joint``), text alone (``text``), and the captioning mask
    (``causal``; ``causal_changed``: the texts' last two tokens changed)."""
    from megavideo.config import load_config
    from megavideo.models.qformer import joint_mask
    from megavideo.training.checkpoint import Checkpointer
    from megavideo.training.loop import Trainer

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 16, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    ids[1, 4:] = 0
    changed = ids.clone()
    changed[0, 4:] = 5
    got = {}
    for tp in (1, 2):
        cfg = load_config(config, [f"model.qformer.weights={weights}", "run.tensorboard=false",
                                   "model.qformer.text_input=true",
                                   f"model.qformer.vocab_file={vocab}",
                                   "train.micro_batch=2", "train.global_batch=4", "parallel.pp=1",
                                   "parallel.sp=false", f"parallel.tp={tp}",
                                   f"parallel.encoder_tp={tp}", f"run.dir={out}.tp{tp}"])
        trainer = Trainer(cfg)
        Checkpointer(cfg, trainer).restore()
        qformer = trainer.chunks[0].module.qformer
        qformer.eval()
        q = qformer.num_queries
        with torch.no_grad():
            video = torch.randn(12, 2, qformer.video_norm.weight.shape[0],
                                generator=torch.Generator().manual_seed(2))
            memory = qformer.video_norm(video)
            got[tp] = {
                "memory": memory,
                "queries": torch.cat([qformer.queries, qformer.extra_queries]),
                "joint": qformer.run(qformer.embed(2, ids), joint_mask(q, mask), memory, q),
                "text": qformer.text(ids, mask),
                "causal": qformer.run(qformer.embed(2, ids), joint_mask(q, mask, True), memory, q),
                "causal_changed": qformer.run(qformer.embed(2, changed),
                                              joint_mask(q, mask, True), memory, q),
                "ids": ids, "mask": mask}
    if rank == 0:
        torch.save(got, out)


def chat_state(rank: int, world: int, config: str, overrides: list[str], out: str) -> None:
    """Per layout (tp 1, then tp 2 with encoder tp 1): the whole stage-3 state after start-up
    (``model.weights`` imported if the overrides name it); the seed's own LoRA B values made
    non-zero so that the adapters' round trip is seen, and that model saved at tp 2 as
    ``<out>.checkpoints``."""
    from megavideo.config import load_config
    from megavideo.training.checkpoint import Checkpointer
    from megavideo.training.loop import Trainer
    from megavideo.training.state import full_state, load_full_state

    got = {}
    for tp in (1, 2):
        cfg = load_config(config, [*overrides, "run.tensorboard=false", "train.micro_batch=2",
                                   "train.global_batch=4", "parallel.pp=1", "parallel.sp=false",
                                   f"parallel.tp={tp}", "parallel.encoder_tp=1",
                                   f"run.dir={out}.tp{tp}"])
        trainer = Trainer(cfg)
        if not cfg.model.weights:
            state = full_state(trainer.chunks)
            g = torch.Generator().manual_seed(5)
            state = {k: v + 0.01 * torch.randn(v.shape, generator=g) if ".lora." in k else v
                     for k, v in state.items()}
            load_full_state(trainer.chunks, state)
        checkpointer = Checkpointer(cfg, trainer)
        checkpointer.restore()
        got[tp] = full_state(trainer.chunks)
        if tp == 2 and not cfg.model.weights:  # the seeded model, saved at a layout of its own
            checkpointer.root = Path(f"{out}.checkpoints")
            checkpointer.save(0)
    if rank == 0:
        torch.save(got, out)
