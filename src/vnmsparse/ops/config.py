"""The runtime choices of the ops layer: one frozen `OpsConfig`, read from the environment once at import.

    field          environment                  meaning
    kernel         VNMSPARSE_KERNEL=<name>      pin one compiled kernel (a `variants.KERNELS` name) for every call
                                                it can run; benchmarks time variants this way
    wgmma          VNMSPARSE_WGMMA=0            False keeps sm_90 on the mma.sp kernels (sparse wgmma off)
    pdl            VNMSPARSE_PDL=0              False stops decode kernels captured in CUDA graphs from launching
                                                as programmatic dependents of the kernel before them (sm_90+)

Build settings (VNMSPARSE_BUILD_DIR, VNMSPARSE_NO_KERNELS, VNMSPARSE_VERBOSE_BUILD) belong to `build`; the 2:4 copy is
chosen per layer (`VNMLinear(two_four_copy=True)`) or per call (`ops.linear(..., two_four_copy=True)`).

    ops.config()                                 the configuration in force
    with ops.configure(wgmma=False): ...         changed for a block (restored after it, also on error)
    ops.set_config(ops.config().replace(wgmma=False))   changed for good
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

_ENV = {"kernel": "VNMSPARSE_KERNEL", "wgmma": "VNMSPARSE_WGMMA", "pdl": "VNMSPARSE_PDL"}


@dataclass(frozen=True)
class OpsConfig:
    """How `vnmsparse.ops.linear` picks and launches kernels (see the module docstring for each field)."""

    kernel: str | None = None
    wgmma: bool = True
    pdl: bool = True

    def __post_init__(self) -> None:
        if self.kernel is not None:
            from .variants import KERNELS

            if not isinstance(self.kernel, str) or self.kernel not in {k.name for k in KERNELS}:
                raise ValueError(f"kernel must be None or a compiled kernel name (vnmsparse.ops.KERNELS), got {self.kernel!r}")
        for name in ("wgmma", "pdl"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")

    def replace(self, **changes) -> OpsConfig:
        """A copy with `changes` applied (validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown OpsConfig field(s) {sorted(unknown)}; fields: {sorted(_ENV)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> OpsConfig:
        """The configuration the environment asks for (unset variables keep the defaults)."""
        def flag(name: str, default: bool) -> bool:
            value = environ.get(_ENV[name])
            if value is None or value == "":
                return default
            if value not in ("0", "1"):
                raise ValueError(f"{_ENV[name]} must be 0 or 1, got {value!r}")
            return value == "1"

        return cls(kernel=environ.get(_ENV["kernel"]) or None, wgmma=flag("wgmma", True), pdl=flag("pdl", True))


_current = OpsConfig.from_env()


def config() -> OpsConfig:
    """The configuration in force."""
    return _current


def set_config(new: OpsConfig) -> None:
    """Use `new` for every later call."""
    global _current
    if not isinstance(new, OpsConfig):
        raise TypeError(f"config must be an OpsConfig, got {type(new).__name__}")
    _current = new


@contextlib.contextmanager
def configure(**changes) -> Iterator[OpsConfig]:
    """Inside the block, the configuration with `changes` applied; after it, the one before."""
    before = _current
    set_config(before.replace(**changes))
    try:
        yield _current
    finally:
        set_config(before)
