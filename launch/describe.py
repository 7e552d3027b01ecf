"""Describe a model: ``python -m launch.describe CONFIG [key=value ...] [--json] [--gpus N]``.

Parameter counts (blocks, embeddings, heads, teachers), computed on the meta device, and what each
rank holds for the configured layout.
"""

from __future__ import annotations

import argparse
import json

from launch.common import config_or_exit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.describe", description=__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--gpus", type=int, default=None,
                        help="world size, for the data-parallel size (default: tp x pp)")
    args = parser.parse_args(argv)
    cfg = config_or_exit(args.config, args.overrides)
    from megavideo.accounting.describe import describe, format_table

    info = describe(cfg, args.gpus)
    print(json.dumps(info, indent=2) if args.json else format_table(info))


if __name__ == "__main__":
    main()
