"""The processes on this machine found by their environment (a SLURM job's id, a test's marker)."""

from __future__ import annotations

from pathlib import Path


def _words(path: Path) -> list[str]:
    return path.read_bytes().decode(errors="replace").split("\0")


def processes_with(entry: str) -> dict[int, tuple[str, list[str]]]:
    """{pid: (command line, environment)} of the processes whose environment holds ``entry``
    (``NAME=value``)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and entry in (environ := _words(proc / "environ")):
                found[int(proc.name)] = (" ".join(_words(proc / "cmdline")), environ)
        except OSError:
            continue
    return found
