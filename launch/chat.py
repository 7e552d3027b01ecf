"""Ask a stage-3 checkpoint about a video; greedy decoding with the model partitioned.

    python -m launch.chat CHECKPOINT VIDEO "question" [key=value ...] [--max-new-tokens N]
    torchrun --nproc-per-node 2 -m launch.chat CHECKPOINT VIDEO "question" parallel.tp=2

The model is the checkpoint's own config; the layout comes from the overrides (default one rank:
tp 1, pp 1; the world size must be tp x pp). The video is read as evaluation reads clips (the
middle frame of each segment, centre crop). Rank 0 prints the answer.
"""

from __future__ import annotations

import argparse

from launch.common import exit_with, process_groups_closed, setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a stage-3 checkpoint directory or its root")
    parser.add_argument("video", help="a video file")
    parser.add_argument("question")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. parallel.tp=2")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    setup_logging()
    import torch.distributed as dist

    from dataloaders.conversation import TokenizerError
    from dataloaders.manifest import ProbeError
    from megavideo.apps.chat import Chat, chat_config, read_video
    from megavideo.config import ConfigError, validate_device, validate_world
    from parallel.distributed import detect_launch

    try:
        cfg = chat_config(args.checkpoint, args.overrides)
        world = detect_launch().world_size
        if validate_world(cfg, world) != 1:
            raise ConfigError(f"chat answers one question at a time: run it on tp x pp = "
                              f"{cfg.parallel.tp * cfg.parallel.pp} ranks, not {world}.")
        validate_device(cfg)
        video = read_video(cfg, args.video)
    except ProbeError as err:
        exit_with(ValueError(f"{args.video}: {err}."))
    except (ConfigError, TokenizerError) as err:
        exit_with(err)
    with process_groups_closed():
        answer = Chat(cfg, args.checkpoint).answer(video, args.question, args.max_new_tokens)
        if dist.get_rank() == 0:
            print(answer, flush=True)


if __name__ == "__main__":
    main()
