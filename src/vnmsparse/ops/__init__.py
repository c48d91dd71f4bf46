"""GPU kernels for V:N:M linear layers, behind one custom op.

    from vnmsparse.ops import linear, configure
    y = linear(x, vnm_tensor, bias)          # CUDA kernels on sm_80+, the plain-torch reference elsewhere
    with configure(wgmma=False):             # runtime choices: one frozen OpsConfig (config.py), also from
        y = linear(x, vnm_tensor, bias)      # VNMSPARSE_* variables read once at import

Importing this needs no compiler and no GPU: kernels are built just in time (`build.extension`) on the
first CUDA call. `packed_layout(tensor, device)` builds a weight's kernel layout once and caches it.
"""

from .build import extension, unavailable_reason
from .config import OpsConfig, config, configure, set_config
from .dispatch import choose
from .limits import check_packable
from .op import check_two_four_copy, kernel_unavailable_reason, linear, linear_packed, two_four_copy_pays
from .pack import (PackedVNM, TwoFourCopy, pack_for_device, pack_two_four, pack_window, packed_layout, padding_columns,
                   two_four_gathers, two_four_tensor, two_four_width, unpack_dense, unpack_tensor)
from .variants import KERNELS

__all__ = [
    "KERNELS",
    "OpsConfig",
    "PackedVNM",
    "TwoFourCopy",
    "check_packable",
    "check_two_four_copy",
    "choose",
    "config",
    "configure",
    "extension",
    "kernel_unavailable_reason",
    "linear",
    "linear_packed",
    "pack_for_device",
    "pack_two_four",
    "pack_window",
    "packed_layout",
    "padding_columns",
    "two_four_copy_pays",
    "two_four_gathers",
    "two_four_tensor",
    "two_four_width",
    "unavailable_reason",
    "unpack_dense",
    "unpack_tensor",
]
