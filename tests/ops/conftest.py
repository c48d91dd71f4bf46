"""Fixtures for the ops tests."""

import pytest
import torch

pytest.register_assert_rewrite("opshelp")  # its asserts (run_kernel, check) report like the tests' own


@pytest.fixture(scope="module")
def ext():
    """The built CUDA extension; a test that asks for it fails (not skips) when the kernels did not build."""
    from vnmsparse import ops

    module = ops.extension("cuda")
    if module is None:
        pytest.fail(f"kernels did not build: {ops.unavailable_reason('cuda')}")
    return module


@pytest.fixture
def wgmma_on_small(monkeypatch):
    """Public-path tests on small problems: the sm_90 tensor-core kernels enabled even below their wave threshold."""
    from vnmsparse.ops import configure, dispatch

    with configure(wgmma=True):
        monkeypatch.setattr(dispatch, "WGMMA_MIN_WAVES", 0.0)
        dispatch._choose.cache_clear()
        dispatch._plan.cache_clear()
        dispatch._uses_two_four_copy.cache_clear()
        yield
    dispatch._choose.cache_clear()
    dispatch._plan.cache_clear()
    dispatch._uses_two_four_copy.cache_clear()


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
