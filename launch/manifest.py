"""Probe videos into a manifest: ``python -m launch.manifest VIDEO_DIR_OR_CSV -o manifest.jsonl``.

Reads a directory of videos or an annotation file (InternVideo2's JSON / JSON Lines with
``video`` and ``caption``, or CSV/TXT ``path label`` lines), probes every file with PyAV in
parallel and writes one JSON line per usable clip; unusable files go to ``rejected.jsonl`` (next
to the manifest) with the reason. Run it again to continue an interrupted probe. Exit codes: 0
done, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from dataloaders.manifest import build_manifest
from launch.common import exit_with


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.manifest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a directory of videos, or an annotation file "
                        "(.json, .jsonl, .csv, .txt)")
    parser.add_argument("-o", "--output", required=True, help="the manifest to write (.jsonl)")
    parser.add_argument("--rejected", default="",
                        help="where unusable files go (default: rejected.jsonl beside -o)")
    parser.add_argument("--root", default="", help="prefix of the annotation's relative paths "
                        "(default: the annotation file's directory)")
    parser.add_argument("-j", "--workers", type=int, default=0,
                        help="probing processes (default: one per core)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        kept, rejected = build_manifest(args.source, args.output, args.rejected or None,
                                        args.root, args.workers, not args.no_progress)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        exit_with(f"cannot build the manifest: {e}")
    print(f"{kept} clips in {args.output}, {rejected} rejected", file=sys.stderr)


if __name__ == "__main__":
    main()
