"""The fused element-wise kernels as this codebase switches them on (on a GPU by default,
train.fusions=[auto]): megatron-core's and kernels.fused's, in whole blocks, against the unfused
ops the CPU runs: the same numbers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megavideo.config import load_config
from megavideo.models.llm import build_llm, llm_config
from megavideo.models.specs import transformer_config
from megavideo.models.vit import block_stack
from parallel.distributed import single_rank_world

CONFIGS = "configs"


@pytest.fixture(scope="module")
def world():
    with single_rank_world():
        yield


def _same(run, a: torch.nn.Module, b: torch.nn.Module, bound: float) -> None:
    """Outputs and every gradient equal within ``bound`` of the tensor's largest value (fp32;
    the fused kernels round in another order; measured: 1.9e-7 for the student's bias+GELU,
    3.3e-7 for the LLM's SwiGLU and bias-dropout-add)."""
    b.load_state_dict(a.state_dict())
    outs, grads = [], []
    for module in (a, b):
        out = run(module)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    pairs = [(outs[1], outs[0])] + [(grads[1][n], grads[0][n]) for n in grads[0]]
    assert grads[0].keys() == grads[1].keys()
    for got, expected in pairs:
        assert (got - expected).abs().max() <= bound * expected.abs().max()


def test_fused_bias_gelu_is_the_tanh_gelu_the_student_trains_with(world):
    cfg = load_config(f"{CONFIGS}/stage1_tiny.yaml", ["parallel.tp=1", "parallel.sp=false"])
    vit = dataclasses.replace(cfg.model.student, drop_path=0.0)
    plain = transformer_config(vit, cfg.parallel, cfg.train, pipelined=False, sequence_parallel=False)
    assert not plain.bias_activation_fusion  # auto on the CPU
    fused = dataclasses.replace(plain, bias_activation_fusion=True, activation_func=F.gelu)
    torch.manual_seed(0)
    x = torch.randn(17, 2, vit.hidden_size)
    _same(lambda m: m(x, None, None)[0], block_stack(vit, plain, 2).train(),
          block_stack(vit, fused, 2).train(), bound=1e-6)


def test_the_compiled_residual_chain_and_qk_norm_in_the_students_blocks(world):
    """Layer scale, stochastic depth and the full-width q/k norm, compiled (kernels.fused), in two
    of the tiny student's blocks: outputs and gradients equal to fp32 rounding (measured: the
    first tensor that differs, by 1.2e-7 on values up to 4.1)."""
    cfg = load_config(f"{CONFIGS}/stage1_tiny.yaml", ["parallel.tp=1", "parallel.sp=false"])
    vit = dataclasses.replace(cfg.model.student, drop_path=0.5)
    assert vit.qk_norm and vit.layer_scale_init
    plain = transformer_config(vit, cfg.parallel, cfg.train, pipelined=False, sequence_parallel=False)
    assert not (plain.fused_residual or plain.fused_qk_norm)  # auto on the CPU
    fused = dataclasses.replace(plain, fused_residual=True, fused_qk_norm=True)
    torch.manual_seed(0)
    x = torch.randn(17, 3, vit.hidden_size)
    drop_u = torch.rand(3, vit.num_layers, 2)
    _same(lambda m: m(x, None, drop_u)[0], block_stack(vit, plain, 2).train(),
          block_stack(vit, fused, 2).train(), bound=1e-6)


def test_fused_swiglu_and_bias_dropout_add_are_the_llms_ops(world):
    cfg = load_config(f"{CONFIGS}/stage3_tiny.yaml", ["parallel.tp=1", "parallel.pp=1",
                                                       "parallel.sp=false", "parallel.encoder_tp=0"])
    llm = cfg.model.llm
    plain = llm_config(llm, cfg.parallel, cfg.train)
    fused = dataclasses.replace(plain, bias_activation_fusion=True, bias_dropout_fusion=True)
    ids = torch.randint(llm.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12)[None].expand(2, -1)
    _same(lambda m: m(ids, positions, attention_mask=None), build_llm(llm, plain).train(),
          build_llm(llm, fused).train(), bound=1e-5)
