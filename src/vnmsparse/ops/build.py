"""Just-in-time build of the CUDA kernels (torch.utils.cpp_extension + ninja), cached per GPU architecture.

Nothing here runs at import: `extension(device)` builds on first use (a minute or so on a 16-core machine,
then a cache hit) and returns the loaded module, or None where no kernel can exist (CPU, GPU older than
sm_80, no nvcc, build failure); the reason is kept for `unavailable_reason` and logged once.

Environment:
    VNMSPARSE_BUILD_DIR       cache root (default ~/.cache/vnmsparse)
    VNMSPARSE_NO_KERNELS=1    never build or load kernels: everything runs the reference
    VNMSPARSE_VERBOSE_BUILD=1 show the compiler's output
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch

from . import codegen, variants

log = logging.getLogger("vnmsparse.ops")

CSRC = Path(__file__).resolve().parent / "csrc"
_COMPILED_SOURCES = ("vnm_binding.cpp", "vnm_transpose.cu", "vnm_gather.cu")  # beside the generated units
_STATIC_SOURCES = (
    *_COMPILED_SOURCES, "vnm_params.h", "vnm_common.cuh", "vnm_decode.cuh", "vnm_gemm.cuh",
    "vnm_sm90.cuh", "vnm_sm90_layout.h", "vnm_wgmma.cuh", "vnm_wgmma_window.cuh",
)
MIN_CAPABILITY = (8, 0)  # mma.sp with ordered metadata: Ampere and newer

_lock = threading.Lock()
_modules: dict[str, ModuleType | None] = {}
_reasons: dict[str, str] = {}


def arch_flags(capability: tuple[int, int]) -> list[str]:
    """nvcc -gencode flags for one compute capability (sm_90a on Hopper for its arch-specific features)."""
    major, minor = capability
    arch = f"{major}{minor}{'a' if (major, minor) == (9, 0) else ''}"
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def _source_hash() -> str:
    h = hashlib.sha256()
    for name in _STATIC_SOURCES:
        h.update((CSRC / name).read_bytes())
    h.update(codegen.fingerprint().encode())
    return h.hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("VNMSPARSE_BUILD_DIR", Path.home() / ".cache" / "vnmsparse"))


def _key(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why no kernel runs on `device` (None if the kernels are built and loaded)."""
    device = torch.device(device)
    key = _key(device) if (device.type != "cuda" or torch.cuda.is_available()) else "cuda-unavailable"
    if key not in _modules:
        extension(device)
    return _reasons.get(key)


def extension(device: torch.device | str) -> ModuleType | None:
    """The compiled kernel module for `device`'s architecture, building it on first call; None if impossible."""
    device = torch.device(device)
    if device.type != "cuda":
        _reasons[device.type] = f"no CUDA kernels for device type {device.type!r}"
        _modules[device.type] = None
        return None
    if not torch.cuda.is_available():
        _reasons["cuda-unavailable"] = "CUDA is not available in this torch build or machine"
        _modules["cuda-unavailable"] = None
        return None
    key = _key(device)
    if key in _modules:
        return _modules[key]
    with _lock:
        if key in _modules:
            return _modules[key]
        module, reason = _build(device)
        _modules[key] = module
        if reason is not None:
            _reasons[key] = reason
            log.debug("vnmsparse: no kernels on %s: %s", key, reason)  # the op logs it once where it matters
        return module


def _build(device: torch.device) -> tuple[ModuleType | None, str | None]:
    if os.environ.get("VNMSPARSE_NO_KERNELS", "") not in ("", "0"):
        return None, "kernels disabled by VNMSPARSE_NO_KERNELS"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return None, f"GPU sm_{capability[0]}{capability[1]} is older than sm_80 (no mma.sp)"
    try:
        from torch.utils import cpp_extension
    except ImportError as error:  # pragma: no cover - torch always ships it
        return None, f"torch.utils.cpp_extension unavailable ({error})"
    if cpp_extension.CUDA_HOME is None:
        return None, "no CUDA toolkit (nvcc) found to build the kernels"

    name = f"vnmsparse_ops_{_key(device)}_{_source_hash()}"
    build_dir = cache_root() / name
    gen_dir = build_dir / "gen"
    cu_files = codegen.write(gen_dir)
    verbose = os.environ.get("VNMSPARSE_VERBOSE_BUILD", "") not in ("", "0")
    try:
        module = cpp_extension.load(
            name=name,
            sources=[*(str(CSRC / source) for source in _COMPILED_SOURCES), *map(str, cu_files)],
            extra_include_paths=[str(CSRC), str(gen_dir)],
            extra_cflags=["-O2"],
            extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo", *arch_flags(capability)],
            build_directory=str(build_dir),
            verbose=verbose,
        )
    except Exception as error:  # a compiler failure must not break the library: fall back, say why
        return None, f"building the CUDA kernels failed ({type(error).__name__}: {str(error)[-2000:]})"
    _check_table(module)
    return module, None


def _check_table(module: ModuleType) -> None:
    """The compiled table must be the Python list, entry for entry (both come from one generator)."""
    compiled = module.table()
    expected = [
        (k.name, variants.KIND_IDS[k.variant.kind], 0 if k.dtype == "bf16" else 1, k.V, k.variant.rows, k.window)
        for k in variants.KERNELS
    ]
    got = [(*row[:4], *row[5:]) for row in compiled]
    if got != expected:
        raise RuntimeError(f"vnmsparse: compiled kernel table does not match variants.KERNELS: {got} != {expected}")
