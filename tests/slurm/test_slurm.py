"""The sbatch launchers on a real SLURM cluster (slurm/local/start.sh: slurmctld and two slurmd on
this machine), the stage chain, and MPI start-up.

The jobs of this module are submitted together, beside one uninterrupted torchrun reference run,
so that their start-up and the requeue delay overlap on a 2-core machine. Without root (or apt to
install SLURM) the cluster tests skip with the reason; CI sets MEGAVIDEO_REQUIRE_SLURM=1 to make
that a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from launch.submit import sbatch_directives, task_count
from tests.distributed import torchrun
from tests.processes import processes_with

ROOT = Path(__file__).resolve().parents[2]
SLURM_DIR = Path(os.environ.get("MEGAVIDEO_SLURM_DIR", "/tmp/megavideo-slurm"))
STEPS = 6
# the stage-1 tiny config at tp 2 x dp 2 (2 nodes x 2 tasks)
LAYOUT = ("parallel.pp=1", f"train.steps={STEPS}", "train.warmup_steps=1")
COMPARED = ("loss", "loss/clip", "loss/final", "loss/mae", "grad_norm", "lr")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED"}


def _unavailable(reason: str) -> None:
    if os.environ.get("MEGAVIDEO_REQUIRE_SLURM") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _same_metrics(rows: list[dict], reference: list[dict], keys: tuple = COMPARED) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for row, ref in zip(rows, reference, strict=True):
        for key in keys:
            assert row[key] == ref[key], (row["step"], key, row[key], ref[key])


class Background:
    """A training run started in the background (4 ranks, tp 2 x dp 2)."""

    def __init__(self, launcher: list[str], run_dir: Path, *overrides: str) -> None:
        self.run_dir = run_dir
        cmd = [*launcher, sys.executable, "-m", "launch.train", "configs/stage1_tiny.yaml",
               *LAYOUT, *overrides, f"run.dir={run_dir}"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.output = ""

    def rows(self) -> list[dict]:
        if self.proc.returncode is None:
            self.output, _ = self.proc.communicate(timeout=600)
        assert self.proc.returncode == 0, self.output[-4000:]
        return _metrics(self.run_dir)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Background:
    """The uninterrupted run, under torchrun."""
    ref = Background([*torchrun(4), "--no-python"], tmp_path_factory.mktemp("torchrun"),
                     "checkpoint.save_at_end=false")
    yield ref
    ref.kill()


@pytest.fixture(scope="module")
def cluster() -> dict:
    """The environment for SLURM commands; the cluster is stopped after the module when this
    module started it."""
    env = {**os.environ, "SLURM_CONF": str(SLURM_DIR / "slurm.conf"), "OMP_NUM_THREADS": "1",
           "MEGAVIDEO_PYTHON": sys.executable}
    if os.geteuid() != 0:
        _unavailable("the local SLURM cluster needs root (slurm/local/start.sh).")
    proc = subprocess.run([ROOT / "slurm/local/start.sh"], capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.returncode:
        _unavailable(f"the local SLURM cluster did not start: {proc.stderr.strip()}")
    yield env
    if "already running" not in proc.stdout:
        subprocess.run([ROOT / "slurm/local/stop.sh"], capture_output=True, env=env, timeout=120)


def _run(cmd: list, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def job_fields(job: str, env: dict, tries: int = 3) -> dict:
    """``scontrol show job``'s fields; a request the busy controller times out is asked again."""
    for attempt in range(tries):
        try:
            out = _run(["scontrol", "show", "job", "-o", job], env)
            return dict(token.split("=", 1) for token in out.split() if "=" in token)
        except (AssertionError, subprocess.TimeoutExpired):
            if attempt == tries - 1:
                raise
            time.sleep(5)


@dataclass
class Job:
    id: str
    log: Path
    run_dir: Path
    env: dict

    def wait(self, timeout: float = 400) -> dict:
        """The job's scontrol fields once it has ended (requeues included)."""
        deadline = time.monotonic() + timeout
        while True:
            fields = job_fields(self.id, self.env)
            if fields["JobState"] in ENDED:
                return fields
            if time.monotonic() > deadline:
                pytest.fail(f"job {self.id} still {fields['JobState']} after {timeout} s:\n"
                            f"{self.text()[-3000:]}")
            time.sleep(0.5)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture(scope="module")
def jobs(reference, cluster, tmp_path_factory) -> dict:
    """A job trained without interruption ("u"); a two-stage chain, p (stage 1) -> b (stage 2),
    both under `srun --mpi=pmix`, where p gets USR1 after its first step and b starts its video
    encoder from p's final checkpoint; and a run under mpirun. The reference run starts first,
    beside the cluster's start-up."""
    tmp = tmp_path_factory.mktemp("slurm")
    chain = _run([sys.executable, "-m", "launch.submit",
                  "slurm/stage1_tiny.sbatch", *LAYOUT, f"run.dir={tmp / 'p'}",
                  "slurm/stage2_tiny.sbatch", "train.steps=1", "train.warmup_steps=0",
                  "checkpoint.save_at_end=false", f"run.dir={tmp / 'b'}",
                  f"--sbatch=--output={tmp}/%j.out"], {**cluster, "MEGAVIDEO_SRUN_ARGS": "--mpi=pmix"})
    ids = re.findall(r"^stage \d: job (\d+)", chain, re.MULTILINE)
    assert len(ids) == 2, chain
    whole = _run(["sbatch", "--parsable", f"--output={tmp}/%j.out", "slurm/stage1_tiny.sbatch",
                  *LAYOUT, "checkpoint.save_at_end=false", f"run.dir={tmp / 'u'}"], cluster)
    made = {name: Job(job, tmp / f"{job}.out", tmp / name, cluster)
            for name, job in zip(("p", "b", "u"), (*ids, whole.strip()), strict=True)}
    # USR1 to the batch shell (what --signal=B:USR1@<s> sends) once the first step is logged
    deadline = time.monotonic() + 300
    metrics = made["p"].run_dir / "metrics.jsonl"
    while "\n" not in (metrics.read_text() if metrics.exists() else ""):  # a whole line
        if time.monotonic() > deadline or job_fields(made["p"].id, cluster)["JobState"] in ENDED:
            pytest.fail(f"job {made['p'].id} logged no step:\n{made['p'].text()[-3000:]}")
        time.sleep(0.2)
    _run(["scancel", "--signal=USR1", "--batch", made["p"].id], cluster)
    # the mpirun run (start.sh installed Open MPI) uses the cores while job p waits to requeue
    mpirun = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "4",
              "-x", "OMP_NUM_THREADS=1"]
    made["mpirun"] = Background(mpirun, tmp / "mpirun", "train.steps=2",
                                "checkpoint.save_at_end=false")
    yield made
    made["mpirun"].kill()


def test_a_2x2_sbatch_job_trains_like_torchrun(jobs, reference):
    job = jobs["u"]
    fields = job.wait()
    assert fields["JobState"] == "COMPLETED", job.text()[-3000:]
    assert "4 ranks via slurm, master n1:" in job.text()
    _same_metrics(_metrics(job.run_dir), reference.rows())


def test_a_signalled_job_checkpoints_requeues_itself_and_resumes(jobs, reference):
    job = jobs["p"]
    fields = job.wait()
    text = job.text()
    assert fields["JobState"] == "COMPLETED", text[-3000:]
    assert fields["Restarts"] == "1", text[-3000:]
    assert "USR1: the step checkpoints and stops" in text
    assert re.search(r"requeueing job \d+", text) and "restart 1:" in text
    assert re.search(r"loaded checkpoint from .*/p/checkpoints/step_0000000[1-5]", text)
    # the whole job's per-step losses are the uninterrupted run's
    _same_metrics(_metrics(job.run_dir), reference.rows())


def test_a_chain_runs_in_order_from_the_previous_stage_checkpoint(jobs):
    """b (stage 2) waits through p's requeue and starts from p's final stage-1 checkpoint."""
    first, second = jobs["p"].wait(), jobs["b"].wait()
    assert second["JobState"] == "COMPLETED", jobs["b"].text()[-3000:]
    assert first["Restarts"] == "1" and second["StartTime"] >= first["EndTime"]
    assert (f"loaded the video encoder of stage 1 from {jobs['p'].run_dir}/checkpoints/"
            "step_00000006" in jobs["b"].text())
    assert {"loss/vtc", "loss/avmlm"} <= set(_metrics(jobs["b"].run_dir)[0])


def test_the_stage3_substages_chain_align_caption_instruct(cluster, tmp_path):
    """VideoChat2's sub-stages as one chain on the local cluster: align (no LLM), then caption
    (from align's QFormer and video encoder, the frozen LLM fresh), then instruct with LoRA
    (from caption's checkpoint, the adapters fresh, 4 -> 8 frames)."""
    quick = ("train.steps=2", "train.warmup_steps=0")
    chain = _run([sys.executable, "-m", "launch.submit",
                  "slurm/stage3_align_tiny.sbatch", *quick, f"run.dir={tmp_path / 'a'}",
                  "slurm/stage3_caption_tiny.sbatch", *quick, f"run.dir={tmp_path / 'c'}",
                  "slurm/stage3_tiny.sbatch", *quick, "model.llm.tuning=lora",
                  "model.llm.lora_rank=4", "checkpoint.save_at_end=false",
                  f"run.dir={tmp_path / 'i'}", f"--sbatch=--output={tmp_path}/%j.out"], cluster)
    ids = re.findall(r"^stage \d: job (\d+)", chain, re.MULTILINE)
    assert len(ids) == 3, chain
    align, caption, instruct = (Job(job, tmp_path / f"{job}.out", tmp_path / name, cluster)
                                for name, job in zip("aci", ids, strict=True))
    for job in (align, caption, instruct):
        assert job.wait()["JobState"] == "COMPLETED", job.text()[-3000:]
    assert {"loss/vtc", "loss/vtm", "loss/cap"} <= set(_metrics(align.run_dir)[0])
    assert re.search(rf"loaded \d+ tensors of the align sub-stage at {tmp_path}/a/checkpoints/"
                     r"step_00000002 \(4 -> 4 frames\); fresh on this rank: "
                     r"qformer.extra_queries, qformer.proj, llm\n", caption.text()), caption.text()[-3000:]
    assert re.search(rf"loaded \d+ tensors of the caption sub-stage at {tmp_path}/c/checkpoints/"
                     r"step_00000002 \(4 -> 8 frames\); fresh on this rank: llm.lora\n",
                     instruct.text()), instruct.text()[-3000:]
    assert "loss/lm" in _metrics(instruct.run_dir)[0]


def test_a_chain_whose_later_stage_is_refused_by_sbatch_leaves_nothing_queued(cluster, tmp_path):
    bad = tmp_path / "bad.sbatch"
    bad.write_text((ROOT / "slurm/stage1_tiny.sbatch").read_text().replace(
        "#SBATCH --nodes=2", "#SBATCH --nodes=2\n#SBATCH --partition=no_such_partition"))
    # a script outside the checkout runs in MEGAVIDEO_HOME
    proc = subprocess.run([sys.executable, "-m", "launch.submit",
                           "slurm/stage1_tiny.sbatch", f"run.dir={tmp_path / 'a'}",
                           str(bad), f"run.dir={tmp_path / 'b'}"],
                          cwd=ROOT, capture_output=True, text=True,
                          env={**cluster, "MEGAVIDEO_HOME": str(ROOT)})
    assert proc.returncode == 1 and "sbatch of stage 2 failed" in proc.stderr, proc.stderr
    first = re.search(r"cancelled job\(s\) (\d+) of the stages before it", proc.stderr).group(1)
    assert job_fields(first, cluster)["JobState"] == "CANCELLED"


def test_chain_dry_run_prints_dependent_sbatch_commands(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launch.submit", "--dry-run",
         "slurm/stage1_tiny.sbatch", f"run.dir={tmp_path / 's1'}",
         "slurm/stage1_vit1b.sbatch", f"run.dir={tmp_path / 's2'}",
         "slurm/stage1_vit6b.sbatch", f"run.dir={tmp_path / 's3'}", "--sbatch=--time=2:00:00"],
        cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4 and lines[3] == "scontrol release $JOB1"
    assert lines[0].startswith("JOB1=$(sbatch --parsable --hold --time=2:00:00 slurm/stage1_tiny")
    for n in (2, 3):
        assert lines[n - 1].startswith(f"JOB{n}=$(sbatch --parsable --dependency=afterok:$JOB{n - 1} "
                                       "--kill-on-invalid-dep=yes --time=2:00:00 ")
        assert f"checkpoint.load={tmp_path / f's{n - 1}' / 'checkpoints'})" in lines[n - 1]


@pytest.mark.parametrize(("options", "tasks"), [
    (["--nodes=32", "--ntasks-per-node=8"], 256),
    (["--nodes", "2", "--ntasks-per-node", "2", "-N4"], 8),  # later options win
    (["-N", "3", "--ntasks=5"], 5),
    (["--nodes=2-4", "--ntasks-per-node=8"], None),  # a range: not known before the job runs
    ([], 1),
])
def test_task_count_reads_sbatch_options(options, tasks):
    assert task_count(options) == tasks


def test_sbatch_directives_stop_at_the_first_command(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/bash\n# a comment\n#SBATCH --nodes=2 --time=1:00:00  # two\n"
                      "#SBATCH -J 'my job'\necho hi\n#SBATCH --nodes=9\n")
    assert sbatch_directives(script) == ["--nodes=2", "--time=1:00:00", "-J", "my job"]


def test_chain_refuses_a_layout_that_does_not_fit_its_job_before_submitting(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launch.submit", "slurm/stage1_vit6b.sbatch", "--sbatch=--nodes=3"],
        cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: stage 1 (slurm/stage1_vit6b.sbatch): train.global_batch (2048) must be a multiple "
        "of train.micro_batch x data-parallel size (16 x 12).")


def test_mpirun_starts_the_same_training(jobs, reference):
    """4 ranks under mpirun (mpi4py broadcasts the master's address): 2 steps, the losses of
    the torchrun run."""
    run = jobs["mpirun"]
    rows = run.rows()
    assert "4 ranks via mpi" in run.output
    # the learning rate of step 1 follows the shorter schedule; what step 1 computes does not
    _same_metrics(rows, reference.rows()[:2], keys=COMPARED[:-1])


def _job_processes(job: str) -> dict[int, tuple[str, list[str]]]:
    """The processes on this machine (both nodes) of job ``job``, as its environment says."""
    return processes_with(f"SLURM_JOB_ID={job}")


def _rank_pid(job: str, rank: int) -> int:
    for pid, (cmd, environ) in _job_processes(job).items():
        if "launch.train" in cmd and not cmd.startswith("srun") and f"SLURM_PROCID={rank}" in environ:
            return pid
    raise AssertionError(f"no rank {rank} of job {job}")


def _ended(job: str, env: dict, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while (fields := job_fields(job, env))["JobState"] not in ENDED:
        assert time.monotonic() < deadline, fields["JobState"]
        time.sleep(0.1)
    return fields


@pytest.mark.parametrize("rank", [1, 0])
def test_kill_9_of_a_rank_after_a_save_ends_the_job_at_once_leaving_no_process(cluster, tmp_path,
                                                                              rank):
    """Submitted from another directory by the script's absolute path (the log lands there, the
    job finds its checkout), a rank killed with SIGKILL once the run has saved: the step's other
    ranks are stopped (srun --kill-on-bad-exit), the checkpoint writer's helpers die with their
    ranks, and the job ends within 10 s (measured: about 4 s) with nothing of it left; the log's
    last line says what happened."""
    job = subprocess.run(["sbatch", "--parsable", str(ROOT / "slurm/stage1_tiny.sbatch"),
                          "parallel.pp=1", "train.steps=400", "train.warmup_steps=1",
                          "checkpoint.interval=1", f"run.dir={tmp_path / 'k'}"],
                         cwd=tmp_path, capture_output=True, text=True, env=cluster, timeout=60)
    assert job.returncode == 0, job.stderr
    job = job.stdout.strip()
    log = tmp_path / f"megavideo-stage1-tiny-{job}.out"
    deadline = time.monotonic() + 300
    while not (tmp_path / "k/checkpoints/latest").exists():
        assert time.monotonic() < deadline and job_fields(job, cluster)["JobState"] not in ENDED, \
            log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.2)
    time.sleep(0.5)
    os.kill(_rank_pid(job, rank), 9)
    killed = time.monotonic()
    fields = _ended(job, cluster, 60)
    took = time.monotonic() - killed
    assert fields["JobState"] == "FAILED" and took < 10, (took, log.read_text()[-3000:])
    time.sleep(0.5)
    assert {pid: cmd for pid, (cmd, _) in _job_processes(job).items()} == {}
    text = log.read_text()
    assert f"[megavideo] checkout {ROOT}, log {log}\n" in text
    assert f"run {tmp_path / 'k'}: metrics {tmp_path / 'k/metrics.jsonl'}, checkpoints " \
           f"{tmp_path / 'k/checkpoints'}; steps 0 to 400, from the start" in text
    last = text.splitlines()[-1]
    if rank:  # rank 0 saw its peer go
        assert re.search(r"training exited with code 5: error: another rank ended first: ", last)
    else:
        assert re.search(r"training exited with code 137: task 0 on n1 was killed by signal 9 "
                         r"before it could say why", last), last


def test_a_bad_override_ends_the_job_with_rank_0s_code_and_the_cause_last(cluster, tmp_path):
    """One sentence, once, and last in the log; the job's code is the config error's (2), not
    that of the peers srun stopped after rank 0's exit."""
    job = subprocess.run(["sbatch", "--parsable", str(ROOT / "slurm/stage1_tiny.sbatch"),
                          "parallel.tp=3"], cwd=tmp_path, capture_output=True, text=True,
                         env=cluster, timeout=60)
    assert job.returncode == 0, job.stderr
    fields = _ended(job.stdout.strip(), cluster, 120)
    text = (tmp_path / f"megavideo-stage1-tiny-{job.stdout.strip()}.out").read_text()
    cause = "error: model.student.mlp_hidden_size (320) must be divisible by parallel.tp (3)."
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0", text
    assert text.count(cause) == 2 and text.endswith(f"training exited with code 2: {cause}\n")
    assert "Traceback" not in text and fields["Restarts"] == "0"


def test_a_signalled_job_at_its_restart_limit_saves_and_says_so(cluster, tmp_path):
    """MEGAVIDEO_MAX_RESTARTS=0 and USR1 on the first run: saved, not requeued, the count said."""
    job = subprocess.run(["sbatch", "--parsable", str(ROOT / "slurm/stage1_tiny.sbatch"),
                          "parallel.pp=1", "train.steps=400", "train.warmup_steps=1",
                          f"run.dir={tmp_path / 'r'}"], cwd=tmp_path, capture_output=True,
                         text=True, env={**cluster, "MEGAVIDEO_MAX_RESTARTS": "0"}, timeout=60)
    assert job.returncode == 0, job.stderr
    job = job.stdout.strip()
    deadline = time.monotonic() + 300
    while "\n" not in ((tmp_path / "r/metrics.jsonl").read_text()
                       if (tmp_path / "r/metrics.jsonl").exists() else ""):
        assert time.monotonic() < deadline and job_fields(job, cluster)["JobState"] not in ENDED
        time.sleep(0.2)
    _run(["scancel", "--signal=USR1", "--batch", job], cluster)
    fields = _ended(job, cluster, 120)
    text = (tmp_path / f"megavideo-stage1-tiny-{job}.out").read_text()
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("FAILED", "75:0", "0")
    assert "saved, but not requeued: restart 0 reached MEGAVIDEO_MAX_RESTARTS (0)" in text
    assert (tmp_path / "r/checkpoints/latest").exists()


def test_a_chain_submitted_from_another_directory_reads_paths_as_its_jobs_do(tmp_path):
    """The jobs run in the scripts' checkout: the configs and the relative run.dir are read
    there, and the next stage loads from the checkout's run directory."""
    proc = subprocess.run(
        [sys.executable, "-m", "launch.submit", "--dry-run",
         str(ROOT / "slurm/stage1_tiny.sbatch"), "run.dir=runs/elsewhere_s1",
         str(ROOT / "slurm/stage2_tiny.sbatch"), "run.dir=runs/elsewhere_s2"],
        cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"checkpoint.load={ROOT / 'runs/elsewhere_s1/checkpoints'})" in proc.stdout.splitlines()[1]
