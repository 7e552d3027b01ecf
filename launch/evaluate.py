"""Zero-shot evaluation of a stage-2 checkpoint, as the official InternVideo2 code reports it:
``torchrun --nproc-per-node N -m launch.evaluate CONFIG CHECKPOINT [key=value ...]``.

Encodes whole clips (``model.mask_ratio`` is set to 0; middle frames, centre crop) at the
config's layout: every clip of ``data.manifest`` with every caption under ``data.captions`` when
``data.source=manifest`` (``--paragraph``: a clip's captions joined into one text, as DiDeMo's
paragraph retrieval), else one held-out clip per synthetic caption pattern. Prints R@1/5/10
video->text and text->video and their means for the similarity (sim), dual-softmax (dsl) and
ITM re-ranked (match, the top ``--k-test`` candidates of each query) scores; ``--audio`` retrieves
with the audio-video vector and the audio-video matching head; ``--classify`` measures zero-shot
top-1/top-5 with the clips' first captions as class names instead. Writes the numbers as JSON
(``--json``, default ``<run.dir>/retrieval.json`` or ``classification.json``). Exit codes: 2 bad
config or checkpoint, 4 a clip that does not decode.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dataloaders.loader import DataError
from launch.common import config_or_exit, exit_with, process_groups_closed, setup_logging
from megavideo.config import ConfigError, validate_world
from parallel.distributed import detect_launch


def table(result: dict[str, float]) -> str:
    """The printed table of an evaluation's numbers."""
    if "top1" in result:
        return (f"zero-shot classification over {int(result['classes'])} classes: "
                f"top-1 {result['top1']:.1f}  top-5 {result['top5']:.1f}")
    lines = [f"{'scores':<8}{'direction':<14}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean':>8}"]
    for name in ("sim", "dsl", "match"):
        if f"{name}/r_mean" not in result:
            continue
        for direction, label in (("t2v", "text->video"), ("v2t", "video->text")):
            lines.append(f"{name:<8}{label:<14}" + "".join(
                f"{result[f'{name}/{direction}_{k}']:>8.1f}" for k in ("r1", "r5", "r10", "r_mean")))
        lines.append(f"{name:<8}{'mean R':<14}{result[f'{name}/r_mean']:>8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the stage-2 run config, e.g. configs/stage2_tiny.yaml")
    parser.add_argument("checkpoint", help="a checkpoint directory or a run's checkpoint root")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--json", help="where to write the results")
    parser.add_argument("--micro-batch", type=int, default=4, help="clips per forward pass")
    parser.add_argument("--k-test", type=int, default=128,
                        help="candidates re-ranked per query by the matching head (0: none)")
    parser.add_argument("--paragraph", action="store_true",
                        help="a clip's captions joined into one text")
    parser.add_argument("--audio", action="store_true", help="audio-video retrieval")
    parser.add_argument("--classify", action="store_true",
                        help="zero-shot classification, first captions as class names")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = config_or_exit(args.config, [*args.overrides, "model.mask_ratio=0"])
    launch = detect_launch()
    try:
        validate_world(cfg, launch.world_size)
        from megavideo.apps.evaluate import Options, evaluate

        options = Options(args.k_test, args.paragraph, args.audio, args.classify, args.micro_batch)
        with process_groups_closed():
            result = evaluate(cfg, args.checkpoint, options)
    except ConfigError as err:
        exit_with(err, show=launch.rank == 0)
    except DataError as err:
        exit_with(err, 4, show=launch.rank == 0)
    if launch.rank == 0:
        print(table(result))
        name = "classification.json" if args.classify else "retrieval.json"
        out = Path(args.json or Path(cfg.run.dir) / name)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
