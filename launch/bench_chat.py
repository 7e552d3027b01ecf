"""Chat speed benchmark: ``[torchrun ...] python -m launch.bench_chat CONFIG [key=value ...]
[--prompt-tokens N] [--new-tokens N] [--out bench_chat.json]``.

A benchmark, not a test: the stage-3 model of CONFIG (fresh seeded weights, or
``model.llm.weights``) at the layout of the overrides answers about a synthetic clip, with
megatron-core's static KV cache and without it (the whole sequence for every token). The prompt
is the template's video turn and a question padded to ``--prompt-tokens``; each answer runs to
``--new-tokens`` (past ``</s>``). Prints a table (rank 0) and writes JSON: the prompt's forward
(seconds), the tokens after it (tokens/s) and the whole answer's tokens/s, median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
from pathlib import Path

from launch.common import exit_with, process_groups_closed, setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.bench_chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--prompt-tokens", type=int, default=64,
                        help="the prompt's length, the video's query tokens included")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_chat.json")
    args = parser.parse_args(argv)
    setup_logging()
    import torch
    import torch.distributed as dist

    from dataloaders.synthetic import pattern_video, sample_keys
    from kernels.keyed_random import normal
    from megavideo.apps.chat import Chat
    from megavideo.config import ConfigError, load_config

    try:
        base = load_config(args.config, args.overrides)
        replicas = base.parallel.tp // base.parallel.encoder_tp_size
        length = args.prompt_tokens + args.new_tokens
        cfg = load_config(args.config, args.overrides + [
            f"train.micro_batch={replicas}", f"train.global_batch={replicas}",
            f"model.llm.max_length={length}", "run.tensorboard=false", "data.source=synthetic"])
    except ConfigError as err:
        exit_with(err)
    with process_groups_closed():
        chat = Chat(cfg, None)
        student = cfg.model.student
        noise = functools.partial(normal, sample_keys(0, 0, [0], "video"))
        video = pattern_video(noise, [1], student.num_frames, student.image_size)[0]
        queries = chat.encode(video)
        prompt = _prompt(chat, args.prompt_tokens)
        rows = []
        for cache in (True, False):
            runs = []
            for _ in range(args.repeats + 1):  # the first warms up
                chat.generate(prompt, queries, args.new_tokens, cache=cache, stop=False)
                runs.append(chat.stats)
            runs = runs[1:]
            s = runs[0]
            rows.append({
                "cache": cache, "prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens,
                "prompt_s": statistics.median(r.prefill_s for r in runs),
                "decode_tokens_per_s": statistics.median(
                    (r.new_tokens - 1) / max(r.decode_s, 1e-9) for r in runs),
                "tokens_per_s": statistics.median(r.tokens_per_s for r in runs)})
        if dist.get_rank() == 0:
            par = cfg.parallel
            layout = f"tp {par.tp} (encoder tp {par.encoder_tp_size}) x pp {par.pp}"
            print(f"{layout}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}")
            print(f"{'KV cache':<10}{'prompt':>8}{'new':>6}{'prompt s':>10}{'decode tok/s':>14}"
                  f"{'tok/s':>9}")
            for r in rows:
                print(f"{'yes' if r['cache'] else 'no':<10}{r['prompt_tokens']:>8}"
                      f"{r['new_tokens']:>6}{r['prompt_s']:>10.3f}"
                      f"{r['decode_tokens_per_s']:>14.1f}{r['tokens_per_s']:>9.1f}")
            Path(args.out).write_text(json.dumps({"layout": layout, "config": args.config,
                                                  "overrides": args.overrides, "rows": rows},
                                                 indent=2) + "\n")


def _prompt(chat, tokens: int) -> str:
    """An open prompt (a question of repeated words) of at most ``tokens`` tokens."""
    from dataloaders.conversation import open_prompt, tokenize

    def text(words: int) -> str:
        return open_prompt([], " ".join(["video"] * words))

    def length(words: int) -> int:
        return tokenize(chat.stage.tokenizer, text(words), chat.cfg.model.qformer.queries,
                        chat.cfg.model.llm.max_length).length

    words = 0
    while length(words + 1) <= tokens:
        words += 1
    return text(words)


if __name__ == "__main__":
    main()
