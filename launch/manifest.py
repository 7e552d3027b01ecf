"""Probe videos into a manifest: ``python -m launch.manifest VIDEO_DIR_OR_CSV -o manifest.jsonl``.

Reads a directory of videos or an annotation file (InternVideo2's JSON / JSON Lines with
``video`` and ``caption``, or CSV/TXT ``path label`` lines), probes every file with PyAV in
parallel and writes one JSON line per usable clip; every other file (whatever its name: videos
are recognised by content) goes to ``rejected.jsonl`` (next to the manifest) with the reason.
Run it again to continue an interrupted probe or to bring the manifest up to date: files changed
since (size, modification time) are probed again and vanished ones rejected. Exit codes: 0 done,
2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from dataloaders.manifest import VERIFY_LEVELS, build_manifest
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
    parser.add_argument("--verify", choices=VERIFY_LEVELS, default="frames",
                        help="quick: demux and the first frame; frames (default): decode every "
                        "frame once, as training will see them; seeks: also read frames by "
                        "timestamp and compare them with that decode")
    parser.add_argument("--dali", action="store_true", help="also reject what DALI's decoder "
                        "would not give exactly (rotated, unseekable, resolution-changing or "
                        "edit-listed files)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        built = build_manifest(args.source, args.output, args.rejected or None, args.root,
                               args.workers, not args.no_progress, args.verify, args.dali)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        exit_with(f"cannot build the manifest: {e}")
    again = [f"{n} {what}" for n, what in ((built.reprobed, "probed again (changed since)"),
                                           (built.vanished, "vanished"),
                                           (built.dropped, "no longer listed, dropped")) if n]
    print(f"{built.kept} clips in {args.output}, {built.rejected} rejected; {built.probed} files "
          f"probed (--verify {args.verify}){'; ' + ', '.join(again) if again else ''}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
