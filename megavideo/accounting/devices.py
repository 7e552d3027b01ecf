"""What an accelerator can do: on paper (dense peak TFLOP/s per precision, memory and links) and
as measured here (a matmul's TFLOP/s, an all-reduce's bus bandwidth).

The peaks are NVIDIA's dense (no 2:4 sparsity) tensor-core numbers for the SXM parts; MFU divides
achieved model FLOP/s by them. A100 has no FP8 tensor cores: its FP8 peak is its BF16 one (an FP8
recipe runs in BF16 there). The peak can be overridden (``profile.peak_tflops``, in a run config or
on the command line of training and of the planner) for another part or a clocked-down cluster.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    bf16_tflops: float  # dense tensor-core peak
    fp8_tflops: float
    fp32_tflops: float  # plain FP32 (no TF32), what an fp32 run is measured against
    memory_gib: float
    nvlink_gbps: float  # GB/s per GPU and direction inside a node
    network_gbps: float  # GB/s per GPU and direction between nodes (InfiniBand/RoCE)
    hbm_gbps: float  # GB/s of device memory bandwidth
    gpus_per_node: int = 8

    def peak_tflops(self, precision: str) -> float:
        """Peak for ``precision``: bf16, fp8 or fp32."""
        return {"bf16": self.bf16_tflops, "fp8": self.fp8_tflops, "fp32": self.fp32_tflops}[precision]


DEVICES = {
    # H100 SXM5 80GB: 989.4 bf16 / 1978.9 fp8 dense, NVLink 4 900 GB/s (450 each way), 400 Gb/s
    # NIC, HBM3 3.35 TB/s
    "h100": DeviceSpec("H100 SXM", 989.4, 1978.9, 66.9, 80.0, 450.0, 50.0, 3350.0),
    # H200 SXM 141GB: the H100's compute with HBM3e, 4.8 TB/s
    "h200": DeviceSpec("H200 SXM", 989.4, 1978.9, 66.9, 141.0, 450.0, 50.0, 4800.0),
    # A100 SXM4 80GB: 312 bf16, no fp8; NVLink 3 600 GB/s (300 each way), 200 Gb/s NIC, HBM2e
    # 2.04 TB/s
    "a100": DeviceSpec("A100 SXM", 312.0, 312.0, 19.5, 80.0, 300.0, 25.0, 2039.0),
}


def device_key(name: str) -> str | None:
    """The table's key for a device name as CUDA reports it (``NVIDIA H100 80GB HBM3``), or None."""
    lowered = name.lower()
    return next((key for key in DEVICES if key in lowered), None)


def local_device() -> DeviceSpec | None:
    """This process's GPU from the table (None on CPU or for a GPU the table lacks)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    key = device_key(name)
    if key is None:
        log.info("no peak FLOP/s known for %s: MFU is not reported (set profile.peak_tflops)", name)
        return None
    return DEVICES[key]


def peak_tflops(device: str, precision: str, override: float = 0.0) -> float:
    """The per-device peak used for MFU: ``override`` when set, else the table's value for
    ``device`` (a table key or ``auto``: this process's GPU); 0.0 when unknown (CPU)."""
    if override:
        return override
    spec = DEVICES.get(device) if device != "auto" else local_device()
    return spec.peak_tflops(precision) if spec is not None else 0.0


def measure_matmul_tflops(size: int = 2048, repeats: int = 10) -> float:
    """This process's achieved TFLOP/s on a square matmul in the default dtype (fp32 on CPU, bf16
    on CUDA): the peak a CPU run is measured against, where no table value exists."""
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def measure_copy_gbps(nbytes: int = 1 << 26, repeats: int = 10) -> float:
    """This process's achieved memory bandwidth in GB/s (read + write of a ``nbytes`` copy), the
    rate element-wise work runs at, where no table value exists."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        b.copy_(a)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return 2 * nbytes * repeats / (time.perf_counter() - start) / 1e9


def bus_bandwidth(group=None, nbytes: int = 1 << 24, repeats: int = 5) -> float:
    """Achieved all-reduce bus bandwidth of ``group`` in bytes/s per rank (NCCL-tests' busbw:
    the payload x 2 (n - 1) / n over the time), on the group's backend and device."""
    from parallel.comm import group_device  # megatron-core: not for the config's import of the table

    n = dist.get_world_size(group)
    if n == 1:
        return float("inf")
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=group_device(group))
    dist.all_reduce(x, group=group)  # warm-up (connections)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(x, group=group)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / repeats
    return nbytes * 2 * (n - 1) / n / elapsed
