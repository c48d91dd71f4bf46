// sm_90a device primitives for the sparse-wgmma kernels: mbarriers, proxy fences, TMA, register reallocation,
// wgmma fences/groups, stmatrix, named barriers. Thin inline-PTX wrappers, nothing else. Every wrapper is
// only compiled for sm_90a (the caller guards with VNM_SM90A_ENABLED).
#pragma once

#include <cuda.h>  // CUtensorMap
#include <cstdint>

#include "vnm_common.cuh"
#include "vnm_sm90_layout.h"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define VNM_SM90A_ENABLED 1
#endif

namespace vnm {
namespace sm90 {

#if defined(VNM_SM90A_ENABLED)

// ---- mbarrier (shared::cta) ----------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Arrive (release semantics at CTA scope): this thread's prior writes are visible to whoever waits.
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Block until the phase with this parity has completed (acquire semantics).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "VNM_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra VNM_WAIT;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// Arrive on `bar` once every cp.async this thread has issued so far has landed, without blocking the thread.
// `.noinc`: this asynchronous arrival is one of the barrier's expected arrivals (init count = copying threads).
__device__ __forceinline__ void mbar_arrive_on_copies(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// Block until every cp.async this thread has issued has landed (no commit groups needed).
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Generic-proxy writes to shared memory (cp.async, st.shared) become visible to the async proxy (wgmma).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ---- TMA (cp.async.bulk.tensor) -------------------------------------------------------------------------
// Make the barriers' initialisation visible to the async proxy (TMA completes transactions on them).
__device__ __forceinline__ void fence_barrier_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

// Arrive once and announce `bytes` of asynchronous copies the phase must also wait for.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// Announce `bytes` more of asynchronous copies for the current phase, without arriving.
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void prefetch_tensormap(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// One box of a 2-D tensor map at element coordinates (c0 innermost, c1) into shared memory at `dst`; the bytes
// complete on `bar`. Parts of the box outside the tensor are filled with zeros.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// ---- the CTA's place in the grid and its shared memory --------------------------------------------------
// Both sparse-wgmma kernels: 1024-aligned dynamic shared memory (swizzle atoms) and the first row / token of
// output tile `tile_id` (raster order, tile_coord).
struct CtaTile {
  uint32_t smem;  // aligned start of the dynamic shared memory
  int m0, n0;     // first row of W and first token of the CTA's tile
};

// blockIdx.x read by a volatile instruction: the compiler recomputes what depends on it where it is used.
__device__ __forceinline__ long long cta_id_volatile() {
  uint32_t id;
  asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(id));
  return id;
}

// threadIdx.x, read the same way: for per-thread values needed once per segment, not held through the loop.
__device__ __forceinline__ int tid_volatile() {
  uint32_t id;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(id));
  return static_cast<int>(id);
}

__device__ __forceinline__ uint32_t aligned_smem(unsigned char* smem_raw) {
  return (smem_addr(smem_raw) + kAtomBytes - 1) & ~uint32_t(kAtomBytes - 1);
}

template <int kBM, int kBN, int kGroupM>
__device__ __forceinline__ CtaTile cta_tile(unsigned char* smem_raw, int R, int N, int tile_id) {
  const int tiles_m = (R + kBM - 1) / kBM, tiles_n = (N + kBN - 1) / kBN;
  const TileCoord tile = tile_coord(tile_id, tiles_m, tiles_n, kGroupM);
  return CtaTile{aligned_smem(smem_raw), tile.m * kBM, tile.n * kBN};
}

// ---- register reallocation between warpgroups -----------------------------------------------------------
template <int kRegs> __device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs> __device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// ---- wgmma bookkeeping ----------------------------------------------------------------------------------
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Keep the compiler from moving accumulator registers across the asynchronous wgmma window.
template <int kN> __device__ __forceinline__ void fence_operands(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Keep an A fragment and its metadata register live (unmoved, unreused) until here: a wgmma reads them
// asynchronously, so their registers must not be reallocated before the wait that retires that wgmma.
__device__ __forceinline__ void fence_fragment(uint4& a, uint32_t& e) {
  asm volatile("" : "+r"(a.x), "+r"(a.y), "+r"(a.z), "+r"(a.w), "+r"(e)::"memory");
}

// ---- epilogue helpers ---------------------------------------------------------------------------------------
// Four 8x8 b16 matrices stored transposed: lanes 8q..8q+7 give the row addresses of matrix q.
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
}

// Named barrier over `threads` threads (a multiple of 32); id 0 is __syncthreads'.
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

#endif  // VNM_SM90A_ENABLED

}  // namespace sm90
}  // namespace vnm
