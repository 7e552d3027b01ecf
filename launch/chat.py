"""Ask a stage-3 checkpoint about a video, with the model partitioned and a KV cache.

    python -m launch.chat CHECKPOINT VIDEO "question" [key=value ...] [--then "next question"]
        [--max-new-tokens N] [--temperature T --top-p P --seed S] [--no-cache] [--stats]
    torchrun --nproc-per-node 2 -m launch.chat CHECKPOINT VIDEO "question" parallel.tp=2

CHECKPOINT may be a stage-3 config file instead (``configs/stage3_chat8b.yaml``: the released
InternVideo2-Chat-8B, imported at start-up from its ``model.weights``). The model is the
checkpoint's own config; the layout comes from the overrides (default one rank:
tp 1, pp 1; the world size must be tp x pp). The video is read as evaluation reads clips (the
middle frame of each segment, centre crop) and encoded once; each ``--then`` asks a follow-up in
the same conversation. Decoding is greedy unless ``--temperature`` is above 0 (then top-p
sampling). Rank 0 streams each answer as it is generated, one line per answer; ``--stats`` adds
the tokens and tokens/s of each answer on stderr.
"""

from __future__ import annotations

import argparse
import sys

from launch.common import exit_with, process_groups_closed, setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a stage-3 checkpoint directory or its root, or a "
                        "stage-3 config file whose weights are imported at start-up (a released "
                        "InternVideo2-Chat: model.weights)")
    parser.add_argument("video", help="a video file")
    parser.add_argument("question")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. parallel.tp=2")
    parser.add_argument("--then", action="append", default=[], metavar="QUESTION",
                        help="a follow-up question in the same conversation (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="the sampling generator's seed")
    parser.add_argument("--no-cache", action="store_true",
                        help="run the whole sequence for every token (no KV cache)")
    parser.add_argument("--stats", action="store_true", help="tokens/s of each answer on stderr")
    args = parser.parse_intermixed_args(argv)  # overrides before or after the options
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        exit_with(ValueError("--temperature must be at least 0 and --top-p in (0, 1]."))
    setup_logging()
    import torch.distributed as dist

    from dataloaders.conversation import TokenizerError
    from dataloaders.manifest import ProbeError
    from megavideo.apps.chat import (
        Chat,
        Conversation,
        Sampling,
        chat_config,
        is_config_file,
        read_video,
    )
    from megavideo.config import ConfigError, validate_device, validate_world
    from parallel.distributed import detect_launch

    try:
        cfg = chat_config(args.checkpoint, args.overrides)
        world = detect_launch().world_size
        if validate_world(cfg, world) != 1:
            raise ConfigError(f"chat answers one question at a time: run it on tp x pp = "
                              f"{cfg.parallel.tp * cfg.parallel.pp} ranks, not {world}.")
        validate_device(cfg)
        video, message = read_video(cfg, args.video)
    except ProbeError as err:
        exit_with(ValueError(f"{args.video}: {err}."))
    except (ConfigError, TokenizerError) as err:
        exit_with(err)
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    with process_groups_closed(2):  # a prompt too long for the cache: every rank finds it
        chat = Chat(cfg, None if is_config_file(args.checkpoint) else args.checkpoint)
        conversation = Conversation(chat, video, message=message)
        printing = dist.get_rank() == 0
        for question in [args.question, *args.then]:
            try:
                conversation.ask(question, args.max_new_tokens, sampling, not args.no_cache,
                                 (lambda piece: print(piece, end="", flush=True))
                                 if printing else None)
            except ValueError as err:
                exit_with(err, show=printing)
            if printing:
                print(flush=True)
                if args.stats:
                    s = chat.stats
                    print(f"{s.new_tokens} tokens after a {s.prompt_tokens}-token prompt in "
                          f"{s.prefill_s + s.decode_s:.3f} s: {s.tokens_per_s:.1f} tokens/s "
                          f"(prompt {s.prefill_s:.3f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
