"""Zero-shot video-text retrieval of a stage-2 checkpoint:
``torchrun --nproc-per-node N -m launch.evaluate CONFIG CHECKPOINT [key=value ...]``.

Encodes whole clips (``model.mask_ratio`` is set to 0; middle frames, centre crop) at the
config's layout: every clip of ``data.manifest`` with its first caption under ``data.captions``
when ``data.source=manifest``, else one held-out clip per synthetic caption pattern. Prints
R@1/5/10 text->video and video->text and their mean, and writes them as JSON (``--json``,
default ``<run.dir>/retrieval.json``). Exit codes: 2 bad config or checkpoint, 4 a clip that
does not decode.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dataloaders.loader import DataError
from launch.common import config_or_exit, exit_with, process_groups_closed, setup_logging
from megavideo.config import ConfigError, validate_world
from parallel.distributed import detect_launch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.evaluate", description=__doc__)
    parser.add_argument("config", help="the stage-2 run config, e.g. configs/stage2_tiny.yaml")
    parser.add_argument("checkpoint", help="a checkpoint directory or a run's checkpoint root")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--json", help="where to write the results")
    parser.add_argument("--micro-batch", type=int, default=4, help="clips per forward pass")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = config_or_exit(args.config, [*args.overrides, "model.mask_ratio=0"])
    launch = detect_launch()
    try:
        validate_world(cfg, launch.world_size)
        from megavideo.apps.evaluate import evaluate

        with process_groups_closed():
            result = evaluate(cfg, args.checkpoint, args.micro_batch)
    except ConfigError as err:
        exit_with(err, show=launch.rank == 0)
    except DataError as err:
        exit_with(err, 4, show=launch.rank == 0)
    if launch.rank == 0:
        print(f"{'direction':<14}{'R@1':>8}{'R@5':>8}{'R@10':>8}")
        for direction, name in (("t2v", "text->video"), ("v2t", "video->text")):
            print(f"{name:<14}" + "".join(f"{result[f'{direction}/R@{k}']:>8.1f}"
                                          for k in (1, 5, 10)))
        print(f"mean R: {result['mean_R']:.1f}")
        out = Path(args.json or Path(cfg.run.dir) / "retrieval.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
