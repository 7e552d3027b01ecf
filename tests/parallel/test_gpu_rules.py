"""What CUDA and NCCL refuse and gloo forgives, checked on the CPU: where collective buffers live,
tensors of two devices in one op, a GPU job that finds no GPU, the per-rank device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from megavideo.config import ConfigError, load_config, validate_device
from megavideo.training import checkpoint
from parallel import comm, distributed, optimizer_state
from parallel.distributed import Launch, gpus_expected, single_rank_world

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "stage1_tiny.yaml"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a node without CUDA")


class StrictDevices(TorchFunctionMode):
    """Raise where an op mixes tensors of two devices, as CUDA does (a 0-dim CPU tensor counts as
    a scalar); copies between devices are what they are for."""

    COPIES = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.cpu, torch.Tensor.cuda,
              torch.Tensor.__setitem__}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.COPIES:
            devices = {t.device for t in tree_flatten((args, kwargs))[0]
                       if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.device.type == "cpu")}
            if len(devices) > 1:
                raise RuntimeError(f"{getattr(func, '__name__', func)} mixes tensors on {devices}")
        return func(*args, **kwargs)


def test_strict_devices_refuses_what_cuda_refuses():
    on_meta = torch.zeros(2, device="meta")
    with StrictDevices():
        on_meta += torch.tensor(1.0)  # a scalar: allowed
        on_meta.copy_(torch.ones(2))  # a copy: allowed
        with pytest.raises(RuntimeError, match="mixes tensors"):
            on_meta += torch.ones(2)


def test_the_decode_rank_keeps_its_counts_on_the_device():
    """stages/common.py's decoded micro-batch, on a device that is not the CPU (meta): the clips
    move there and the skip counts stay there, with no CPU tensor in any op."""
    from megavideo.stages.common import PipelineStage

    cfg = load_config(TINY, ["parallel.tp=1", "parallel.pp=1", "parallel.sp=false"])
    with single_rank_world():
        stage = PipelineStage(cfg, torch.device("meta"))
    batch = SimpleNamespace(video=torch.zeros(2, 3, 4, 8, 8), rows=[3, 5], fbank=None,
                            has_audio=None, skipped=[("bad.mp4", "truncated")], attempts=3)
    stage.decodes, stage._batches = True, iter([batch])
    with StrictDevices():
        out = stage._decoded(2)
        counts = stage.take_data_counts()
    assert out["video"].device.type == "meta" and out["rows"].device.type == "meta"
    assert counts.device.type == "meta" and stage.data_counts.device.type == "meta"


def test_collective_buffers_are_on_the_group_device(monkeypatch):
    """Every rank's buffer for the optimizer-state reduce of a checkpoint (those holding no shard
    of the parameter too) and the stop flag's all-reduce: on :func:`parallel.comm.group_device`,
    here a device that is not the CPU."""
    seen = []
    monkeypatch.setattr(optimizer_state, "group_device", lambda group: torch.device("meta"))
    monkeypatch.setattr(dist, "reduce", lambda tensor, dst, group: seen.append(tensor.device))
    monkeypatch.setattr(dist, "get_global_rank", lambda group, rank: rank)
    group = SimpleNamespace(rank=lambda: 1)  # this rank is not the owner (0)
    param = torch.nn.Parameter(torch.zeros(2, 3))
    main = torch.nn.Parameter(torch.zeros(2))
    inner = torch.optim.Adam([main])
    inner.state[main]["exp_avg"] = torch.ones(2)
    for slot in (None, optimizer_state.Slot(main, inner, 2, 4)):
        assert optimizer_state.gather(param, slot, "exp_avg", group, 0, distributed=True) is None
    assert seen == [torch.device("meta")] * 2

    flags, asked = [], []
    monkeypatch.setattr(checkpoint, "group_device",
                        lambda *group: asked.append(group) or torch.device("cpu"))
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op: flags.append(tensor))
    stop = checkpoint.StopSignal()
    assert stop.agreed() == (False, False) and asked == [()]
    assert flags[0].device == torch.device("cpu")


def test_group_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert comm.group_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert comm.group_device() == torch.device("cpu")


def test_each_rank_takes_its_local_gpu(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    distributed.use_local_gpu(Launch("torchrun", 5, 8, 5, "node", 1))
    assert chosen == [1]


@pytest.mark.parametrize(("env", "why"), [
    ({}, None),
    ({"SLURM_JOB_GPUS": "0,1"}, "SLURM gave this job GPUs (SLURM_JOB_GPUS=0,1)"),
    ({"SLURM_STEP_GPUS": "3"}, "SLURM gave this job GPUs (SLURM_STEP_GPUS=3)"),
    ({"SLURM_GPUS_ON_NODE": "4"}, "SLURM gave this job GPUs (SLURM_GPUS_ON_NODE=4)"),
    ({"SLURM_GPUS_ON_NODE": "0"}, None),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1 names GPUs"),
    ({"CUDA_VISIBLE_DEVICES": ""}, None),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None),
])
def test_which_environments_promise_a_gpu(env, why):
    assert gpus_expected(env) == why


@no_cuda
@pytest.mark.parametrize(("device", "env", "message"), [
    ("auto", {"SLURM_JOB_GPUS": "0"}, "SLURM gave this job GPUs (SLURM_JOB_GPUS=0) but "
                                      "torch.cuda.is_available() is false here"),
    ("cuda", {}, "run.device=cuda asks for a GPU but torch.cuda.is_available() is false here"),
])
def test_a_gpu_job_without_a_gpu_is_an_error(device, env, message):
    with pytest.raises(ConfigError) as err:
        validate_device(load_config(TINY, [f"run.device={device}"]), env)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert "set run.device=cpu to run on the CPU." in str(err.value)


@no_cuda
def test_the_cpu_is_fine_where_nothing_promises_a_gpu():
    validate_device(load_config(TINY), {})
    validate_device(load_config(TINY, ["run.device=cpu"]), {"SLURM_JOB_GPUS": "0"})


@no_cuda
def test_the_compiled_fusions_run_on_the_cpu_and_megatrons_do_not():
    validate_device(load_config(TINY, ["train.fusions=[residual,qk_norm]"]), {})
    with pytest.raises(ConfigError, match=r"^train.fusions \(bias_activation\) are CUDA kernels"):
        validate_device(load_config(TINY, ["train.fusions=[residual,bias_activation]"]), {})


def test_run_device_must_be_known():
    with pytest.raises(ConfigError, match="run.device must be one of auto, cuda, cpu, got 'gpu'."):
        load_config(TINY, ["run.device=gpu"])


@no_cuda
def test_train_refuses_a_gpu_job_without_a_gpu_before_any_process_group():
    proc = subprocess.run(
        [sys.executable, "-m", "launch.train", str(TINY)], cwd=ROOT, capture_output=True,
        text=True, timeout=60,
        env={"WORLD_SIZE": "4", "RANK": "0", "PATH": "", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: CUDA_VISIBLE_DEVICES=0,1,2,3 names GPUs but torch.cuda.is_available() is false")
    assert "process group" not in proc.stderr
