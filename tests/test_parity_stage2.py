"""Stage-2 parity: one seed, one global batch, the same loss terms and gradients at every layout.

The reference holds the whole global batch of 8 on one rank (one micro-batch); every layout runs
the same step from the reference's weights. With data parallelism each rank holds 4 of the 8
samples: the contrast all-gathers the projections and matching fetches its hard negatives from
the other rank, so the dp2 loss is the single-process loss over the global batch, not an average
of two 4-sample losses. The tiny config has the toy BERT (4 layers, 2 fused), the toy BEATs (not
frozen, so its gradients are compared too; every fourth synthetic item has no audio) and all six
terms on. fp32 on CPU; tolerances as in test_parity.py.
"""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch

from tests import parity_worker
from tests.distributed import spawn

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "stage2_tiny.yaml")
BASE = ("train.micro_batch=8",)
WORLD2 = [
    ("tp2_sp", ["parallel.tp=2", "parallel.sp=true"], 0),
    ("dp2", ["train.micro_batch=4"], 0),
    ("pp2", ["parallel.pp=2"], 0),
]
WORLD4 = [
    ("pp2_tp2_sp", ["parallel.pp=2", "parallel.tp=2", "parallel.sp=true"], 0),
    ("dp2_tp2_sp_distopt", ["parallel.tp=2", "parallel.sp=true", "train.micro_batch=4",
                            "parallel.distributed_optimizer=true"], 0),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity2")
    ref = out / "reference.pt"
    spawn(1, parity_worker.reference, str(ref), 0, CONFIG, BASE)
    spawn(2, parity_worker.layouts, str(ref), WORLD2, str(out), CONFIG, BASE)
    spawn(4, parity_worker.layouts, str(ref), WORLD4, str(out), CONFIG, BASE)
    results = {}
    for name, _, _ in WORLD2 + WORLD4:
        merged: dict = {"grads": {}}
        files = sorted(glob.glob(str(out / f"{name}.pp*.pt")))
        assert files, f"layout {name} wrote nothing"
        for path in files:
            part = torch.load(path)
            merged["loss"] = part["loss"]
            merged["grads"].update(part["grads"])
        results[name] = merged
    return torch.load(ref), results


def test_reference_computes_every_term(runs):
    ref, _ = runs
    names = {k for k in ref["loss"] if k.startswith("loss/")}
    assert names == {f"loss/{t}" for t in ("vtc", "vtm", "mlm", "avtc", "avtm", "avmlm")}
    assert all(v > 0 for v in ref["loss"].values())


@pytest.mark.parametrize("name", [n for n, _, _ in WORLD2 + WORLD4])
def test_loss_and_gradients_match_reference(runs, name):
    ref, results = runs
    got = results[name]
    for term, value in ref["loss"].items():
        assert got["loss"][term] == pytest.approx(value, rel=1e-6, abs=1e-9), term
    expected = ref["grads"]
    assert set(got["grads"]) == set(expected), sorted(set(expected) ^ set(got["grads"]))
    largest = max(g.abs().max().item() for g in expected.values())
    for pname, grad in expected.items():
        bound = 1e-5 * grad.abs().max().item() + 1e-8 * largest
        error = (got["grads"][pname] - grad).abs().max().item()
        assert error <= bound, f"{pname}: gradient error {error:.3e} > {bound:.3e}"
