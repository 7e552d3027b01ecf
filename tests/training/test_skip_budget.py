"""The skip budget (megavideo.training.data.SkipBudget): judged over a window of attempts, so one
bad file among the first decodes does not stop a run, and the stop names the files."""

from __future__ import annotations

import pytest

from dataloaders.loader import DataError
from megavideo.training.data import SkipBudget


def test_one_bad_file_early_does_not_stop_a_run():
    budget = SkipBudget(0.05, 2000)  # 100 failures allowed until 2000 attempts were made
    assert budget.add(0, 1, 17) == pytest.approx(1 / 17)  # 5.9% of the run so far: not a stop
    for step in range(1, 50):
        budget.add(step, 2, 40)  # a steady 5%
    with pytest.raises(DataError) as err:
        budget.add(50, 30, 40, names=lambda: [f"/v/bad{i}.mp4" for i in range(7)])
    message = str(err.value)
    assert message.startswith("step 50: 128 of the last 2000 clip decodes failed, above "
                              "data.max_skip_rate=0.05 of data.skip_window=2000 attempts "
                              "(129 of 2017 in the run): /v/bad0.mp4, /v/bad1.mp4")
    assert "and 2 more" in message and "\n" not in message


def test_the_window_forgets_old_failures():
    budget = SkipBudget(0.05, 100)
    budget.add(0, 5, 100)  # 5 of 100: at the budget, not above it
    for step in range(1, 10):
        budget.add(step, 0, 100)  # a clean stretch pushes them out of the window
    assert sum(s for s, _ in budget.recent) == 0
    budget.add(10, 5, 100)
    with pytest.raises(DataError, match="step 11: 6 of the last 100"):
        budget.add(11, 6, 100)


def test_the_budget_resumes_from_a_checkpoint():
    budget = SkipBudget(0.05, 100)
    for step in range(3):
        budget.add(step, 2, 60)
    resumed = SkipBudget(0.05, 100)
    resumed.restore(budget.state())
    assert (resumed.skipped, resumed.attempts, list(resumed.recent)) == (
        budget.skipped, budget.attempts, list(budget.recent))
    assert resumed.add(3, 1, 60) == budget.add(3, 1, 60)
