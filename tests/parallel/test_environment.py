"""Process-group start-up from launcher variables, backend detection and the CPU compat layer."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from kernels import backends
from parallel import cpu_compat
from parallel.distributed import detect_launch, expand_nodelist


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("gpu01", ["gpu01"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a[8-10],login1", ["a8", "a9", "a10", "login1"]),
        ("dgx-[098-100]", ["dgx-098", "dgx-099", "dgx-100"]),
    ],
)
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_torchrun_variables():
    launch = detect_launch({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                            "MASTER_ADDR": "node3", "MASTER_PORT": "1234"})
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("torchrun", 5, 8, 1)
    assert (launch.master_addr, launch.master_port) == ("node3", 1234)


def test_torchrun_wins_over_the_slurm_job_around_it():
    env = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}
    assert detect_launch(env).launcher == "torchrun"


def test_srun_variables():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "4242"}
    launch = detect_launch(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("slurm", 9, 16, 1)
    assert launch.master_addr == "gpu12" and launch.master_port == 24242
    assert detect_launch({**env, "MASTER_PORT": "777"}).master_port == 777


def test_a_batch_script_outside_srun_is_a_single_process():
    launch = detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "1"})
    assert (launch.launcher, launch.world_size) == ("single", 1)


def test_mpirun_without_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py fails as if not installed
    with pytest.raises(RuntimeError, match="mpi4py is not importable"):
        detect_launch({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0"})


def test_layer_backend_names_its_fallback(caplog):
    backends.detected_layer_backend.cache_clear()
    with caplog.at_level(logging.INFO, logger="kernels.backends"):
        chosen = backends.layer_backend()
    found = backends.detect()
    if found.cuda and found.transformer_engine:
        assert chosen == "te"
    else:
        assert chosen == "local"
        assert "megatron-core local spec (Transformer Engine not used:" in caplog.text


@pytest.mark.skipif(not (torch.cuda.is_available() and backends.detect().transformer_engine),
                    reason="the Transformer Engine spec needs a CUDA device and transformer-engine "
                           f"({backends.detect().reason('transformer_engine') or 'no CUDA device'})")
def test_transformer_engine_spec_is_chosen_on_gpu():
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    from megavideo.config import load_config
    from megavideo.models.specs import transformer_config, vit_layer_spec

    cfg = load_config("configs/stage1_tiny.yaml")
    config = transformer_config(cfg.model.student, cfg.parallel, cfg.train, pipelined=False,
                                sequence_parallel=False)
    spec = vit_layer_spec(cfg.model.student, config, None)
    assert spec.submodules.self_attention.submodules.core_attention is TEDotProductAttention


def test_cpu_compat_is_not_entered_when_cuda_is_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with cpu_compat.redirected() as on:
        assert on is False and not cpu_compat.active()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU compat layer is for CPU-only machines")
def test_cpu_compat_redirects_cuda_inside_its_block_and_restores_everything_after():
    from megatron.core.tensor_parallel import random as mcore_random

    originals = (torch.cuda.current_device, torch.cuda.manual_seed, mcore_random._get_cuda_rng_state)
    with cpu_compat.redirected() as on, cpu_compat.redirected() as inner:
        assert on is True and inner is True and cpu_compat.active()
        x = torch.ones(2, device="cuda")
        assert x.device.type == "cpu" and x.cuda() is x and x.to("cuda:0").device.type == "cpu"
        assert x.type() == "torch.cuda.FloatTensor" and torch.cuda.current_device() == "cpu"
        torch.cuda.manual_seed(3)
        a = torch.rand(2)
        torch.manual_seed(3)
        assert torch.equal(a, torch.rand(2))
    assert not cpu_compat.active()
    assert (torch.cuda.current_device, torch.cuda.manual_seed,
            mcore_random._get_cuda_rng_state) == originals
    assert torch.ones(2).type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):  # no CUDA here, and nothing says otherwise
        torch.ones(2, device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU compat layer is for CPU-only machines")
def test_cpu_compat_names_an_attribute_megatron_core_no_longer_has(monkeypatch):
    from megatron.core.tensor_parallel import random as mcore_random

    monkeypatch.delattr(mcore_random, "_set_cuda_rng_state")
    current_device = torch.cuda.current_device
    with pytest.raises(cpu_compat.CompatError,
                       match=r"replaces megatron\.core\.tensor_parallel\.random\._set_cuda_rng_state,"):
        with cpu_compat.redirected():
            pass
    assert torch.cuda.current_device is current_device and not cpu_compat.active()


def test_the_process_groups_close_on_the_exits_every_rank_reaches_together(monkeypatch):
    import launch.common
    from parallel import distributed

    closed = []
    monkeypatch.setattr(distributed, "shutdown", lambda: closed.append(True))
    with launch.common.process_groups_closed(75):
        pass
    assert len(closed) == 1
    with pytest.raises(SystemExit), launch.common.process_groups_closed(75):
        raise SystemExit(75)
    assert len(closed) == 2
    # one rank's own error: destroying is collective under NCCL, the launcher stops the others
    with pytest.raises(SystemExit), launch.common.process_groups_closed(75):
        raise SystemExit(2)
    with pytest.raises(RuntimeError), launch.common.process_groups_closed(75):
        raise RuntimeError("rank-local")
    assert len(closed) == 2


def test_shutdown_destroys_megatron_groups_and_the_default_group():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from parallel.distributed import shutdown, single_rank_world

    with single_rank_world():
        assert parallel_state.model_parallel_is_initialized() and dist.is_initialized()
        shutdown()
        assert not parallel_state.model_parallel_is_initialized() and not dist.is_initialized()
    shutdown()  # nothing left: a no-op
    assert not cpu_compat.active()  # the block's CPU redirection ends with it
