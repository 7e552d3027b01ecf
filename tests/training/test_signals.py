"""SLURM's warning signal during a save: held back from the save's helper processes, delivered
to the training loop once the save has started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from megavideo.training.checkpoint import StopSignal, signals_held


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
