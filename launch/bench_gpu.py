"""One device's throughput on stage 1's blocks:
``python -m launch.bench_gpu [CONFIG] [key=value ...] [--layers N] [--steps N] [--out DIR]``.

The student's block stack (``--layers`` blocks at the config's width on the stage-1 sequence and
micro-batch) forward and backward in bf16 and in FP8 where the device runs it, and the frozen
teachers' forward, each timed after warm-up (:mod:`megavideo.accounting.bench`). Prints a table
(TFLOP/s, MFU, attention kernel, peak memory), writes ``bench_gpu.json`` and, on a GPU, the
``calibration.json`` that ``launch.plan --calibration`` reads (its matmul efficiency: the bf16
student's, its element-wise work taken out). Runs on the CPU too (no MFU there), as the tests
run it on the tiny config.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from launch.common import config_or_exit, exit_with, setup_logging
from megavideo.config import ConfigError, validate_device

log = logging.getLogger("launch.bench_gpu")


def _table(cases) -> str:
    head = (f"{'case':<18} {'precision':<9} {'tokens':>11} {'batch':>5} {'layers':>6} "
            f"{'ms/step':>9} {'TFLOP/s':>9} {'MFU':>6} {'attention':<9} {'peak GiB':>8}")
    rows = [head, "-" * len(head)]
    for c in cases:
        mfu = f"{100 * c.mfu:5.1f}%" if c.mfu is not None else "   n/a"
        peak = f"{c.peak_gib:8.2f}" if c.peak_gib is not None else "     n/a"
        rows.append(f"{c.name:<18} {c.precision:<9} {f'{c.tokens}/{c.length}':>11} {c.batch:>5} "
                    f"{c.layers:>6} {1000 * c.seconds:9.2f} {c.tflops:9.3g} {mfu:>6} "
                    f"{c.attention:<9} {peak}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.bench_gpu", description=__doc__)
    parser.add_argument("config", nargs="?", default="configs/stage1_vit6b.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--layers", type=int, default=4, help="blocks per stack")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_gpu"))
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    cfg = config_or_exit(args.config, args.overrides)
    if cfg.stage != 1 or args.layers < 1 or args.steps < 1:
        exit_with(ConfigError("launch.bench_gpu measures stage 1's blocks: give a stage-1 config, "
                              "--layers >= 1 and --steps >= 1."))
    try:
        validate_device(cfg)
    except ConfigError as err:
        exit_with(err)
    import torch

    from megavideo.accounting.bench import bench, calibration
    from megavideo.accounting.devices import local_device
    from parallel.distributed import single_rank_world

    with single_rank_world():
        cases, no_fp8 = bench(cfg, args.layers, args.warmup, args.steps)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "this CPU"
    print(f"{name}, torch {torch.__version__}, {args.config}")
    print(_table(cases))
    if no_fp8:
        print(f"fp8 not measured: {no_fp8}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gpu.json").write_text(json.dumps(
        {"device": name, "torch": torch.__version__, "config": args.config,
         "overrides": args.overrides, "fp8_not_measured": no_fp8,
         "cases": [c.to_dict() for c in cases]}, indent=1) + "\n")
    device = local_device()
    fitted = calibration(cfg, cases, device) if device is not None else None
    if fitted is not None:
        fitted.save(args.out / "calibration.json")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
