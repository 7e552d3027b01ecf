"""Submit a chain of training stages to SLURM, each starting from the previous stage's checkpoint.

    python -m launch.submit SCRIPT [key=value ...] [SCRIPT [key=value ...] ...] [--dry-run]

Each SCRIPT is an sbatch script of slurm/ (its ``CONFIG=`` line names the run config); the
``key=value`` items after it override that stage's config. Stage k+1 is submitted with
``--dependency=afterok:<stage k> --kill-on-invalid-dep=yes`` and ``checkpoint.load=<stage k's
checkpoint directory>`` (unless it sets ``checkpoint.load`` itself), so it starts from stage k's
final checkpoint and is cancelled, not left pending forever, when stage k fails. Every config is
loaded and checked against its job's task count before anything is queued; the first job is held
until all are queued, and a failed submission cancels the ones before it. ``--dry-run`` prints the
commands (a shell script) without submitting.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from launch.common import exit_with
from megavideo.config import Config, ConfigError, load_config, validate_world


@dataclass
class Stage:
    script: Path
    overrides: list[str] = field(default_factory=list)
    config: Config | None = None

    @property
    def checkout(self) -> Path:
        """Where the job runs (``slurm/common.sh``): ``MEGAVIDEO_HOME``, else the checkout that
        holds the script; the config's relative paths are relative to it."""
        return Path(os.environ.get("MEGAVIDEO_HOME") or self.script.resolve().parent.parent)

    def checkpoint_dir(self) -> Path:
        """The stage's checkpoint directory as its job sees it."""
        return (self.checkout / self.config.checkpoint_dir).resolve()

    def sbatch(self, options: list[str], dependency: str | None, hold: bool) -> list[str]:
        cmd = ["sbatch", "--parsable"]
        if hold:
            cmd.append("--hold")
        if dependency:
            cmd += [f"--dependency=afterok:{dependency}", "--kill-on-invalid-dep=yes"]
        return [*cmd, *options, str(self.script), *self.overrides]


def split_stages(items: list[str]) -> list[Stage]:
    """``[a.sbatch, k=v, b.sbatch]`` -> stages; an item with ``=`` overrides the stage before it."""
    stages: list[Stage] = []
    for item in items:
        if "=" in item and not Path(item).is_file():
            if not stages:
                raise ConfigError(f"override '{item}' comes before any sbatch script.")
            stages[-1].overrides.append(item)
        else:
            stages.append(Stage(Path(item)))
    return stages


def sbatch_directives(script: Path) -> list[str]:
    """The options of a script's ``#SBATCH`` lines (sbatch reads them up to the first command)."""
    tokens: list[str] = []
    for line in script.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            tokens += shlex.split(line[len("#SBATCH"):], comments=True)
        elif line.strip() and not line.startswith("#"):
            break
    return tokens


def task_count(options: list[str]) -> int | None:
    """Tasks of a job from sbatch options (later ones win); None when they do not say exactly."""
    names = {"--nodes": "nodes", "-N": "nodes", "--ntasks": "ntasks", "-n": "ntasks",
             "--ntasks-per-node": "per_node"}
    found: dict[str, str] = {}
    tokens = iter(options)
    for token in tokens:
        name, sep, value = token.partition("=")
        if name in names:
            found[names[name]] = value if sep else next(tokens, "")
        elif token[:2] in ("-N", "-n") and token[2:].isdigit():
            found[names[token[:2]]] = token[2:]
    if found.get("ntasks", "").isdigit():
        return int(found["ntasks"])
    nodes, per_node = found.get("nodes", "1"), found.get("per_node", "1")
    if nodes.isdigit() and per_node.isdigit():
        return int(nodes) * int(per_node)
    return None


def prepare(stages: list[Stage], options: list[str]) -> None:
    """Load and check every stage's config; chain the checkpoints (raises ConfigError)."""
    for number, stage in enumerate(stages, 1):
        where = f"stage {number} ({stage.script})"
        if not stage.script.is_file():
            raise ConfigError(f"{where}: no such sbatch script.")
        match = re.search(r"^CONFIG=(\S+)$", stage.script.read_text(), re.MULTILINE)
        if not match:
            raise ConfigError(f"{where}: the script has no CONFIG=<run config> line.")
        previous = stages[number - 2].checkpoint_dir() if number > 1 else None
        if previous and not any(o.startswith("checkpoint.load=") for o in stage.overrides):
            stage.overrides.append(f"checkpoint.load={previous}")
        try:
            with contextlib.chdir(stage.checkout):  # the job reads its config's paths there
                stage.config = load_config(match.group(1), stage.overrides)
            tasks = task_count(sbatch_directives(stage.script) + options)
            if tasks is not None:
                validate_world(stage.config, tasks)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        if stage.checkpoint_dir() == previous:
            raise ConfigError(f"{where} would write its checkpoints into stage {number - 1}'s "
                              f"({previous}) and resume from them: give it another run.dir.")


def shell_line(cmd: list[str]) -> str:
    """A command as shell text, the ``$JOBn`` of a dependency left for the shell to expand."""
    return " ".join(arg if re.fullmatch(r"--dependency=afterok:\$JOB\d+", arg) else shlex.quote(arg)
                    for arg in cmd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", nargs="+", metavar="SCRIPT_OR_OVERRIDE",
                        help="sbatch scripts in chain order, each followed by its key=value overrides")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTIONS",
                        help="sbatch options for every stage, e.g. --sbatch='--nodes=16 --time=4:00:00'")
    parser.add_argument("--after", metavar="JOBID", help="the first stage waits for this job (afterok)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, submit nothing")
    args = parser.parse_args(argv)
    options = [token for text in args.sbatch for token in shlex.split(text)]
    try:
        stages = split_stages(args.stages)
        prepare(stages, options)
    except ConfigError as err:
        exit_with(err)

    if args.dry_run:
        for n, stage in enumerate(stages):
            cmd = stage.sbatch(options, f"$JOB{n}" if n else args.after, hold=n == 0)
            print(f"JOB{n + 1}=$({shell_line(cmd)})")
        print("scontrol release $JOB1")
        return

    if not shutil.which("sbatch"):
        exit_with(RuntimeError("sbatch is not on PATH: run this on a SLURM login node (or use "
                               "--dry-run)."), 1)
    jobs: list[str] = []
    for n, stage in enumerate(stages):
        cmd = stage.sbatch(options, jobs[-1] if jobs else args.after, hold=n == 0)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            cancelled = ""
            if jobs:
                subprocess.run(["scancel", *jobs])
                cancelled = f"; cancelled job(s) {', '.join(jobs)} of the stages before it"
            exit_with(RuntimeError(f"sbatch of stage {n + 1} failed ({proc.stderr.strip()})"
                                   f"{cancelled}."), 1)
        jobs.append(proc.stdout.strip().split(";")[0])
    subprocess.run(["scontrol", "release", jobs[0]], check=True)
    for n, (stage, job) in enumerate(zip(stages, jobs, strict=True), 1):
        after = f"after {jobs[n - 2]}" if n > 1 else (f"after {args.after}" if args.after else "")
        print(f"stage {n}: job {job}  {stage.script}  -> {stage.checkpoint_dir()}  {after}".rstrip())


if __name__ == "__main__":
    main()
