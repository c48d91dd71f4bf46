// x (N, C) -> x^T (C, Np) for the tensor-core path: the gathered activation rows become contiguous, so the
// gather is a 16-byte cp.async per 8 tokens. Columns N..Np-1 are written as zeros.
#include <cstdint>

#include "vnm_params.h"

namespace vnm {

// x (N, C), row stride ldx -> xt (C, Np), zero in columns N..Np-1. 32x32 tiles through shared memory.
static __global__ void vnm_transpose_kernel(const VnmParams p) {
  __shared__ uint16_t tile[32][33];
  const uint16_t* x16 = static_cast<const uint16_t*>(p.x);
  uint16_t* xt16 = static_cast<uint16_t*>(p.xt);
  const int c0 = blockIdx.x * 32, n0 = blockIdx.y * 32;
  const int tx = threadIdx.x, ty = threadIdx.y;  // 32 x 8
#pragma unroll
  for (int i = 0; i < 32; i += 8) {
    const int n = n0 + ty + i, c = c0 + tx;
    tile[ty + i][tx] = (n < p.N && c < p.C) ? x16[static_cast<size_t>(n) * p.ldx + c] : uint16_t(0);
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 32; i += 8) {
    const int c = c0 + ty + i, n = n0 + tx;
    if (c < p.C && n < p.Np) xt16[static_cast<size_t>(c) * p.Np + n] = tile[tx][ty + i];
  }
}

// The same with 16-byte global accesses (x 16-byte aligned, ldx and C multiples of 8): 64 x 64 tiles, each thread
// loads two 8-column pieces of x rows and stores two 8-token pieces of x^T rows. The 2-byte version moves x at
// ~1.9 TB/s, 7-13% of a tensor-core call (docs/kernels.md). Tile rows are 66 elements apart: 4-byte aligned
// for the stores, and the 8 token pieces a warp reads per element hit at most 2 rows per bank.
static __global__ void vnm_transpose_vec_kernel(const VnmParams p) {
  constexpr int kPitch = 66;
  __shared__ uint32_t tile32[64 * kPitch / 2];
  uint16_t* tile = reinterpret_cast<uint16_t*>(tile32);
  const uint16_t* x16 = static_cast<const uint16_t*>(p.x);
  uint16_t* xt16 = static_cast<uint16_t*>(p.xt);
  const int c0 = blockIdx.x * 64, n0 = blockIdx.y * 64;
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int idx = threadIdx.x + 256 * it, r = idx / 8, q = idx % 8;  // token row r, column piece q
    const int n = n0 + r, c = c0 + 8 * q;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (n < p.N && c < p.C) v = *reinterpret_cast<const uint4*>(x16 + static_cast<size_t>(n) * p.ldx + c);
    uint32_t* dst = tile32 + (r * kPitch + 8 * q) / 2;
    dst[0] = v.x;
    dst[1] = v.y;
    dst[2] = v.z;
    dst[3] = v.w;
  }
  __syncthreads();
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int idx = threadIdx.x + 256 * it, r = idx / 8, q = idx % 8;  // column row r, token piece q
    const int c = c0 + r, n = n0 + 8 * q;
    if (c < p.C && n < p.Np) {
      uint32_t w[4];
#pragma unroll
      for (int e = 0; e < 4; ++e)
        w[e] = static_cast<uint32_t>(tile[(8 * q + 2 * e) * kPitch + r]) |
               (static_cast<uint32_t>(tile[(8 * q + 2 * e + 1) * kPitch + r]) << 16);
      *reinterpret_cast<uint4*>(xt16 + static_cast<size_t>(c) * p.Np + n) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

cudaError_t launch_transpose(const VnmParams& p, cudaStream_t stream) {
  if (p.C == 0 || p.Np == 0) return cudaSuccess;
  const bool vec = reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && reinterpret_cast<uintptr_t>(p.xt) % 16 == 0 &&
                   p.ldx % 8 == 0 && p.C % 8 == 0 && p.Np % 8 == 0;
  if (vec) {
    const dim3 grid((p.C + 63) / 64, (p.Np + 63) / 64);
    vnm_transpose_vec_kernel<<<grid, 256, 0, stream>>>(p);
  } else {
    const dim3 grid((p.C + 31) / 32, (p.Np + 31) / 32);
    vnm_transpose_kernel<<<grid, dim3(32, 8), 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace vnm
