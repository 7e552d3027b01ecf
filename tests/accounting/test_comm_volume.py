"""Communication accounting: bytes counted per process group against the analytic volumes.

One spawn of two gloo ranks runs every case (tests/accounting/comm_worker.py) on the stage-1 tiny model
(width 80, 5 heads padded to 6, 17 tokens, padded to 18 under SP; fp32; micro-batch 2, global
batch 4):

- TP (tp 2, without SP, with SP, with SP and full recomputation): the TP-group bytes of one
  ``forward_backward`` (2 micro-batches) at 4 and at 3 student layers. Their difference is what
  one block moves: the embedding's SP scatter, the aligners' and pool's gathers, the teachers
  (tensor-parallel too) and the heads are the same in both runs (same tokens, same 3 CLIP and 2
  MAE aligners on the last layers). Wrapping only the block stack cannot see the backward, which
  autograd runs outside it. The difference is micro-batches x ``tp_layer_volume`` plus, under SP,
  the once-per-step all-reduce of the block's replicated parameters' gradients
  (``tp_layer_grad_volume``); each kind agrees exactly.
- PP (pp 2, and 2 x 2 virtual stages): megatron-core's activation/gradient p2p (isend/irecv) of
  one ``forward_backward`` against ``pp_volume``, exactly (whole tensors of known shape; one
  direction of a two-rank pipeline goes over the default group and must still be labelled pp).
  Stage 1's first stage also sends the teachers' targets to the last (blocking send/recv on the
  same group): reported, not part of pp_volume.
- DP (dp 2, with and without the distributed optimizer): one ``train_step``. The gradient
  all-reduce must match ``dp_volume`` to within 64 bytes (the logged loss terms, 5 float64, are
  all-reduced over the same group). With the distributed optimizer megatron-core pads its buffer
  (each parameter starts on a multiple of 64 values, each bucket ends on one of lcm(dp, 128)):
  the reduce-scatter and all-gather must lie between ``dp_volume`` and ``dp_volume`` plus that
  padding's bound (measured: +0.60%).
"""

from __future__ import annotations

import json
import math

import pytest

from megavideo.accounting.comm_volume import (
    dp_volume,
    pp_volume,
    ring_wire_bytes,
    tp_layer_grad_volume,
    tp_layer_volume,
)
from megavideo.config import load_config
from tests.accounting import comm_worker
from tests.distributed import spawn

TP_CASES = {  # name: (overrides, sp, recompute)
    "tp2": (["parallel.tp=2"], False, "none"),
    "tp2_sp": (["parallel.tp=2", "parallel.sp=true"], True, "none"),
    "tp2_sp_full": (["parallel.tp=2", "parallel.sp=true", "train.recompute=full"], True, "full"),
}
DEPTHS = (3, 4)
CASES = [(f"{name}_L{depth}", overrides + [f"model.student.num_layers={depth}"], "forward_backward")
         for name, (overrides, _, _) in TP_CASES.items() for depth in DEPTHS]
CASES += [("pp2", ["parallel.pp=2"], "forward_backward"),
          ("pp2_vpp2", ["parallel.pp=2", "parallel.vpp=2"], "forward_backward"),
          ("dp2", [], "train_step"),
          ("dp2_distopt", ["parallel.distributed_optimizer=true"], "train_step")]


@pytest.fixture(scope="module")
def counted(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("comm")
    spawn(2, comm_worker.run_cases, CASES, str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _config():
    return load_config(comm_worker.CONFIG, comm_worker.BASE)


def test_primitives(counted):
    for rank, result in enumerate(counted):
        got = result["primitives"]
        p2p = "sub/send" if rank == 0 else "sub/recv"  # on the default group: labelled by the peer
        assert got["by_op"] == {"world/all_reduce": 40, "sub/all_gather_into_tensor": 80,
                                "sub/reduce_scatter_tensor": 40, "other/broadcast": 40,
                                "sub/isend": 12, "sub/irecv": 12, p2p: 16}
        assert got["wire"] == {"world": 40, "sub": 40 + 20 + 12 + 12 + 16, "other": 40}
        assert got["restored"]


@pytest.mark.parametrize("name", list(TP_CASES))
def test_tp_layer_volume(counted, name):
    _, sp, recompute = TP_CASES[name]
    cfg = _config()
    student, b = cfg.model.student, cfg.train.micro_batch
    for result in counted:
        shallow, deep = result[f"{name}_L{DEPTHS[0]}"], result[f"{name}_L{DEPTHS[1]}"]
        m, tokens = deep["micro_batches"], deep["tokens"]
        per_mb = tp_layer_volume(tokens, b, student.hidden_size, 4, 2, sp, student.qk_norm, recompute)
        grads = tp_layer_grad_volume(student.hidden_size, 2, sp, norm_bias=student.norm == "layernorm",
                                     layer_scale=bool(student.layer_scale_init))["all_reduce"]
        kinds = {k.split("/")[1] for r in (shallow, deep) for k in r["by_kind"] if k.startswith("tp/")}
        measured = {k: (deep["by_kind"].get(f"tp/{k}", 0) - shallow["by_kind"].get(f"tp/{k}", 0))
                    / (DEPTHS[1] - DEPTHS[0]) for k in kinds | set(per_mb)}
        analytic = {k: m * per_mb.get(k, 0.0) + (grads if k == "all_reduce" else 0.0) for k in measured}
        print(f"{name}: per layer per step {measured} analytic {analytic}")
        assert measured == analytic
        assert (sum(measured.values()) - grads) / m == sum(per_mb.values())
        wire = (deep["wire"]["tp"] - shallow["wire"]["tp"]) / (DEPTHS[1] - DEPTHS[0])
        analytic_wire = m * ring_wire_bytes(per_mb, 2) + ring_wire_bytes({"all_reduce": grads}, 2)
        assert wire == analytic_wire


@pytest.mark.parametrize("vpp", [1, 2])
def test_pp_volume(counted, vpp):
    cfg = _config()
    name = "pp2" if vpp == 1 else "pp2_vpp2"
    for result in counted:
        got = result[name]
        analytic = pp_volume(got["tokens"], cfg.train.micro_batch, cfg.model.student.hidden_size, 4,
                             got["micro_batches"], pp=2, pp_rank=got["pp_rank"], vpp=vpp)
        measured = {"send": got["by_op"].get("pp/isend", 0), "recv": got["by_op"].get("pp/irecv", 0)}
        print(f"{name} rank {got['pp_rank']}: {measured} analytic {analytic}; all pp bytes "
              f"{got['bytes'].get('pp')} (targets: send {got['by_op'].get('pp/send', 0)}, "
              f"recv {got['by_op'].get('pp/recv', 0)})")
        assert measured == analytic
        assert "world" not in got["bytes"]


@pytest.mark.parametrize("distopt", [False, True])
def test_dp_volume(counted, distopt):
    for result in counted:
        got = result["dp2_distopt" if distopt else "dp2"]
        analytic = dp_volume(got["params"], 2, distopt)
        kinds = ("reduce_scatter", "all_gather") if distopt else ("all_reduce",)
        measured = {k: got["by_kind"].get(f"dp/{k}", 0) for k in kinds}
        print(f"dp2{'_distopt' if distopt else ''}: {measured} analytic {analytic}")
        for kind in kinds:
            if distopt:
                padding = 4 * (63 * got["tensors"] + (math.lcm(2, 128) - 1) * got["buckets"])
                assert analytic[kind] <= measured[kind] <= analytic[kind] + padding, kind
            else:
                assert 0 <= measured[kind] - analytic[kind] <= 64
