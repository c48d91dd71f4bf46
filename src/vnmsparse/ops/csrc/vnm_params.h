// Host-visible contract between the binding (vnm_binding.cpp) and the kernels: one plain params struct,
// the kernel table entry, the table accessor the generated vnm_table.cu defines, and the cached compute
// capability both sides decide by.
// No device code and no torch here, so both the host compiler and nvcc read it.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace vnm {

// Everything a V:N:M linear kernel reads or writes. Shapes are logical; the packed arrays are
// padded (see src/vnmsparse/ops/pack.py for their exact layout).
struct VnmParams {
  const void* x;          // (N, C) activations, row-major, row stride ldx elements, bf16 or fp16
  void* xt;               // (C, Np) workspace: x transposed and zero-padded to Np columns (tensor-core paths only)
  const uint4* a_vals;    // (Rt, Kc, 32 lanes) x 16 bytes: mma.sp A fragments, 8 values per lane
  const uint32_t* a_meta; // (Rt, Kc, 16) 2:4 metadata words, word gid*2+h for lane 4*gid+h (h in {0,1})
  const int* cols;        // (Bn, Gp, 4) kept-column indices per row block and group, all in [0, C)
  const void* bias;       // (R,) same dtype as x, or nullptr
  void* y;                // (N, R) output, row-major, row stride ldy elements, same dtype as x
  int N;                  // tokens: rows of x and of y
  int R;                  // out_features: rows of W
  int C;                  // in_features: columns of W and of x
  int V;                  // rows per V:N:M block (16, 32, 64 or 128)
  int Rt;                 // ceil(R / 16): packed 16-row tiles
  int Kc;                 // ceil(G / 8): packed 8-group chunks (k = 32 kept columns each)
  int Gp;                 // Kc * 8: padded group count of `cols`
  int Bn;                 // ceil(R / V): row blocks in `cols`
  int Np;                 // N rounded up to a multiple of 8: row stride of xt (tensor-core path only)
  int64_t ldx;            // row stride of x in elements (>= C)
  int64_t ldy;            // row stride of y in elements (>= R)
  int ksplit;             // CTAs splitting the k chunks of one output tile (decode: gridDim.y; mma.sp gemm:
                          // gridDim.z); sparse wgmma (gather and window): the most CTAs sharing one tile
                          // (sm90::k_schedule)
  int64_t ctas;           // sparse wgmma (gather and window): grid size (sm90::k_schedule); 0 for the others
  float* ws;              // tiles can be shared: (output tiles, ksplit, TILE_M x TILE_N) fp32 partial sums
  int* counters;          // with ws: one arrival counter per output tile, zero between launches
  int window;             // 8*M if every group's kept columns lie in its own M columns of x (pack.py), else 0.
                          // Decode: passed only when x rows are 16-byte aligned (it then copies chunk windows);
                          // wgmma window kernels: always (they need it, and TMA-ready x)
  int pdl;                // decode: 1 = launched as a programmatic dependent of the previous kernel (sm_90+, under
                          // CUDA-graph capture, the packed arrays 16-byte aligned): its first weights are prefetched
                          // into L2 before waiting
};

// Widest chunk window the decode kernels stage in shared memory (8 groups of M <= 8 columns).
constexpr int kDecodeMaxWindow = 64;

enum class KernelKind : int { kDecode = 0, kGemm = 1, kWgmma = 2, kWgmmaWindow = 3 };  // kWgmma*: sm_90a only
enum class ElemType : int { kBf16 = 0, kFp16 = 1 };

using LaunchFn = cudaError_t (*)(const VnmParams&, cudaStream_t);

// One instantiated kernel. The table is generated (vnmsparse/ops/codegen.py) in the same order
// as the Python list, so Python picks an entry by index and the binding checks that it fits.
struct KernelEntry {
  const char* name;  // e.g. "gemm_bf16_v64_m128n128s4"
  KernelKind kind;
  ElemType dtype;
  int V;             // 0: any V (decode)
  int max_n;         // largest N this entry accepts (decode: 8 * n-tiles; gemm, wgmma: no limit)
  int rows;          // decode: 16-row tiles per warp (needs 16*rows <= V); gemm, wgmma: 0
  int window;        // wgmma window kernels: the pack window (8*M) they need; every other kernel: 0
  int tile_m;        // rows of y per CTA (decode: 16 * rows; the others: BM)
  int tile_n;        // tokens per CTA (decode: max_n; the others: BN)
  LaunchFn launch;
};

// x (N, C) -> p.xt (C, Np), zero-padded; defined in vnm_transpose.cu.
cudaError_t launch_transpose(const VnmParams& p, cudaStream_t stream);

// xg (N, Cg; rows ldg apart, ldg a multiple of 8 and >= Cg, xg 16-byte aligned) = x (N, Cx; rows ldx apart)[:, idx],
// zero where an index is outside 0..Cx-1 and in columns Cg..ldg-1; 2-byte elements. Defined in vnm_gather.cu.
cudaError_t launch_gather_columns(const void* x, int64_t ldx, int N, int Cx, const int64_t* idx, int Cg, void* xg,
                                  int64_t ldg, cudaStream_t stream);

// Defined in the generated vnm_table.cu.
const KernelEntry* kernel_table(int* count);

// Compute capability of `device` as 10 * major + minor (90 for sm_90), 0 if the query fails. Cached per device
// (queried on every launch that depends on it); a race only repeats the same query.
inline int compute_capability(int device) {
  static int cached[64] = {};
  if (device >= 0 && device < 64 && cached[device] != 0) return cached[device];
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
    return 0;
  if (device >= 0 && device < 64) cached[device] = 10 * major + minor;
  return 10 * major + minor;
}

// Streaming multiprocessors of `device`, 0 if the query fails; cached per device like compute_capability.
inline int sm_count(int device) {
  static int cached[64] = {};
  if (device >= 0 && device < 64 && cached[device] != 0) return cached[device];
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  if (device >= 0 && device < 64) cached[device] = count;
  return count;
}

}  // namespace vnm
