"""The measured pipeline bubble of megatron-core's schedules against (p-1)/(v*m + p-1).

One spawn of two ranks (pp 2) times steps with :class:`megavideo.accounting.pipeline_timing.PipelineTimer`:

- stand-in stages whose forward and backward sleep a fixed time, under 1F1B (m = 4 micro-batches:
  formula 1/5) and the interleaved schedule (2 chunks a rank, m = 4: formula 1/9). The stages are
  equal, as the formula assumes, and the measured bubble is compared with :func:`bubble_fraction`;
- the stage-1 student through :class:`megavideo.training.loop.Trainer` under 1F1B (m = 4), with its own
  pipeline settings. Its stages are not equal, and not only in total: the first one's backward
  carries the patch embedding's, the last one's forward the aligners, the attention pool and the
  loss (the first stage's teachers run before the schedule, outside the timed span). On this kind
  of machine they differ by 5-15% with different forward/backward splits, which moves the bubble
  by points: a last stage 10% slower gives 0.222 instead of 1/5 (0.143 instead of 1/9 at pp 2 x
  vpp 2), a first stage 10% slower 0.208 (0.097). So the measured bubble is compared with
  :func:`schedule_bubble`, the formula fed with the step's measured forward and backward durations
  (megatron-core's order replayed with free communication), which is :func:`bubble_fraction` when
  the stages are equal.

Making a 2-core CPU measure it:
- compute dominates communication: a stand-in micro-batch costs 75 ms (1F1B) or 112 ms (two
  chunks) a stage, and the student is widened (512, MLP 2048) and sees half of its tokens,
  ~160 ms a micro-batch and stage, against ~1 ms of scheduling and gloo hand-off around each
  forward or backward; the timer rightly counts that as idle, and it is why the measured bubble
  sits ~1 point above the formula;
- the ranks do not compete for the cores where it can be avoided: the stand-ins sleep. The
  student's two ranks do compete (one thread each, and gloo's threads must preempt one to move a
  tensor), which with unequal stages and megatron-core's blocking hand-offs adds 2-4 points to the
  interleaved schedule's gap to the prediction: too close to the tolerance, so the student runs
  1F1B here (gap ~1 point) and the interleaved schedule is checked on the stand-ins;
- jitter: each step's bubble is averaged over the two stages (they share the step's span), the
  first step is warm-up, and the test takes the median of the others (for the student, of each
  step's gap to the prediction from that same step's durations).
"""

from __future__ import annotations

import statistics

import pytest
import torch

from megavideo.accounting.pipeline_timing import StepTiming, bubble_fraction, schedule_bubble
from tests.accounting import bubble_worker
from tests.distributed import spawn

PP = 2
MICROBATCHES = 4
STEPS = 5
WARMUP = 1
TOLERANCE = 0.05
UNIFORM = {  # name: (vpp, micro-batches, forward and backward seconds of a stage per micro-batch)
    "uniform_1f1b": (1, MICROBATCHES, 0.030, 0.045),
    "uniform_interleaved": (2, MICROBATCHES, 0.090, 0.135),
}
STUDENT_BASE = [
    "train.warmup_steps=0", "run.tensorboard=false", "parallel.tp=1", "parallel.sp=false",
    f"parallel.pp={PP}", "train.micro_batch=2", f"train.global_batch={2 * MICROBATCHES}",
    "model.student.hidden_size=512", "model.student.mlp_hidden_size=2048",
    "model.student.num_heads=8", "model.student.drop_path=0", "model.mask_ratio=0.5",
    "model.clip_layers=1", "model.mae_layers=1"]
STUDENT = {"student_1f1b": STUDENT_BASE + ["model.student.num_layers=6"]}  # name: overrides


@pytest.fixture(scope="module")
def timings(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bubble") / "timings.pt"
    spawn(2, bubble_worker.measure, UNIFORM, STUDENT, STEPS, str(out))
    return torch.load(out, weights_only=False)


def test_formula():
    assert bubble_fraction(2, 4) == pytest.approx(1 / 5)
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(2, 4, vpp=2) == pytest.approx(1 / 9)
    assert bubble_fraction(1, 8) == 0.0
    with pytest.raises(ValueError):
        bubble_fraction(2, 0)


@pytest.mark.parametrize("pp,microbatches,vpp", [(2, 4, 1), (2, 4, 2), (4, 8, 1), (4, 8, 2),
                                                 (3, 6, 3), (2, 2, 2), (4, 2, 1)])
def test_replayed_schedule_with_equal_stages_is_the_formula(pp, microbatches, vpp):
    forward = [[0.01] * (microbatches * vpp) for _ in range(pp)]
    backward = [[0.02] * (microbatches * vpp) for _ in range(pp)]
    assert schedule_bubble(forward, backward, vpp) == pytest.approx(bubble_fraction(pp, microbatches, vpp))


def test_replayed_schedule_rejects_what_megatron_rejects():
    with pytest.raises(ValueError):  # interleaving needs m a multiple of pp
        schedule_bubble([[0.01] * 6] * 2, [[0.02] * 6] * 2, vpp=2)


def test_replayed_schedule_with_a_slower_last_stage():
    # pp 2, m 2: stage 1 takes twice as long; by hand: F0 F0' | F1 B1 F1' B1' | B0 B0'
    forward, backward = [[1.0, 1.0], [2.0, 2.0]], [[1.0, 1.0], [2.0, 2.0]]
    span = 1 + 8 + 1  # stage 0's first forward, stage 1's four operations, stage 0's last backward
    assert schedule_bubble(forward, backward) == pytest.approx(((1 - 4 / span) + (1 - 8 / span)) / 2)


def _check_counts(ranks: list[list[StepTiming]], vpp: int) -> None:
    """The wrappers saw every forward and backward of every chunk, on every rank."""
    for steps in ranks:
        assert len(steps) == STEPS
        assert all(len(s.forward_s) == len(s.backward_s) == MICROBATCHES * vpp for s in steps)


def _measured(ranks: list[list[StepTiming]]) -> list[float]:
    """Each timed step's bubble, averaged over the stages."""
    return [statistics.fmean(steps[i].bubble for steps in ranks) for i in range(WARMUP, STEPS)]


def _describe(ranks: list[list[StepTiming]]) -> str:
    lines = []
    for rank, steps in enumerate(ranks):
        timed = steps[WARMUP:]
        fwd = statistics.fmean(t for s in timed for t in s.forward_s)
        bwd = statistics.fmean(t for s in timed for t in s.backward_s)
        lines.append(f"stage {rank}: forward {1e3 * fwd:.1f} ms, backward {1e3 * bwd:.1f} ms a call, "
                     f"step bubbles {[round(s.bubble, 3) for s in steps]}")
    return "\n".join(lines)


@pytest.mark.parametrize("name", UNIFORM)
def test_equal_stages_match_the_formula(timings, name):
    ranks, vpp = timings[name], UNIFORM[name][0]
    _check_counts(ranks, vpp)
    measured = statistics.median(_measured(ranks))
    expected = bubble_fraction(PP, MICROBATCHES, vpp)
    assert abs(measured - expected) < TOLERANCE, (
        f"{name}: measured bubble {measured:.3f}, formula {expected:.3f}\n{_describe(ranks)}")


def test_interleaving_shrinks_the_measured_bubble_as_the_formula_says(timings):
    """Interleaved (2 chunks a rank) below 1F1B, and by the formula's ratio (1/9 over 1/5) to
    within a quarter (the ~1 point of hand-off both carry weighs more on the smaller bubble)."""
    one, two = (statistics.median(_measured(timings[name])) for name in UNIFORM)
    assert two < one
    expected = bubble_fraction(PP, MICROBATCHES, 2) / bubble_fraction(PP, MICROBATCHES)
    assert two / one == pytest.approx(expected, rel=0.25), (one, two)


def test_student_matches_the_formula_at_its_stage_times(timings):
    ranks = timings["student_1f1b"]
    _check_counts(ranks, vpp=1)
    predicted = [schedule_bubble([steps[i].forward_s for steps in ranks],
                                 [steps[i].backward_s for steps in ranks])
                 for i in range(WARMUP, STEPS)]
    gaps = [m - p for m, p in zip(_measured(ranks), predicted, strict=True)]
    gap = statistics.median(gaps)
    assert abs(gap) < TOLERANCE, (
        f"measured bubble {statistics.median(_measured(ranks)):.3f}, at the measured stage "
        f"times {statistics.median(predicted):.3f} (median gap {gap:.3f}), equal-stage formula "
        f"{bubble_fraction(PP, MICROBATCHES):.3f}\n{_describe(ranks)}")


def test_schedules_restored(timings):
    assert timings["restored"]


def test_config_refuses_exactly_the_micro_batch_counts_megatron_refuses(timings):
    """validate_world's interleaving rule against megatron-core's own interleaved schedule (pp 2,
    vpp 2) for 1 to 8 micro-batches per step."""
    from megavideo.config import ConfigError, validate_interleaving

    def ours(m: int) -> bool:
        try:
            validate_interleaving(m, PP, "m")
        except ConfigError:
            return False
        return True

    megatron = timings["interleaving"]
    assert megatron == {m: ours(m) for m in range(1, 9)}
    assert sorted(m for m, ok in megatron.items() if ok) == [2, 4, 6, 8]
