"""GPU kernels for V:N:M linear layers, behind one custom op.

    from vnmsparse.ops import linear
    y = linear(x, vnm_tensor, bias)          # CUDA kernels on sm_80+, the plain-torch reference elsewhere
    enable_wgmma(False)                      # keep sm_90 on the mma.sp kernel (or VNMSPARSE_WGMMA=0)
    enable_two_four_copy(True)               # sm_90, large N, unpermuted V:2:8: multiply a 2:4 copy (more memory)
    # VNMSPARSE_PDL=0: no programmatic dependent launch for decode kernels in CUDA graphs (sm_90+; on by default)

Importing this needs no compiler and no GPU: kernels are built just in time (`build.extension`) on the
first CUDA call. `pack_for_device` is what `VNMTensor.pack(device)` calls (and caches).
"""

from .build import extension, unavailable_reason
from .dispatch import choose, enable_two_four_copy, enable_wgmma, override
from .instantiations import KERNELS
from .op import kernel_unavailable_reason, linear, linear_packed, two_four_copy_pays
from .pack import (PackedVNM, check_packable, pack_for_device, padding_columns, two_four_tensor, unpack_dense,
                   unpack_tensor)

__all__ = [
    "KERNELS",
    "PackedVNM",
    "check_packable",
    "choose",
    "enable_two_four_copy",
    "enable_wgmma",
    "extension",
    "kernel_unavailable_reason",
    "linear",
    "linear_packed",
    "override",
    "pack_for_device",
    "padding_columns",
    "two_four_copy_pays",
    "two_four_tensor",
    "unavailable_reason",
    "unpack_dense",
    "unpack_tensor",
]
