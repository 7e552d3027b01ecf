"""How a run stops and what it leaves: SLURM's warning signal during a save (held back from the
save's helper processes, delivered to the training loop once the save has started), the
time-based save, the checkpoint writer's helper dying with its rank, and what the batch script
learns of a rank's end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch import train
from launch.common import peer_failed
from megavideo.config import ConfigError, load_config
from megavideo.training.checkpoint import SaveClock, StopSignal, signals_held
from tests.processes import processes_with

ROOT = Path(__file__).resolve().parents[2]


def test_a_signal_during_a_save_reaches_the_loop_after_it_and_spares_its_helpers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        stop = StopSignal()
        with signals_held():
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.received is None  # held while the save starts its helpers
            helper = subprocess.run(
                [sys.executable, "-c", "import signal; "
                 "print(sorted(s.name for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))"],
                capture_output=True, text=True, check=True)
        assert "SIGUSR1" in helper.stdout and "SIGTERM" in helper.stdout  # inherited: immune
        assert stop.received == signal.SIGUSR1  # delivered when the mask is restored
        assert not signal.pthread_sigmask(signal.SIG_BLOCK, []) & {signal.SIGUSR1, signal.SIGTERM}
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_save_is_due_every_minutes_since_the_last(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    clock = SaveClock(30)
    now[0] += 30 * 60 - 1
    assert not clock.due()
    now[0] += 1
    assert clock.due()
    clock.saved()
    assert not clock.due() and not SaveClock(0).due()  # 0: off
    with pytest.raises(ConfigError, match="checkpoint.every_minutes must be >= 0"):
        load_config(ROOT / "configs/stage1_tiny.yaml", ["checkpoint.every_minutes=-1"])


def _marked(marker: str, but: int) -> list[int]:
    """The processes whose environment holds ``marker``, other than ``but``."""
    return [pid for pid in processes_with(marker) if pid != but]


def _helpers_gone_after_a_kill_9(code: str, helpers: int, tmp_path: Path) -> None:
    """Run ``code`` (it prints ``up`` once its helpers run), count its ``helpers``, SIGKILL it:
    they are all gone within 5 s."""
    marker = f"MEGAVIDEO_TEST_MARK={tmp_path.name}"
    rank = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "MEGAVIDEO_TEST_MARK": tmp_path.name})
    assert rank.stdout.readline() == "up\n"
    assert len(_marked(marker, rank.pid)) == helpers
    rank.kill()
    rank.wait()
    deadline = time.monotonic() + 5
    while _marked(marker, rank.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _marked(marker, rank.pid) == []


def test_the_checkpoint_writers_helper_dies_with_its_rank(tmp_path):
    """The manager megatron-core's writer would start and leave behind after a SIGKILL (tied to
    its rank here), and its resource tracker: both gone within a second of the kill."""
    code = ("import sys, time; from parallel.checkpointing import writer_tied_to_rank; "
            "writer_tied_to_rank(); print('up', flush=True); time.sleep(600)")
    _helpers_gone_after_a_kill_9(code, 2, tmp_path)  # the manager and the resource tracker


def test_processes_a_rank_forks_die_with_it(tmp_path):
    """As megatron-core's asynchronous save does: the rank forks a writer, which forks file
    writers; after the rank's SIGKILL none is left (they would wait on a queue for ever)."""
    code = """
import multiprocessing, os, sys, time
from parallel.lifetime import forked_children_die_with_this_process
forked_children_die_with_this_process()
fork = multiprocessing.get_context("fork")
def file_writer(): time.sleep(600)
def writer(ready):
    fork.Process(target=file_writer).start()
    ready.set()
    time.sleep(600)
ready = fork.Event()
fork.Process(target=writer, args=(ready,)).start()
ready.wait()
print("up", flush=True)
time.sleep(600)
"""
    _helpers_gone_after_a_kill_9(code, 2, tmp_path)


def test_a_stop_signal_after_the_exit_is_decided_keeps_its_code():
    """srun's SIGTERM to a rank exiting 5 (a peer failed) while CPython shuts down, which
    restores the signal's default action first: 143 (-15 here) unless the rank ignores it."""
    code = """
import os, signal, sys
from launch import train
class SrunsTerm:
    def __del__(self):  # runs as the interpreter shuts down, after the handler is gone
        os.kill(os.getpid(), signal.SIGTERM)
signal.signal(signal.SIGTERM, lambda *_: None)  # as the training loop's StopSignal does
term = SrunsTerm()
if len(sys.argv) > 1:
    train._exit_decided()
sys.exit(5)
"""
    run = [sys.executable, "-c", code]
    assert subprocess.run(run, cwd=ROOT).returncode == -signal.SIGTERM
    assert subprocess.run(run + ["decided"], cwd=ROOT).returncode == 5


def test_rank_0_reports_how_it_ended_for_the_batch_script(tmp_path, monkeypatch):
    status = tmp_path / "status" / "7"
    monkeypatch.setenv("MEGAVIDEO_STATUS_FILE", str(status))
    assert train._report(0, "requeue") and status.read_text() == "requeue"
    assert train._report(3, "2") and status.read_text() == "requeue"  # only rank 0 writes
    monkeypatch.delenv("MEGAVIDEO_STATUS_FILE")
    assert not train._report(0, "0")


def test_a_collective_broken_by_a_peer_is_told_from_a_ranks_own_fault():
    assert peer_failed(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                                    "[127.0.0.1]:2983"))
    assert peer_failed(torch.distributed.DistBackendError("NCCL error: remote process exited"))
    assert not peer_failed(RuntimeError("CUDA out of memory"))
    assert not peer_failed(ValueError("a bad value"))
