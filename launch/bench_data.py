"""Video decode benchmark: ``python -m launch.bench_data [--manifest M] [--out bench_data.json]``.

A benchmark, not a test: per backend, clips/s and frames/s of the whole sample path (decode the
sampled frames, crop, resize, flip to 3 x frames x size x size 8-bit levels, as a decoding rank
hands them on; the training device normalises them) on one core
(one process, one decode thread, torch on one thread), and per CPU-second used. Backends: PyAV +
torch (MegaVideo's CPU path), decord + torch (the official InternVideo2 code's decoder; needs
``pip install decord``), DALI's CPU pipeline (VP8/VP9/MJPEG clips only) and DALI's mixed NVDEC
pipeline when a GPU is present. Without ``--manifest`` it writes its own 640x360 H.264 and VP9
clips (10 s at 25 fps, a key frame every 2 s). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dataloaders import dali
from dataloaders.clips import write_clip
from dataloaders.manifest import Manifest, build_manifest
from dataloaders.pyav_decode import DecodeError, read_frames
from dataloaders.sampling import Draw, Sampling
from dataloaders.transform import crop_resize


def _pyav(size: int, seekable: dict[str, bool]):
    def run(paths: list[str], draws: list[Draw]) -> int:
        failed = 0
        for path, draw in zip(paths, draws, strict=True):
            try:
                crop_resize(read_frames(path, draw.frames, seek=seekable[path]), draw.crop, size)
            except DecodeError:
                failed += 1
        return failed
    return run


def _decord(size: int):
    import decord

    def run(paths: list[str], draws: list[Draw]) -> int:
        failed = 0
        for path, draw in zip(paths, draws, strict=True):
            try:
                reader = decord.VideoReader(path, num_threads=1)  # 0 crashes on VP9
                frames = reader.get_batch(draw.frames).asnumpy()
            except (decord.DECORDError, RuntimeError, IndexError):
                failed += 1
                continue
            crop_resize(frames, draw.crop, size)
        return failed
    return run


def _dali(size: int, batch: int, device_id: int | None):
    decoder = dali.DaliDecoder(size, batch, threads=1, device_id=device_id)

    def run(paths: list[str], draws: list[Draw]) -> int:
        failed = 0
        for i in range(0, len(paths), batch):
            encoded = [np.fromfile(p, np.uint8) for p in paths[i:i + batch]]
            video, bad = decoder.decode(encoded, draws[i:i + batch])
            failed += len(bad)
            if video is not None and video.is_cuda:
                torch.cuda.synchronize()
        return failed
    return run


def measure(run: Callable, paths: list[str], draws: list[Draw], frames: int) -> dict:
    """Clips/s of ``run`` over the files that decode; the ones that fail are skipped and
    counted, as training skips them."""
    run(paths[:1], draws[:1])  # warm-up: imports, pipeline build
    wall, cpu = time.perf_counter(), time.process_time()
    failed = run(paths, draws)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    done = len(paths) - failed
    return {"clips": done, "failed": failed, "seconds": round(wall, 3),
            "clips_per_s": done / wall, "frames_per_s": done * frames / wall,
            "clips_per_cpu_s": done / cpu}


def _clips(workdir: Path) -> Path:
    for i in range(4):
        for codec in ("h264", "vp9"):
            write_clip(workdir / f"{codec}_{i}", codec, frames=250, width=640, height=360, gop=50)
    build_manifest(workdir, workdir / "manifest.jsonl", progress=False, workers=1)
    return workdir / "manifest.jsonl"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.bench_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default="", help="clips to read (default: write some)")
    parser.add_argument("--frames", type=int, default=16, help="frames sampled per clip")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=32, help="clips decoded per backend")
    parser.add_argument("--batch", type=int, default=4, help="DALI batch size")
    parser.add_argument("--out", default="bench_data.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Manifest(args.manifest or _clips(Path(tmp)))
        sampling = Sampling(args.frames, seed=0)
        results = []
        for codec in sorted(manifest.codec_counts()):
            rows = [r for r in range(len(manifest)) if manifest.codec(r) == codec]
            picks = [rows[i % len(rows)] for i in range(args.samples)]
            paths = [manifest.path(r) for r in picks]
            draws = [sampling.draw(i, r, int(manifest.num_frames[r]), int(manifest.heights[r]),
                                   int(manifest.widths[r])) for i, r in enumerate(picks)]
            seekable = {manifest.path(r): bool(manifest.seekable[r]) for r in rows}
            backends: dict[str, Callable | str] = {"pyav+torch": _pyav(args.size, seekable)}
            try:
                backends["decord+torch"] = _decord(args.size)
            except ImportError:
                backends["decord+torch"] = "decord not installed (pip install decord)"
            if dali.missing():
                backends["dali cpu"] = backends["dali mixed"] = dali.missing()
            else:
                backends["dali cpu"] = (_dali(args.size, args.batch, None)
                                        if codec in dali.CPU_CODECS else
                                        f"DALI's CPU decoder cannot decode {codec}")
                backends["dali mixed"] = (_dali(args.size, args.batch, 0)
                                          if torch.cuda.is_available() else "no GPU")
            for name, run in backends.items():
                row = {"codec": codec, "backend": name}
                if isinstance(run, str):
                    row["skipped"] = run
                else:
                    row |= measure(run, paths, draws, args.frames)
                results.append(row)
    header = (f"{'codec':6} {'backend':14} {'clips/s':>8} {'frames/s':>9} {'clips/cpu-s':>12} "
              f"{'failed':>6}")
    print(header)
    print("-" * len(header))
    for r in results:
        if "skipped" in r:
            print(f"{r['codec']:6} {r['backend']:14} {'-':>8} {'-':>9} {'-':>12}  ({r['skipped']})")
        else:
            print(f"{r['codec']:6} {r['backend']:14} {r['clips_per_s']:8.2f} "
                  f"{r['frames_per_s']:9.1f} {r['clips_per_cpu_s']:12.2f} {r['failed']:6d}")
    report = {"frames": args.frames, "size": args.size, "samples": args.samples,
              "manifest": args.manifest or "generated 640x360, 250 frames, gop 50",
              "machine": platform.platform(), "cores_used": 1, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
