"""Runs that survive: resume bit for bit, atomic saves, resharding on load, the non-finite guard.

Every run here is the real entry point under torchrun (gloo, CPU), on the tiny preset.
Reshard tolerances (fp32, summation order only): relative 1e-5 on the losses of the three steps
after loading (measured: <= 2e-7); on the weights and Adam moments saved three steps later
|a - b| <= 1e-4 * max|a| + 1e-6 * (largest entry of that kind: weights, exp_avg, exp_avg_sq)
(measured: <= 1.2e-7 of the largest; the absolute term covers tensors whose exact gradient is 0,
e.g. the attention pool's key biases, see test_parity).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.distributed import free_port, torchrun
from tests.training.checkpoint_worker import differences

ROOT = Path(__file__).resolve().parents[2]
TINY = "configs/stage1_tiny.yaml"
BASE = ["train.steps=6", "train.warmup_steps=1"]
ENV = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
ONE_RANK = ["parallel.tp=1", "parallel.pp=1", "parallel.sp=false"]
PROFILED = ["profile.peak_tflops=0.01", "profile.comm=true", "profile.pipeline=true"]


def _cmd(nproc: int, overrides: list[str], module: str = "launch.train") -> list[str]:
    return [*torchrun(nproc), "-m", module, TINY, *overrides]


def _train(nproc: int, overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(nproc, overrides), cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=ENV)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """6 steps at tp2 x pp2 + SP without interruption, checkpoints after steps 3 and 6, with the
    throughput accounting on (it changes no number the other runs compare)."""
    run_dir = tmp_path_factory.mktemp("straight")
    proc = _train(4, [*BASE, f"run.dir={run_dir}", "checkpoint.interval=3", *PROFILED])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_a_four_rank_run_logs_metrics_and_learns(straight):
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))
    for key in ("loss", "loss/clip", "loss/final", "loss/mae", "grad_norm", "lr", "samples_per_s",
                "perf/model_tflops", "perf/hardware_tflops", "perf/mfu", "perf/hfu",
                "perf/video_tokens_per_s", "mem/peak_gib", "pipeline/bubble"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    assert glob.glob(str(straight / "tb" / "events.out.tfevents.*"))
    last = rows[-1]
    assert last["perf/mfu"] == pytest.approx(last["perf/model_tflops"] / 0.01)
    assert last["perf/hardware_tflops"] > last["perf/model_tflops"]  # 5 heads padded to 6 at tp 2
    assert last["pipeline/bubble_formula"] == pytest.approx(1 / 5)  # pp 2, 4 micro-batches
    assert 0.0 < last["pipeline/bubble"] < 1.0
    # the blocks' collectives, the activations between stages: the teachers, heads and targets
    # travel on the same groups, so the measured bytes are at least the analytic ones
    for group in ("tp", "pp"):
        assert last[f"comm/{group}_bytes"] >= last[f"comm/{group}_analytic_bytes"] > 0, group


def test_sigusr1_saves_exits_75_and_the_resumed_run_matches_bit_for_bit(straight, tmp_path):
    overrides = [*BASE, f"run.dir={tmp_path}"]
    proc = subprocess.Popen(_cmd(4, overrides), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "launch.train" in " ".join(p.cmdline())]
    assert len(workers) == 4
    workers[-1].send_signal(signal.SIGUSR1)  # one rank only: the ranks agree at the step boundary
    _, stderr = proc.communicate(timeout=300)
    assert "exitcode  : 75" in stderr, stderr[-3000:]
    saved = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert saved in {f"step_{s:08d}" for s in (3, 4, 5)}, saved

    resumed = _train(4, overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"loaded checkpoint from {tmp_path / 'checkpoints' / saved}" in resumed.stderr
    assert _losses(tmp_path) == _losses(straight)  # exact equality of every step's loss
    assert len(_losses(tmp_path)) == 6


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    overrides = [*ONE_RANK, "train.global_batch=4", "train.steps=3", "train.warmup_steps=1",
                 f"run.dir={tmp_path}", "checkpoint.interval=1", "checkpoint.keep=2"]
    env = {**ENV, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    log = tmp_path / "crashed.log"
    with open(log, "w") as out:
        crashed = subprocess.Popen([sys.executable, "-m", "tests.training.checkpoint_worker", TINY,
                                    ".tmp_step_00000002", *overrides], cwd=ROOT, env=env,
                                   stdout=out, stderr=out, start_new_session=True)
        returncode = crashed.wait(timeout=300)
    with contextlib.suppress(ProcessLookupError):  # as a job's end would: the writer it forked too
        os.killpg(crashed.pid, signal.SIGKILL)
    assert returncode == -signal.SIGKILL, log.read_text()[-3000:]
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert (root / ".tmp_step_00000002" / "metadata.json").is_file()  # written, never committed
    assert not (root / "step_00000002").exists()
    before = _losses(tmp_path)

    resumed = _train(1, overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"loaded checkpoint from {root / 'step_00000001'}" in resumed.stderr
    after = _losses(tmp_path)
    assert sorted(after) == [0, 1, 2] and after[1] == before[1]
    assert not list(root.glob(".tmp_*"))
    assert (root / "latest").read_text().strip() == "step_00000003"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000003"]  # keep 2


@pytest.mark.parametrize(
    ("name", "nproc", "layout"),
    [
        ("tp1_pp1", 1, ONE_RANK),
        ("dp2_tp1_pp2_distopt", 4, ["parallel.tp=1", "parallel.pp=2", "parallel.sp=false",
                                    "parallel.distributed_optimizer=true"]),
        ("tp4_sp", 4, ["parallel.tp=4", "parallel.pp=1", "parallel.sp=true"]),  # heads 5 -> 8
        ("pp4", 4, ["parallel.tp=1", "parallel.pp=4", "parallel.sp=false"]),  # tied pos-embed copies
    ],
)
def test_a_checkpoint_reshards_on_load(straight, tmp_path, name, nproc, layout):
    root = tmp_path / "checkpoints"
    root.mkdir()
    for part in ("step_00000003", "teachers"):
        shutil.copytree(straight / "checkpoints" / part, root / part)
    (root / "latest").write_text("step_00000003\n")
    proc = _train(nproc, [*BASE, *layout, "train.steps=6", f"run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = _losses(straight), _losses(tmp_path)
    assert sorted(got) == [3, 4, 5]
    for step in (3, 4, 5):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (name, step)
    # what this layout saves after 3 more steps (weights, Adam moments) is what tp2 x pp2 saved
    diffs = differences(straight / "checkpoints" / "step_00000006", root / "step_00000006")
    kind = {k: ".".join(k.split(".")[: 1 if k.startswith("model.") else 2]) for k in diffs}
    largest = {}
    for key, (_, scale) in diffs.items():
        largest[kind[key]] = max(largest.get(kind[key], 0.0), scale)
    for key, (diff, scale) in diffs.items():
        assert diff <= 1e-4 * scale + 1e-6 * largest[kind[key]], (name, key, diff, scale)


def test_non_finite_loss_stops_with_step_rank_and_terms(tmp_path):
    proc = _train(1, [*ONE_RANK, "train.global_batch=4", "train.lr=1e30", "train.steps=4",
                      "train.warmup_steps=0", f"run.dir={tmp_path}", "checkpoint.interval=1"])
    assert "exitcode  : 3" in proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("error: ")][-1]
    assert line.startswith("error: step 1: non-finite loss or gradient norm on rank(s) 0 (loss/clip nan")
    assert "grad_norm nan" in line
    assert line.endswith(f"stopped without saving, the last good checkpoint is "
                         f"{tmp_path / 'checkpoints' / 'step_00000001'}.")
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000001"


def test_a_checkpoint_of_another_model_is_refused(straight, tmp_path):
    proc = _train(1, [*ONE_RANK, "train.global_batch=4", "model.student.mlp_hidden_size=160",
                      f"checkpoint.load={straight / 'checkpoints'}", f"run.dir={tmp_path}"])
    line = [x for x in proc.stderr.splitlines() if x.startswith("error: ")][-1]
    assert line == (f"error: checkpoint {straight / 'checkpoints' / 'step_00000006'} was written for "
                    "another model: model.student.mlp_hidden_size 320 != 160.")


def test_bf16_distributed_optimizer_resumes_bit_for_bit(tmp_path):
    """bf16 weights, fp32 master weights and moments sharded over dp 2. The first part stops at
    train.steps=2; with one warm-up step the learning rates of steps 0 and 1 do not depend on
    train.steps, so the runs are comparable."""
    layout = [*ONE_RANK, "parallel.distributed_optimizer=true", "train.precision=bf16",
              "train.warmup_steps=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for run_dir, steps in ((straight, 4), (split, 2), (split, 4)):
        proc = _train(2, [*layout, f"train.steps={steps}", f"run.dir={run_dir}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded checkpoint from" in proc.stderr
    assert _losses(split) == _losses(straight) and len(_losses(split)) == 4


def test_an_async_save_writes_what_a_blocking_save_writes(tmp_path):
    """Every step saved, in the background while the next steps run (dp 2, the distributed
    optimizer): each checkpoint equals the blocking run's tensor for tensor, so the snapshot is
    the weights of its step, and the last is committed before the run ends."""
    layout = [*ONE_RANK, "parallel.distributed_optimizer=true", "train.steps=3", "train.warmup_steps=1",
              "checkpoint.interval=1", "checkpoint.keep=3"]
    blocking, background = tmp_path / "blocking", tmp_path / "background"
    for run_dir, extra in ((blocking, []), (background, ["checkpoint.async_save=true"])):
        proc = _train(2, [*layout, f"run.dir={run_dir}", *extra])
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written in the background" in proc.stderr
    assert _losses(background) == _losses(blocking)
    root = background / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000003"
    assert not list(root.glob(".tmp_*"))
    for step in (1, 2, 3):
        name = f"step_{step:08d}"
        gaps = differences(blocking / "checkpoints" / name, root / name)
        assert all(gap == 0.0 for gap, _ in gaps.values()), name
