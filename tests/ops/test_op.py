"""The custom op, its fake impl, the CPU fallback, dispatch and the generated kernel list (all on CPU)."""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opshelp import fp64_reference, random_vnm, rel_err

import vnmsparse as vs
from vnmsparse import ops
from vnmsparse.ops import dispatch, op, packed_layout


def test_importing_needs_no_compiler_or_gpu():
    # No nvcc on PATH, no CUDA_HOME: importing and running on CPU must neither build nor load a compiler.
    code = (
        "import sys, torch, vnmsparse as vs, vnmsparse.ops as ops\n"
        "t = vs.compress(torch.randn(20, 30), '16:2:5')\n"
        "ops.linear(torch.randn(2, 30), t)\n"
        "assert 'torch.utils.cpp_extension' not in sys.modules\n"
        "from vnmsparse.ops import build\n"
        "assert not any(k.startswith('sm') for k in build._modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "HOME", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-c", code], check=True, env={**env, "CUDA_HOME": "/nonexistent", "PATH": "/nonexistent"})


@pytest.mark.parametrize("lead", [(), (1,), (3, 5), (2, 1, 4)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_on_cpu_is_the_reference(lead, with_bias):
    t = random_vnm(70, 45, "16:2:6", seed=1)
    x = torch.randn(*lead, 45).to(torch.bfloat16)
    bias = torch.randn(70).to(torch.bfloat16) if with_bias else None
    y = ops.linear(x, t, bias)
    assert y.shape == (*lead, 70) and y.dtype == x.dtype
    assert torch.equal(y, vs.vnm_linear(x, t, bias))


def test_cpu_fallback_is_logged_once(caplog):
    op._logged.clear()
    t = random_vnm(20, 30, "16:2:5")
    x = torch.randn(2, 30).to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="vnmsparse.ops"):
        ops.linear(x, t)
        ops.linear(x, t)
    hits = [r for r in caplog.records if "plain-torch reference" in r.getMessage()]
    assert len(hits) == 1 and "cpu" in hits[0].getMessage()


@pytest.mark.parametrize("pattern,permute", [("16:2:5", False), ("32:2:8", True), ("128:2:4", False)])
def test_op_on_cpu_computes_from_packed_parts(pattern, permute):
    t = random_vnm(150, 83, pattern, permute=permute, seed=5)
    p = packed_layout(t, "cpu")
    x = torch.randn(4, 83).to(torch.bfloat16)
    b = torch.randn(150).to(torch.bfloat16)
    y = torch.ops.vnmsparse.linear(x, p.a_vals, p.a_meta, p.cols, b, 150, 83, t.pattern.V)
    assert rel_err(y, fp64_reference(x, t, b)) < 1e-2
    assert torch.equal(y, vs.vnm_linear(x, t, b))


def test_fake_impl_and_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = random_vnm(40, 50, "16:2:5")
    p = packed_layout(t, "cpu")
    x = torch.randn(2, 3, 50).to(torch.bfloat16)
    mode = FakeTensorMode()
    fakes = [mode.from_tensor(a) for a in (x, p.a_vals, p.a_meta, p.cols)]
    with mode:
        out = torch.ops.vnmsparse.linear(*fakes, None, 40, 50, 16)
    assert out.shape == (2, 3, 40) and out.dtype == torch.bfloat16
    torch.library.opcheck(torch.ops.vnmsparse.linear.default, (x, p.a_vals, p.a_meta, p.cols, None, 40, 50, 16))


def test_torch_compile_fullgraph():
    t = random_vnm(40, 50, "16:2:5")
    p = packed_layout(t, "cpu")
    x = torch.randn(6, 50).to(torch.bfloat16)
    f = torch.compile(lambda x: torch.ops.vnmsparse.linear(x, p.a_vals, p.a_meta, p.cols, None, 40, 50, 16), fullgraph=True)
    assert torch.equal(f(x), vs.vnm_linear(x, t))


def test_the_two_four_copy_decision_is_a_constant_to_torch_compile(monkeypatch):
    # A layer holding a 2:4 copy asks per call whether to run on it, which reads device properties and the measured
    # table: dynamo cannot trace that. Traced, each layer broke the graph and a compiled LLaMA recompiled per layer
    # until dynamo's limit. It must be evaluated once while tracing and folded, with the sizes the graph specializes on.
    asked = []

    def decide(N, R, C, V, M, window, dtype, sms, arch, gpu):
        torch._dynamo.graph_break()  # untraceable, as reading the table is; fullgraph fails if dynamo traces this
        asked.append((N, R, C, dtype, gpu))
        return N >= 256

    monkeypatch.setattr(op, "_device_info", lambda index: (None, None, 132, (9, 0), "fake-gpu"))
    monkeypatch.setattr(dispatch, "uses_two_four_copy", decide)
    torch._dynamo.reset()
    f = torch.compile(lambda x: x + 1 if op._wants_two_four_copy(x, 40, 50, 64, 8, 64) else x - 1,
                      fullgraph=True, backend="eager", dynamic=False)
    for N in (300, 300, 16):
        x = torch.randn(N, 50).to(torch.bfloat16)
        assert torch.equal(f(x), x + 1 if N >= 256 else x - 1)
    assert asked == [(300, 40, 50, "bf16", "fake-gpu"), (16, 40, 50, "bf16", "fake-gpu")]  # once per specialization


def test_wrong_inputs_raise():
    t = random_vnm(40, 50, "16:2:5")
    with pytest.raises(ValueError, match="in_features=50"):
        ops.linear(torch.randn(2, 49).to(torch.bfloat16), t)
    with pytest.raises(TypeError, match="VNMTensor"):
        ops.linear(torch.randn(2, 50), t.to_dense())


@settings(max_examples=25, deadline=None)
@given(V=st.sampled_from([16, 32, 64, 128]), M=st.sampled_from([4, 5, 7, 8, 16]), permute=st.booleans(),
       R=st.integers(1, 100), C=st.integers(8, 90), seed=st.integers(0, 2**16))
def test_linear_takes_the_two_four_copy_per_call_where_the_weight_can_have_one(V, M, permute, R, C, seed):
    # The per-call choice: refused (ValueError naming the argument and the rule) for a weight that can have no 2:4 copy,
    # on every device, before any work; on the CPU an accepted one changes nothing (the copy runs on sm_90 only).
    t = random_vnm(R, C, f"{V}:2:{M}", permute=permute, seed=seed)
    x = torch.randn(3, C).to(torch.bfloat16)
    if 5 <= M <= 8 and V <= 64:
        assert torch.equal(ops.linear(x, t, two_four_copy=True), ops.linear(x, t))
        assert (x.device, "2:4") not in t.layouts
    else:
        with pytest.raises(ValueError, match=r"two_four_copy needs a V:2:M pattern with 5 <= M <= 8 and V <= 64"):
            ops.linear(x, t, two_four_copy=True)


@pytest.mark.parametrize("pattern, permute", [("16:2:5", False), ("32:2:8", True), ("16:2:7", False)])
def test_a_copy_laid_out_over_other_columns_reads_x_gathered_into_them(pattern, permute):
    # A 2:4 copy whose columns are not x's own (M = 5-7, permuted weights): the op is handed x as it is, any leading
    # dims, with the copy's `inputs`, and gathers them itself. Here the op's CPU implementation (the reference) does;
    # the GPU tests run the binding's gather kernel.
    t = random_vnm(70, 53, pattern, permute=permute, seed=3)
    copy = ops.pack_two_four(t, "cpu")
    R, C = copy.shape
    assert copy.inputs is not None and (R, C) == (70, copy.inputs.numel()) and C % 64 == 0
    x = torch.randn(2, 3, 53).to(torch.bfloat16)
    bias = torch.randn(70).to(torch.bfloat16)
    y = torch.ops.vnmsparse.linear(x, copy.a_vals, copy.a_meta, copy.cols, bias, R, C, copy.V, copy.window, copy.inputs)
    assert y.shape == (2, 3, 70)
    assert rel_err(y.reshape(-1, 70), fp64_reference(x.reshape(-1, 53), t, bias)) < 1e-2
    with torch._subclasses.FakeTensorMode() as mode:  # what torch.compile traces: the same shape rule
        fake = torch.ops.vnmsparse.linear(mode.from_tensor(x), *(mode.from_tensor(a) for a in (copy.a_vals, copy.a_meta, copy.cols)),
                                          None, R, C, copy.V, copy.window, mode.from_tensor(copy.inputs))
    assert fake.shape == (2, 3, 70)
    with pytest.raises(ValueError, match=f"inputs must name the weight's C={C} x columns"):
        torch.ops.vnmsparse.linear(x, copy.a_vals, copy.a_meta, copy.cols, bias, R, C, copy.V, copy.window, copy.inputs[:-1])
    with pytest.raises(ValueError, match=f"x's last dim must be in_features={C}"):
        torch.ops.vnmsparse.linear(x, copy.a_vals, copy.a_meta, copy.cols, bias, R, C, copy.V, copy.window)


def test_linear_two_four_copy_must_be_a_bool():
    t = random_vnm(40, 50, "16:2:8")
    with pytest.raises(TypeError, match="two_four_copy must be a bool, got 'yes'"):
        ops.linear(torch.randn(2, 50).to(torch.bfloat16), t, two_four_copy="yes")
    with pytest.raises(TypeError, match="positional"):  # keyword only: linear(x, t, bias, True) would read as a bias flag
        ops.linear(torch.randn(2, 50).to(torch.bfloat16), t, None, True)


def test_unsupported_pattern_falls_back_on_cuda_reason():
    t = vs.compress(torch.randn(16, 40), "8:2:8")  # V=8: no kernel, fp32: no kernel
    reason = op.kernel_unavailable_reason(torch.device("cuda"), torch.float32, t)
    assert reason is not None and "V in" in reason
    assert "cpu" in op.kernel_unavailable_reason(torch.device("cpu"), torch.float32, t)


def test_module_reload_free_registration():
    # The op is registered at import; importing again must not re-register (it would raise).
    importlib.import_module("vnmsparse.ops.op")
    assert hasattr(torch.ops.vnmsparse, "linear")


# ---- the eager fast path's guard ----------------------------------------------------------------------------
def test_runs_eagerly_only_when_nothing_traces_or_intercepts():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class PassthroughFunctions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x, bias = torch.randn(3, 8), torch.nn.Parameter(torch.randn(5))
    assert op._runs_eagerly(x, None)
    with torch.no_grad():
        assert op._runs_eagerly(x, bias)  # a Parameter is a plain tensor to the kernels; no graph under no_grad
    assert not op._runs_eagerly(x, bias)  # bias needs a gradient: the op path (no autograd formula) decides
    assert not op._runs_eagerly(x.requires_grad_(), None)
    x.requires_grad_(False)
    with Passthrough():
        assert not op._runs_eagerly(x, None)
    with PassthroughFunctions():
        assert not op._runs_eagerly(x, None)
    with FakeTensorMode() as mode:
        assert not op._runs_eagerly(mode.from_tensor(x), None)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert not op._runs_eagerly(x, None)  # traces show vnmsparse::linear with its kernels
    assert not op._runs_eagerly(x.as_subclass(type("Subclass", (torch.Tensor,), {})), None)  # may override anything
    compiled = torch.compile(lambda x: x + 1 if op._runs_eagerly(x, None) else x - 1, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), x - 1)  # traced: the custom op, not the direct call
