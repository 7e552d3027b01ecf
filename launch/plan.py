"""Plan a layout before spending GPU-months:
``python -m launch.plan CONFIG [key=value ...] --gpus N``.

Enumerates the valid layouts of the config's model (tp, pp, vpp, dp, sp, micro-batch, recomputation,
distributed optimizer), predicts each one's step time, MFU and memory per rank, and prints the fastest
that fit, the config's own layout with its verdict, and how many were refused and why (``--refused``
lists them). ``--json`` writes everything. The performance model's constants come from
``--calibration`` (written by ``python -m launch.profile``) or the built-in defaults. The GPU, its
peak and the global batch are the config's keys, overridden like any other: ``profile.device``
(h100, h200, a100; auto: this node's GPU, else h100), ``profile.peak_tflops`` (0: the table's) and
``train.global_batch``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from launch.common import config_or_exit, exit_with, setup_logging
from megavideo.config import ConfigError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.plan", description=__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of the job")
    parser.add_argument("--calibration", help="a calibration JSON from launch.profile")
    parser.add_argument("--top", type=int, default=10, help="layouts shown (default 10)")
    parser.add_argument("--refused", type=int, default=0, help="refused layouts listed")
    parser.add_argument("--json", type=Path, help="write the whole plan here")
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    cfg = config_or_exit(args.config, args.overrides)
    import torch

    from megavideo.accounting.devices import device_key
    from megavideo.accounting.planner import Calibration, Layout, Planner, format_table

    gpu = cfg.profile.device
    if gpu == "auto":
        gpu = (torch.cuda.is_available() and device_key(torch.cuda.get_device_name())) or "h100"
    try:
        calibration = Calibration.load(args.calibration) if args.calibration else None
        planner = Planner(cfg, args.gpus, gpu, cfg.train.global_batch, calibration,
                          cfg.profile.peak_tflops)
    except ConfigError as err:
        exit_with(err)
    fitting, refused = planner.plan()
    own = planner.predict(Layout.of(cfg, args.gpus))
    train = cfg.train
    dev = planner.device
    print(f"{cfg.model.preset or 'custom'} stage {cfg.stage} on {args.gpus} x {dev.name} "
          f"({dev.memory_gib:g} GiB, {planner.peak:g} TFLOP/s {train.precision}), global batch "
          f"{planner.global_batch}; calibration: {planner.calibration.source}")
    print(f"{len(fitting)} layouts fit, {len(refused)} refused; fastest first:")
    print(format_table(fitting[: args.top]))
    verdict = (f"step {own.step_s:.3f} s, MFU {100 * own.mfu:.1f}%, {own.memory_gib['total']:.1f} "
               "GiB on its fullest rank" if own.fits else f"refused: {own.why}")
    print(f"the config's layout ({' '.join(own.layout.overrides())}): {verdict}")
    memory = [p for p in refused if p.memory_gib.get("total", 0.0) > dev.memory_gib]
    if memory:
        print(f"refused {len(memory)} that do not fit in {dev.memory_gib:g} GiB, e.g. "
              f"{' '.join(memory[0].layout.overrides())}: {memory[0].why}")
    rules = Counter(p.why for p in refused if p not in memory)
    for why, n in rules.most_common(3):
        print(f"refused {n} by the config rules: {why}")
    for p in refused[: args.refused]:
        print(f"  {' '.join(p.layout.overrides())}: {p.why}")
    if args.json:
        args.json.write_text(json.dumps({
            "config": args.config, "overrides": args.overrides, "gpus": args.gpus,
            "gpu": gpu, "global_batch": planner.global_batch, "peak_tflops": planner.peak,
            "calibration": planner.calibration.__dict__, "config_layout": own.to_dict(),
            "ranked": [p.to_dict() for p in fitting],
            "refused": [p.to_dict() for p in refused]}, indent=1) + "\n")
        print(f"wrote {args.json}")
    if not fitting:
        exit_with(ConfigError("no layout fits: more GPUs, a GPU with more memory or a smaller "
                              "global batch"), code=1)


if __name__ == "__main__":
    main()
