"""Profile layouts on this machine:
``torchrun --nproc-per-node N -m launch.profile CONFIG [key=value ...] [--layout "k=v k=v"]...``.

Runs a few steps of each layout (by default every tp x pp split of the ranks at the config's
micro-batch and twice it) with the throughput, communication and pipeline accounting on, and writes
to ``--out``: report.json (per layout the measured medians, the analytic collective volumes and
bubble, and the planner's prediction), throughput.png, memory.png, predicted.png (measured vs
predicted step time) and calibration.json for ``launch.plan --calibration``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from launch.common import config_or_exit, exit_with, setup_logging
from megavideo.config import ConfigError, validate_device

log = logging.getLogger("launch.profile")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.profile", description=__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--layout", action="append", default=[],
                        help="one layout as space-separated key=value overrides (repeatable)")
    parser.add_argument("--steps", type=int, default=4, help="steps per layout, the first warms up")
    parser.add_argument("--out", type=Path, default=Path("runs/profile"))
    args = parser.parse_args(argv)
    setup_logging()
    cfg = config_or_exit(args.config, args.overrides)
    try:
        validate_device(cfg)  # before the inventory's one-rank world
    except ConfigError as err:
        exit_with(err)
    from megavideo.accounting.planner import Inventory, Planner
    from megavideo.accounting.sweep import default_sweep, fit, machine, report, run_layout
    from megavideo.config.megatron import process_group_timeout
    from parallel.distributed import init_distributed, shutdown

    inventory = Inventory(cfg)  # in a one-rank world of its own, before the training world
    launch = init_distributed(process_group_timeout(cfg))
    world = launch.world_size
    sweep = [item.split() for item in args.layout] or default_sweep(cfg, world)
    device = machine(world)
    measured = []
    for overrides in sweep:
        result = run_layout(args.config, args.overrides, overrides, max(args.steps, 2))
        if result is not None:
            measured.append(result)
            metrics = result.metrics
            log.info("%s: %.3f s/step, %.3g TFLOP/s per rank, %.2f GiB", " ".join(overrides),
                     metrics["perf/step_s"], metrics["perf/model_tflops"], metrics["mem/peak_gib"])
    if launch.rank == 0 and measured:
        planner = Planner(cfg, world, device, cfg.train.global_batch, inventory=inventory)
        calibration = fit(measured, planner)
        tuned = planner.with_calibration(calibration)
        for m in measured:
            predicted = tuned.predict(m.layout)
            m.predicted_step_s = predicted.step_s
            m.predicted_memory_gib = predicted.memory_gib.get("total", 0.0)
            log.info("%s: measured %.3f s, predicted %.3f s", " ".join(m.overrides),
                     m.metrics["perf/step_s"], m.predicted_step_s)
        report(args.out, device, calibration, measured)
        log.info("wrote %s (report.json, calibration.json, *.png)", args.out)
    shutdown()


if __name__ == "__main__":
    main()
