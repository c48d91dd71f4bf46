// Device helpers shared by the V:N:M kernels: element types, the sparse MMA, loads, programmatic dependent
// launch, ldmatrix, cp.async.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "vnm_params.h"

namespace vnm {

// ---- element types --------------------------------------------------------------------------------
template <typename T> struct Elem;

template <> struct Elem<__nv_bfloat16> {
  static constexpr ElemType kType = ElemType::kBf16;
  static __device__ __forceinline__ float to_float(uint16_t bits) {
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  }
  static __device__ __forceinline__ uint16_t from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

template <> struct Elem<__half> {
  static constexpr ElemType kType = ElemType::kFp16;
  static __device__ __forceinline__ float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  static __device__ __forceinline__ uint16_t from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

// ---- sparse tensor-core MMA -------------------------------------------------------------------------
// d += A(16x32, 2:4 sparse, stored as 16x16) * B(32x8), fp32 accumulate. Fragment layout (lane = 4*gid + t):
//   a[0] = row gid,   group t    (k 4t..4t+3):    the two kept values, first (lower slot) in the low half
//   a[1] = row gid+8, group t
//   a[2] = row gid,   group t+4  (k 16+4t..)
//   a[3] = row gid+8, group t+4
//   b[j] = B[k = 8j + 2t, 8j + 2t + 1][n = gid] (low half: the even k)
//   e    = metadata (sparsity selector 0: lanes with t = 0 hold groups 0-3, t = 1 groups 4-7;
//          bits 0-15 are row gid, bits 16-31 row gid+8, one nibble p0 | p1 << 2 per group)
//   d[0..1] = D[row gid][n = 2t, 2t+1], d[2..3] = D[row gid+8][n = 2t, 2t+1]
template <typename T> struct MmaSp;

template <> struct MmaSp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t e) {
    asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
};

template <> struct MmaSp<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t e) {
    asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
};

// ---- loads ------------------------------------------------------------------------------------------
// Streamed once: read-only path, not kept in L1 (leaves L1 to the gathered activations).
__device__ __forceinline__ uint4 ldg_stream(const uint4* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

__device__ __forceinline__ uint32_t ldg_u32(const uint32_t* p) { return __ldg(p); }
__device__ __forceinline__ int2 ldg_int2(const int* p) { return __ldg(reinterpret_cast<const int2*>(p)); }
__device__ __forceinline__ uint32_t ldg_u16(const uint16_t* p) { return static_cast<uint32_t>(__ldg(p)); }

// ---- programmatic dependent launch (sm_90+; no-ops before) -------------------------------------------
// A kernel launched with cudaLaunchAttributeProgrammaticStreamSerialization may start while the kernel before it
// in the stream is still finishing; everything that kernel may write (x, y, workspaces) is touched only after
// grid_dependency_wait(), which returns once it has completed and its writes are visible.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
// Lets the next programmatically launched kernel start once every CTA of this one has called it (or exited).
__device__ __forceinline__ void grid_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
// Asks L2 to fetch [p, p + bytes) (p and bytes multiples of 16). A hint: it reads no register and orders nothing,
// so it may run before grid_dependency_wait() even on data the previous kernel writes (L2 is coherent).
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// Requests [ptr, ptr + bytes) into L2 in pieces of at most 16 KB (16-byte aligned start and size; sm_90+, a no-op
// before). For index arrays a kernel walks one dependent load at a time: each of those loads then waits for L2,
// not DRAM.
__device__ __forceinline__ void prefetch_l2_range(const void* ptr, uint32_t bytes) {
  const char* c = static_cast<const char*>(ptr);
  for (uint32_t off = 0; off < bytes; off += 16384u) prefetch_l2(c + off, min(16384u, bytes - off));
}

// Launches kernel(p) with static shared memory only; p.pdl: as a programmatic dependent of the previous kernel
// in the stream (the kernel must call grid_dependency_wait() before touching what that kernel may write).
template <typename Kernel>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, dim3 block, const VnmParams& p, cudaStream_t stream) {
  cudaLaunchAttribute attr[1] = {};
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = p.pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, p);
}

// ---- split-k ----------------------------------------------------------------------------------------
// Meeting point of the k slices of one output tile (both tensor-core kernels). Each of `threads` threads (index
// t) publishes its kFloats fp32 accumulators to the tile's workspace `ws` (slices x kFloats x threads floats,
// value-major so a warp's stores are coalesced); the last CTA to arrive (`counter`, reset by it for the next
// launch and CUDA-graph replays) sums every slice in slice order, so the result does not depend on which CTA
// finished last. `sync` is the barrier of those threads. Returns true in that CTA, with acc holding the sum.
// The sum walks the slices in a loop that is not unrolled: unrolled per accumulator, it was ~115 KB of
// straight-line code that every finishing CTA fetched cold (docs/kernels.md).
template <int kFloats, typename Sync>
__device__ __forceinline__ bool split_k_meet(float (&acc)[kFloats], float* ws, int slice, int slices, int t, int threads,
                                             int* counter, Sync sync) {
  __shared__ int last_flag;
  float* mine = ws + static_cast<size_t>(slice) * kFloats * threads + t;
#pragma unroll
  for (int i = 0; i < kFloats; ++i) __stcg(mine + i * threads, acc[i]);
  __threadfence();
  sync();
  if (t == 0) last_flag = atomicAdd(counter, 1) == slices - 1;
  sync();
  if (!last_flag) return false;
  __threadfence();
#pragma unroll
  for (int i = 0; i < kFloats; ++i) acc[i] = 0.f;
#pragma unroll 1
  for (int z = 0; z < slices; ++z) {
    const float* part = ws + static_cast<size_t>(z) * kFloats * threads + t;
#pragma unroll
    for (int i = 0; i < kFloats; ++i) acc[i] += __ldcg(part + i * threads);
  }
  if (t == 0) *counter = 0;
  return true;
}

// ---- shared memory ----------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; with valid == false the destination is zero-filled and no global
// byte is read (src must still be a mapped address).
__device__ __forceinline__ void cp_async_cg16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
// Same, but cached in L1: row blocks of one CTA often gather the same activation rows.
__device__ __forceinline__ void cp_async_ca16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
// 4-byte async copy global -> shared (cached in L1): index arrays fetched ahead of their use without a register.
__device__ __forceinline__ void cp_async_ca4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Four 8x8 b16 matrices: lanes 8j..8j+7 give the row addresses of matrix j; lane l receives row l/4,
// elements 2(l%4) and 2(l%4)+1 of each.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Four 8x8 b16 matrices, transposed: lanes 8j..8j+7 give the row addresses of matrix j.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 r;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(addr));
  return r;
}
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t r;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(r) : "r"(addr));
  return r;
}

// This lane's mma.sp A fragments and metadata words of kMT consecutive packed 16-row records, from a stage's
// records (`a_base`: 512 bytes each, pack.py's lane order) and metadata (`e_base`: 16 words each, lane 4*gid + t
// takes word 2*gid + (t & 1)), starting at record `first`.
template <int kMT>
__device__ __forceinline__ void lds_a_fragments(uint32_t (&a)[kMT][4], uint32_t (&e)[kMT], uint32_t a_base, uint32_t e_base,
                                                int first, int lane) {
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
    const int rec = first + mi;
    const uint4 v = lds128(a_base + (rec * 32 + lane) * 16);
    a[mi][0] = v.x; a[mi][1] = v.y; a[mi][2] = v.z; a[mi][3] = v.w;
    e[mi] = lds32(e_base + (rec * 16 + (lane >> 2) * 2 + (lane & 1)) * 4);
  }
}

}  // namespace vnm
