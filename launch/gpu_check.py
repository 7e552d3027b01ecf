"""Check a GPU node before the first job: ``python -m launch.gpu_check [--out DIR] [--only NAME]``.

On one GPU, in a few minutes, runs every GPU code path MegaVideo has and prints one line per
check: PASS, FAIL (with what failed) or SKIP (with why: no CUDA device, no Transformer Engine, no
DALI, ...). CUDA and NCCL start-up of one rank; which of transformer-engine, flash-attn, apex
and DALI run, with versions; the TE spec's parameter names; stage-1 steps of the tiny model
(its loss against a CPU run of the same step) and of a vit-6b-width slice in bf16; stage-2 and
stage-3 steps; a checkpoint saved and loaded on the GPU, and one written on the CPU; official
weights exported and imported on this node and loaded; the manifest data path (PyAV decode, clips
moved to the GPU); DALI's NVDEC decode against PyAV's; describe and plan of the 6B config. Each
check runs in its own process with a time limit; logs and report.json go to ``--out``. Exit
code 0 when nothing FAILs, 1 otherwise. ``--device cpu`` runs the same checks on the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from dataclasses import asdict
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from megavideo.apps import gpu_check

    names = [c.name for c in gpu_check.CHECKS]
    parser = argparse.ArgumentParser(prog="python -m launch.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"),
                        help="logs, work files and report.json (default runs/gpu_check)")
    parser.add_argument("--only", action="append", default=[], choices=names, metavar="NAME",
                        help=f"run this check (repeatable; with what it reads): {', '.join(names)}")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: this node's GPU if it has one (else the GPU checks SKIP); "
                        "cuda: the GPU, FAIL without one; cpu: the same checks on the CPU")
    parser.add_argument("--run", choices=names, help=argparse.SUPPRESS)  # one check, in a child
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        from launch.common import setup_logging

        setup_logging()
        gpu_check.run_one(args.run, gpu_check.Context(args.workdir, args.device))
        return
    out = args.out.resolve()
    started = datetime.datetime.now().astimezone()
    results = gpu_check.run_all(out, args.device, tuple(args.only),
                                lambda r: print(gpu_check.format_result(r), flush=True))
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    seconds = (datetime.datetime.now().astimezone() - started).total_seconds()
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
          f"{seconds:.0f} s; logs in {out}")
    (out / "report.json").write_text(json.dumps({
        "started": started.isoformat(timespec="seconds"), "seconds": round(seconds, 1),
        "host": platform.node(), "device": args.device, "counts": counts,
        "results": [asdict(r) for r in results]}, indent=1) + "\n")
    raise SystemExit(1 if counts["FAIL"] else 0)


if __name__ == "__main__":
    main()
