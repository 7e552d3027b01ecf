"""The pipeline bubble: its analytic share of a step and its measurement on one rank.

A stage of a ``p``-stage pipeline running ``m`` micro-batches under 1F1B computes for
``m * (t_f + t_b)`` of a step that lasts ``(m + p - 1) * (t_f + t_b)``: it idles while the first
micro-batch fills the pipeline and while the last one drains it. With ``v`` model chunks per rank
(the interleaved schedule) a chunk's forward and backward take ``1/v`` of the stage's, so the fill
and drain shrink by ``v``. :func:`bubble_fraction` is that idle share. :func:`schedule_bubble`
drops the equal-stages assumption: it replays megatron-core's order of forwards and backwards on
every rank with given durations (measured ones, say) and free communication.

:class:`PipelineTimer` measures it: it wraps megatron-core's ``forward_step`` and ``backward_step``
(this rank's compute, "busy") and the three schedules (the step's span) in
``megatron.core.pipeline_parallel.schedules``, whose schedules look these names up in the module at
every call, so the wrappers are seen by 1F1B, the interleaved schedule and the unpipelined one
alike. megatron-core's source is untouched; the attributes are restored on exit.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import schedules

from parallel.comm import group_device

SCHEDULES = ("forward_backward_no_pipelining", "forward_backward_pipelining_without_interleaving",
             "forward_backward_pipelining_with_interleaving")


def bubble_fraction(pp: int, microbatches: int, vpp: int = 1) -> float:
    """Idle share of a pipeline stage's step time: ``(p-1) / (v*m + p-1)``.

    ``(p-1)/(m+p-1)`` for 1F1B (``vpp`` 1); the interleaved schedule with ``vpp`` chunks per rank
    divides the fill-and-drain time by ``vpp``. Assumes equal stages (every stage, and every chunk,
    takes the same forward time and the same backward time) and free communication; see
    :func:`schedule_bubble` for unequal ones.
    """
    if pp < 1 or microbatches < 1 or vpp < 1:
        raise ValueError(f"pp, microbatches and vpp must be positive, got {pp}, {microbatches}, {vpp}.")
    return (pp - 1) / (vpp * microbatches + pp - 1)


def warmup_forwards(rank: int, pp: int, vpp: int, total: int) -> int:
    """Forwards pipeline rank ``rank`` runs before its first backward in megatron-core's 1F1B
    (``vpp`` 1) or interleaved schedule, of its ``total`` forward calls (micro-batches x chunks)."""
    warmup = pp - rank - 1 if vpp == 1 else 2 * (pp - rank - 1) + (vpp - 1) * pp
    return min(warmup, total)


def _order(rank: int, pp: int, vpp: int, microbatches: int) -> list[tuple[str, int, int]]:
    """Rank ``rank``'s ("F" or "B", chunk, micro-batch) in megatron-core's order: the warm-up
    forwards, then one forward and one backward at a time, then the remaining backwards (the
    interleaved schedule with its default of ``pp`` micro-batches per chunk in a row)."""
    table = schedules.get_schedule_table(microbatches, vpp, pp)  # (micro-batch, chunk)
    total = len(table)
    warmup = warmup_forwards(rank, pp, vpp, total)
    forward = [("F", chunk, mb) for mb, chunk in table]
    backward = [("B", vpp - 1 - chunk, mb) for mb, chunk in table]
    steady = [op for k in range(total - warmup) for op in (forward[warmup + k], backward[k])]
    return forward[:warmup] + steady + backward[total - warmup:]


def schedule_bubble(forward_s: list[list[float]], backward_s: list[list[float]], vpp: int = 1) -> float:
    """Mean idle share over the ranks of megatron-core's 1F1B (``vpp`` 1) or interleaved schedule
    when rank ``r``'s k-th forward call takes ``forward_s[r][k]`` seconds and its k-th backward
    ``backward_s[r][k]`` (in the order the schedule calls them, as :class:`StepTiming` records
    them; ``m * vpp`` each), and communication is free.

    Every operation starts as soon as its rank is free and its input is there: a forward after the
    previous virtual stage's forward of that micro-batch, a backward after the next one's
    backward. With equal durations this is :func:`bubble_fraction`.
    """
    pp = len(forward_s)
    calls = len(forward_s[0])
    if any(len(f) != calls or len(b) != calls for f, b in zip(forward_s, backward_s, strict=True)):
        raise ValueError("every rank needs as many forward and backward durations as the first.")
    microbatches = calls // vpp
    if calls % vpp or vpp > 1 and microbatches % pp:
        raise ValueError(f"{calls} calls a rank are not m * vpp with m a multiple of pp, as "
                         f"megatron-core's interleaved schedule needs (pp {pp}, vpp {vpp}).")
    orders = [_order(r, pp, vpp, microbatches) for r in range(pp)]
    durations = [{"F": iter(f), "B": iter(b)} for f, b in zip(forward_s, backward_s, strict=True)]
    last = pp * vpp - 1
    done: dict[tuple[str, int, int], float] = {}  # (kind, virtual stage, micro-batch) -> end
    free = [0.0] * pp
    position = [0] * pp
    while any(position[r] < len(orders[r]) for r in range(pp)):
        moved = False
        for r in range(pp):
            while position[r] < len(orders[r]):
                kind, chunk, mb = orders[r][position[r]]
                stage = chunk * pp + r  # megatron-core's interleaved assignment
                if kind == "F":
                    ready = done.get(("F", stage - 1, mb)) if stage > 0 else 0.0
                else:
                    ready = done.get(("B", stage + 1, mb) if stage < last else ("F", stage, mb))
                if ready is None:
                    break
                free[r] = max(free[r], ready) + next(durations[r][kind])
                done[(kind, stage, mb)] = free[r]
                position[r] += 1
                moved = True
        if not moved:
            raise RuntimeError("the schedule replay stalled: no rank's next operation has its input.")
    span = max(free)
    return statistics.fmean(1.0 - (sum(f) + sum(b)) / span
                            for f, b in zip(forward_s, backward_s, strict=True))


def _clock() -> float:
    """``time.perf_counter`` after the queued CUDA work is done (when CUDA is in use)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


@dataclass
class StepTiming:
    """One step on this rank: its span, and the duration of each forward and backward call."""

    step_s: float = 0.0
    forward_s: list[float] = field(default_factory=list)
    backward_s: list[float] = field(default_factory=list)

    @property
    def busy_s(self) -> float:
        return sum(self.forward_s) + sum(self.backward_s)

    @property
    def bubble(self) -> float:
        return 1.0 - self.busy_s / self.step_s if self.step_s > 0 else 0.0


class PipelineTimer:
    """Busy and idle time of this rank in megatron-core's pipeline schedules.

    Usage::

        with PipelineTimer(group=pp_group) as timer:
            for step in range(steps):
                with timer.step():
                    forward_backward(step)  # calls get_forward_backward_func()(...)
        timer.bubble()

    Only schedule calls inside :meth:`step` are timed. A step's span runs from the schedule's start
    to the end of this rank's last forward or backward; with ``group`` (the pipeline group) the
    ranks meet at a barrier before the schedule starts and take the longest span among them after
    it returns, so every stage's step spans the whole fill and drain and its idle share is the
    bubble. Without ``group`` the span ends at this rank's own last compute. What the schedule does
    after the last backward (the gradient all-reduce of ``finalize_model_grads``) is not counted;
    neither is anything else inside :meth:`step` but outside the schedule (data, teachers).
    Idle includes the schedule's own work between computations: its p2p hand-offs and bookkeeping.
    The clock is read after a ``torch.cuda.synchronize()`` when CUDA is in use, which serialises
    communication that would otherwise overlap compute; the barrier and the all-reduce add one
    collective each per step: the timer is for measuring runs.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.steps: list[StepTiming] = []
        self._current: StepTiming | None = None
        self._last_end = 0.0
        self._saved: dict[str, object] = {}

    def __enter__(self) -> PipelineTimer:
        self._saved = {name: getattr(schedules, name)
                       for name in ("forward_step", "backward_step", *SCHEDULES)}
        schedules.forward_step = self._compute(self._saved["forward_step"], "forward_s")
        schedules.backward_step = self._compute(self._saved["backward_step"], "backward_s")
        for name in SCHEDULES:
            setattr(schedules, name, self._schedule(self._saved[name]))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(schedules, name, fn)
        self._saved = {}

    @contextlib.contextmanager
    def step(self) -> Iterator[StepTiming]:
        """Mark one training step (one or more schedule calls); appended to ``steps`` on exit."""
        self._current = StepTiming()
        try:
            yield self._current
            self.steps.append(self._current)
        finally:
            self._current = None

    def _compute(self, fn, kind: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self._current is None:
                return fn(*args, **kwargs)
            start = _clock()
            out = fn(*args, **kwargs)
            self._last_end = _clock()
            getattr(self._current, kind).append(self._last_end - start)
            return out
        return timed

    def _schedule(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self._current is None:
                return fn(*args, **kwargs)
            if self.group is not None:
                dist.barrier(group=self.group)
            start = self._last_end = _clock()
            out = fn(*args, **kwargs)
            span = self._last_end - start
            if self.group is not None:
                longest = torch.tensor([span], dtype=torch.float64,
                                       device=group_device(self.group))
                dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=self.group)
                span = float(longest.item())
            self._current.step_s += span
            return out
        return timed

    @property
    def busy_s(self) -> float:
        """Seconds this rank spent in forward and backward steps, over the recorded steps."""
        return sum(s.busy_s for s in self.steps)

    @property
    def step_s(self) -> float:
        """Seconds the recorded steps' schedules lasted."""
        return sum(s.step_s for s in self.steps)

    def bubble(self) -> float:
        """Measured idle share of the recorded steps on this rank: ``1 - busy / step``."""
        return 1.0 - self.busy_s / self.step_s if self.step_s > 0 else 0.0

    def stats(self) -> dict[str, float]:
        """Totals over the recorded steps, the bubble (overall and the median step's) and the
        mean duration of one forward and one backward call (one micro-batch of one chunk)."""
        forward = [t for s in self.steps for t in s.forward_s]
        backward = [t for s in self.steps for t in s.backward_s]
        return {
            "steps": len(self.steps),
            "busy_s": self.busy_s,
            "idle_s": self.step_s - self.busy_s,
            "step_s": self.step_s,
            "bubble": self.bubble(),
            "median_bubble": statistics.median(s.bubble for s in self.steps) if self.steps else 0.0,
            "forward_s": statistics.fmean(forward) if forward else 0.0,
            "backward_s": statistics.fmean(backward) if backward else 0.0,
        }


__all__ = ["PipelineTimer", "StepTiming", "bubble_fraction", "schedule_bubble"]
