"""What an operator meets before a job runs: every sbatch script finds its checkout and writes its
log wherever it was submitted from, and the warnings that say nothing to an operator stay out of
the log."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from launch.common import setup_logging

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "slurm").glob("*.sbatch"))
LOCATOR = ('script=$(scontrol show job -o "$SLURM_JOB_ID" | grep -o " Command=[^ ]*" | cut -d= -f2-)\n'
           'source "${MEGAVIDEO_HOME:-$(dirname "$script")/..}/slurm/common.sh" || exit 2\n')


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_every_script_runs_from_any_directory(script):
    """The locator and log line the local cluster's test submits from another directory
    (tests/slurm: the kill -9 test) are every script's."""
    text = script.read_text()
    assert LOCATOR in text and "#SBATCH --output=%x-%j.out\n" in text
    assert text.rstrip().endswith('megavideo_train "$CONFIG" "$@"')
    assert (ROOT / text.split("CONFIG=", 1)[1].split("\n", 1)[0]).is_file()


def test_megatron_cores_resume_warnings_are_filtered():
    """The two FutureWarnings megatron-core's checkpoint loading raises at every resume (seen in
    a resumed run's log, once per rank), and only those."""
    setup_logging()
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("`load_state_dict` is deprecated and will be removed in future versions. "
                      "Please use `load` instead.", FutureWarning, stacklevel=1)
        warnings.warn("Please use DTensor instead and we are deprecating ShardedTensor.",
                      FutureWarning, stacklevel=1)
        warnings.warn("something an operator should read", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something an operator should read"]
