"""Communication accounting: the bytes each process group's collectives move, measured and analytic.

:class:`CommCounter` wraps ``torch.distributed``'s collective and point-to-point functions for the
duration of a ``with`` block: the public names, the ``distributed_c10d`` globals they come from,
and every alias a loaded module bound at import time (megatron-core's ``dist_all_gather_func`` /
``dist_reduce_scatter_func`` in ``tensor_parallel.{layers,mappings,utils}`` and
``distributed.param_and_grad_buffer``, or any ``from torch.distributed import all_reduce``). Every
call is labelled by its process group and counted once on the calling rank; calls that torch makes
inside a counted call (``batch_isend_irecv``'s sends, ``all_gather_into_tensor`` forwarding to
``all_gather_single``) are not counted again. Nothing in megatron-core is edited: the attributes are
swapped on entry and restored on exit.

Payload convention (bytes this rank hands to one call):

- all-reduce, broadcast, reduce, send, recv: the tensor's bytes;
- all-gather: the gathered output's bytes; reduce-scatter: the input's bytes (both the full,
  unsharded tensor); all-to-all: the input's bytes; gather / scatter: the full (group size x
  chunk) tensor's bytes;
- a p2p payload counts on both ends (the sender's ``send``, the receiver's ``recv``).

:meth:`CommCounter.wire_bytes` turns payloads into the bytes a rank puts on its links with ring
algorithms: all-reduce ``2 (n-1)/n S``, all-gather / reduce-scatter / all-to-all / gather / scatter
``(n-1)/n S``, broadcast / reduce ``S`` (pipelined chain; 0 when n = 1), p2p ``S``.

The analytic side (:func:`tp_layer_volume`, :func:`tp_layer_grad_volume`, :func:`pp_volume`,
:func:`dp_volume`) gives the same payloads from the layout's numbers, for InternVideo2's block on
megatron-core's local spec (Column/RowParallelLinear, no fused or overlapped communication). Keys are
the op kinds of :data:`KINDS`; :func:`ring_wire_bytes` turns them into wire bytes.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import types
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.distributed as dist

# op name -> kind; the kind sets the payload rule (below) and the ring factor of wire_bytes
KINDS = {
    "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "all_gather_into_tensor": "all_gather",
    "all_gather_single": "all_gather",
    "_all_gather_base": "all_gather",
    "all_gather": "all_gather",
    "all_gather_coalesced": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter": "reduce_scatter",
    "all_to_all_single": "all_to_all",
    "all_to_all": "all_to_all",
    "broadcast": "broadcast",
    "reduce": "reduce",
    "gather": "gather",
    "scatter": "scatter",
    "send": "send",
    "isend": "send",
    "recv": "recv",
    "irecv": "recv",
}
# the argument holding the counted tensor(s), per op (see the payload convention)
_PAYLOAD_ARG = {
    "all_reduce": "tensor",
    "all_reduce_coalesced": "tensors",
    "all_gather_into_tensor": "output_tensor",
    "all_gather_single": "output_tensor",
    "_all_gather_base": "output_tensor",
    "all_gather": "tensor_list",
    "all_gather_coalesced": "output_tensor_lists",
    "reduce_scatter_tensor": "input",
    "reduce_scatter_single": "input",
    "_reduce_scatter_base": "input",
    "reduce_scatter": "input_list",
    "all_to_all_single": "input",
    "all_to_all": "input_tensor_list",
    "broadcast": "tensor",
    "reduce": "tensor",
    "gather": "tensor",
    "scatter": "tensor",
    "send": "tensor",
    "isend": "tensor",
    "recv": "tensor",
    "irecv": "tensor",
}
_WHOLE_GROUP = {"gather", "scatter"}  # the argument is one rank's chunk: times the group size


def _nbytes(value) -> int:
    """Bytes of a tensor or of (nested) lists of tensors."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _ring_factor(kind: str, n: int) -> float:
    if kind in ("send", "recv"):
        return 1.0
    if n <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2.0 * (n - 1) / n
    if kind in ("broadcast", "reduce"):
        return 1.0
    return (n - 1) / n


class CommCounter:
    """Counts the payload bytes of every collective and p2p call this rank makes inside ``with``.

    ``groups`` maps a label to a process group, or to a tuple of groups that count as one (e.g.
    megatron-core's data-parallel group and its with-context-parallel twin when cp = 1). Calls on
    the default group (``group=None``) are labelled ``"world"`` (p2p calls there: see
    :meth:`label`), on any other group ``"other"``. Build it after the groups exist. A ``P2POp``
    must be built and run inside the same ``with`` block (torch matches its ``op`` against the
    functions in place).
    """

    def __init__(self, groups: dict[str, object]) -> None:
        self._labels: dict[int, str] = {}
        self._members: list[tuple[str, frozenset[int]]] = []  # label, global ranks; in order
        self._groups = []  # keeps the groups alive, so their ids stay theirs
        for label, value in groups.items():
            for group in value if isinstance(value, (list, tuple)) else (value,):
                if group is not None:
                    self._labels.setdefault(id(group), label)
                    self._members.append((label, frozenset(dist.get_process_group_ranks(group))))
                    self._groups.append(group)
        self._patched: list[tuple[types.ModuleType, str, Callable]] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget everything counted so far."""
        self.bytes: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.by_op: dict[tuple[str, str], float] = defaultdict(float)
        self._wire: dict[str, float] = defaultdict(float)

    def wire_bytes(self) -> dict[str, float]:
        """Label -> ring-algorithm estimate of the bytes this rank moved over its links."""
        return dict(self._wire)

    def by_kind(self) -> dict[tuple[str, str], float]:
        """(label, kind) -> payload bytes, the ops folded into the kinds of :data:`KINDS`."""
        out: dict[tuple[str, str], float] = defaultdict(float)
        for (label, op), nbytes in self.by_op.items():
            out[label, KINDS[op]] += nbytes
        return out

    def label(self, group, peer: int | None = None) -> str:
        """The label of a call on ``group``; a p2p call on the default group with the global
        rank ``peer`` takes the first label whose group holds both ends (megatron-core sends one
        direction of a two-rank pipeline over the default group)."""
        if group is not None and group is not dist.GroupMember.WORLD:
            return self._labels.get(id(group), "other")
        if peer is not None:
            me = dist.get_rank()
            for label, ranks in self._members:
                if me in ranks and peer in ranks and peer != me:
                    return label
        return "world"

    def _record(self, op: str, nbytes: int, group, peer: int | None = None) -> None:
        label = self.label(group, peer)
        n = group.size() if group is not None else dist.get_world_size()
        if op in _WHOLE_GROUP:
            nbytes *= n
        with self._lock:
            self.bytes[label] += nbytes
            self.calls[label] += 1
            self.by_op[label, op] += nbytes
            self._wire[label] += nbytes * _ring_factor(KINDS[op], n)

    def _counted(self, op: str, fn: Callable) -> Callable:
        """``fn`` counting its call (unless it runs inside another counted call)."""
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if getattr(self._local, "depth", 0):
                return fn(*args, **kwargs)
            if op == "batch_isend_irecv":
                for p2p in args[0] if args else kwargs["p2p_op_list"]:
                    self._record(p2p.op.__name__, _nbytes(p2p.tensor), p2p.group, p2p.peer)
            else:
                bound = signature.bind(*args, **kwargs).arguments
                peers = [bound.get(k) for k in ("dst", "src", "group_dst", "group_src")]
                peer = next((p for p in peers if p is not None), None)
                self._record(op, _nbytes(bound.get(_PAYLOAD_ARG[op])), bound.get("group"),
                             peer if KINDS[op] in ("send", "recv") else None)
            self._local.depth = 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = 0

        return wrapper

    def __enter__(self) -> CommCounter:
        if self._patched:
            raise RuntimeError("this CommCounter is already counting (it is not re-entrant)")
        c10d = dist.distributed_c10d
        originals = {id(getattr(c10d, op)): op for op in (*KINDS, "batch_isend_irecv")
                     if hasattr(c10d, op)}
        wrappers = {}
        for module in list(sys.modules.values()):
            if not isinstance(module, types.ModuleType):
                continue
            for name, value in list(vars(module).items()):
                op = originals.get(id(value))
                if op is None:
                    continue
                if op not in wrappers:
                    wrappers[op] = self._counted(op, value)
                self._patched.append((module, name, value))
                setattr(module, name, wrappers[op])
        return self

    def __exit__(self, *exc) -> None:
        for module, name, value in reversed(self._patched):
            setattr(module, name, value)
        self._patched.clear()


def megatron_groups() -> dict[str, object]:
    """Labels for megatron-core's process groups: ``tp``, ``pp``, ``dp`` (with its context-parallel
    twin and the distributed optimizer's intra-instance group when cp = 1; else ``dp``, ``cp`` and
    ``dp_cp`` apart; the gloo twins of the data-parallel groups, which carry distributed-optimizer
    checkpoints, count as theirs), ``mp`` (tp x pp: the gradient norm) and ``dist_opt`` (the
    distributed optimizer's instance group: its gradient norm). Narrow groups come first, which
    decides the label of p2p calls on the default group (see :meth:`CommCounter.label`)."""
    from megatron.core import parallel_state as ps

    def optional(getter, **kwargs):
        try:
            return getter(**kwargs)
        except AssertionError:  # a group megatron-core did not create
            return None

    dp = (ps.get_data_parallel_group(), optional(ps.get_data_parallel_group_gloo))
    dp_cp = (
        ps.get_data_parallel_group(with_context_parallel=True),
        ps.get_data_parallel_group(with_context_parallel=True, partial_data_parallel=True),
        optional(ps.get_data_parallel_group_gloo, with_context_parallel=True),
        optional(ps.get_data_parallel_group_gloo, with_context_parallel=True,
                 partial_data_parallel=True),
    )
    groups = {"tp": ps.get_tensor_model_parallel_group(), "pp": ps.get_pipeline_model_parallel_group()}
    if ps.get_context_parallel_world_size() == 1:
        groups["dp"] = dp + dp_cp
    else:
        groups |= {"dp": dp, "cp": ps.get_context_parallel_group(), "dp_cp": dp_cp}
    groups["mp"] = ps.get_model_parallel_group()
    groups["dist_opt"] = optional(ps.get_intra_distributed_optimizer_instance_group)
    return groups


def ring_wire_bytes(volume: dict[str, float], n: int) -> float:
    """What an analytic volume (kind -> payload bytes on a group of ``n`` ranks) puts on each
    rank's links, with :meth:`CommCounter.wire_bytes`'s ring factors: an all-gather or
    reduce-scatter payload costs half of an all-reduce one."""
    return sum(nbytes * _ring_factor(kind, n) for kind, nbytes in volume.items())


def tp_layer_volume(tokens: int, micro_batch: int, hidden: int, bytes_per_value: int, tp: int,
                    sp: bool, qk_norm: bool, recompute: str = "none",
                    backward: bool = True) -> dict[str, float]:
    """Payload bytes one InternVideo2 block moves on its TP group per micro-batch, forward and
    backward, by kind (zeros at tp = 1, where megatron-core skips the collectives).

    ``tokens`` is the whole sequence the block sees (padded to a multiple of tp under SP). With
    A = tokens x micro_batch x hidden x bytes_per_value (one [s, b, h] activation):

    - without SP: all-reduce of the two row-parallel outputs (attention proj, fc2) in the forward
      and of the two column-parallel input gradients (qkv, fc1) in the backward: 4 A;
    - with SP: all-gather of the column inputs (forward), again in the backward for the weight
      gradient (megatron-core keeps only the shard), and of the row output gradients: 6 A;
      reduce-scatter of the row outputs (forward) and of the column input gradients: 4 A;
    - full-width q/k RMSNorm: all-reduce of q's and k's sum of squares [s, b, 1, 1] in fp32,
      forward and backward: 4 x tokens x micro_batch x 4;
    - ``recompute="full"`` runs the forward collectives again in the backward (row outputs, column
      inputs under SP, the q/k statistics); ``"selective"`` recomputes core attention, which has
      none;
    - ``backward=False`` (a frozen teacher under no_grad): the forward's collectives only.
    """
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute is none, selective or full, not {recompute!r}")
    out = {"all_reduce": 0.0, "all_gather": 0.0, "reduce_scatter": 0.0}
    if tp == 1:
        return out
    act = float(tokens * micro_batch * hidden * bytes_per_value)  # [s, b, h]
    stats = float(tokens * micro_batch * 4)  # [s, b, 1, 1] fp32
    forwards = 2 if recompute == "full" else 1
    gathers, others = (4, 2) if backward else (0, 0)
    if sp:
        out["all_gather"] = (2 * forwards + gathers) * act
        out["reduce_scatter"] = (2 * forwards + others) * act
    else:
        out["all_reduce"] = (2 * forwards + others) * act
    if qk_norm:
        out["all_reduce"] += (2 * forwards + others) * stats
    return out


def tp_layer_grad_volume(hidden: int, tp: int, sp: bool, norm_bias: bool = False,
                         layer_scale: bool = True, linear_bias: bool = True,
                         grad_bytes: int = 4) -> dict[str, float]:
    """Payload bytes one block adds per step (not per micro-batch) to megatron-core's TP
    all-reduce of the gradients of parameters that sequence parallelism replicates over TP: the two
    norms (weight, and bias for LayerNorm), the two layer scales and the two row-parallel biases,
    in the main-gradient dtype (fp32 with ``grad_reduce_in_fp32``). Zero without SP."""
    if tp == 1 or not sp:
        return {"all_reduce": 0.0}
    values = 2 * hidden * (1 + norm_bias + layer_scale + linear_bias)
    return {"all_reduce": float(values * grad_bytes)}


def pp_volume(tokens: int, micro_batch: int, hidden: int, bytes_per_value: int, micro_batches: int,
              pp: int, pp_rank: int, vpp: int = 1, tp: int = 1, sp: bool = False) -> dict[str, float]:
    """Payload bytes of one step's pipeline p2p on pipeline rank ``pp_rank``: {"send", "recv"}.

    Each micro-batch crosses every boundary between consecutive model chunks once forward (the
    activation) and once backward (its gradient), each [tokens(/tp under SP), b, h]. Rank r holds
    ``vpp`` chunks; all but the very first have a predecessor, all but the very last a successor:
    a rank sends activations to successors and gradients to predecessors, and receives the same.
    """
    if pp == 1:
        return {"send": 0.0, "recv": 0.0}
    seq = tokens // tp if sp and tp > 1 else tokens
    one = float(seq * micro_batch * hidden * bytes_per_value)  # [s(/tp), b, h]
    with_next = vpp - (pp_rank == pp - 1)
    with_prev = vpp - (pp_rank == 0)
    transfers = micro_batches * (with_next + with_prev)
    return {"send": transfers * one, "recv": transfers * one}


def dp_volume(params: int, dp: int, distributed_optimizer: bool, grad_bytes: int = 4,
              param_bytes: int = 4) -> dict[str, float]:
    """Payload bytes of one step's data-parallel reduction on one rank, for ``params`` trainable
    parameters held by the rank (its TP/PP shard): an all-reduce of the gradients, or with the
    distributed optimizer a reduce-scatter of the gradients and an all-gather of the updated
    parameters. Zeros at dp = 1 (megatron-core still issues the calls on its one-rank group).
    megatron-core's buffers add padding under the distributed optimizer (each parameter starts on a
    multiple of 64 values, each bucket ends on a multiple of lcm(dp, 128)), not counted here."""
    out = {"all_reduce": 0.0, "reduce_scatter": 0.0, "all_gather": 0.0}
    if dp == 1:
        return out
    if distributed_optimizer:
        out["reduce_scatter"] = float(params * grad_bytes)
        out["all_gather"] = float(params * param_bytes)
    else:
        out["all_reduce"] = float(params * grad_bytes)
    return out
