// Checks, on the GPU at hand, the operand layouts the sparse-wgmma kernel (src/vnmsparse/ops/csrc/vnm_wgmma.cuh)
// assumes for wgmma.mma_async.sp.m64n128k32 bf16, one at a time, before any pipeline is involved:
//   A from registers: warp w, lane 4*gid + t, register r holds the two kept values of row 16w + gid + 8(r%2),
//     4-chunk t + 4(r/2) (= pack.py's 16-row records, the mma.sp m16n8k32 fragment);
//   metadata, selector 0: lane t = 0 holds chunks 0-3, t = 1 chunks 4-7; row gid in bits 4j, row gid+8 in 16+4j;
//   B: tokens contiguous ("N-major", imm-trans-b = 1), 128-byte swizzle, through vnm_sm90_layout.h's b_tile_offset
//     and b_desc (written here with ordinary stores + fence.proxy.async);
//   D: register i of lane 4*gid + t in warp w is row 16w + gid + 8((i/2)%2), token 2t + i%2 + 8(i/4).
// One warpgroup, random 2:4 A (lanes t = 2, 3 carry other, valid metadata: a misread shows as a mismatch).
//   nvcc -O2 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Isrc/vnmsparse/ops/csrc -o /tmp/wgmma_probe \
//        tools/wgmma_sp_probe.cu && /tmp/wgmma_probe
// Exit status 0 only if every output matches the float64 reference (to bf16 input rounding, fp32 accumulation).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "vnm_sm90_layout.h"

constexpr int kN = 128;

__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return (uint32_t)__bfloat16_as_ushort(__float2bfloat16(lo)) | ((uint32_t)__bfloat16_as_ushort(__float2bfloat16(hi)) << 16);
}

__global__ void probe(const float* A, const uint8_t* s0, const uint8_t* s1, const float* B, float* D) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ __align__(1024) uint16_t sb[32 * kN];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gid = lane / 4, t = lane % 4;
  // B tile: k-row k, tokens n..n+7 as one 16-byte piece at the kernel's offset.
  for (int q = tid; q < 32 * kN / 8; q += 128) {
    const int k = q / (kN / 8), n = 8 * (q % (kN / 8));
    for (int j = 0; j < 8; ++j)
      sb[(vnm::sm90::b_tile_offset(k, n, kN) / 2) + j] = __bfloat16_as_ushort(__float2bfloat16(B[k * kN + n + j]));
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  auto kept = [&](int r, int c, int which) { return A[r * 32 + 4 * c + (which ? s1[r * 8 + c] : s0[r * 8 + c])]; };
  auto nib = [&](int r, int c) { return (uint32_t)(s0[r * 8 + c] | (s1[r * 8 + c] << 2)); };
  const int r0 = 16 * warp + gid;
  uint32_t a[4];
  for (int r = 0; r < 4; ++r) a[r] = pack2(kept(r0 + 8 * (r % 2), t + 4 * (r / 2), 0), kept(r0 + 8 * (r % 2), t + 4 * (r / 2), 1));
  uint32_t e = 0;
  if (t < 2) {
    for (int j = 0; j < 4; ++j) e |= nib(r0, 4 * t + j) << (4 * j) | nib(r0 + 8, 4 * t + j) << (16 + 4 * j);
  } else {
    e = 0x9999'9999u;  // slots 1 and 2 everywhere: valid, and wrong for almost every chunk
  }
  float d[kN / 2];
  for (int i = 0; i < kN / 2; ++i) d[i] = 0.f;
  const uint64_t desc = vnm::sm90::b_desc(static_cast<uint32_t>(__cvta_generic_to_shared(sb)), kN);
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %70, 0;\n"
      "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "
      "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, "
      "%45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, %69, 0, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(e), "n"(1));
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  for (int i = 0; i < kN / 2; ++i) D[(r0 + 8 * ((i / 2) % 2)) * kN + 2 * t + i % 2 + 8 * (i / 4)] = d[i];
#endif
}

static float bf(float v) { return __bfloat162float(__float2bfloat16(v)); }

#define CHECK(x)                                                                              \
  do {                                                                                        \
    cudaError_t err_ = (x);                                                                   \
    if (err_ != cudaSuccess) {                                                                \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(err_), __FILE__, __LINE__); \
      return 2;                                                                               \
    }                                                                                         \
  } while (0)

int main() {
  static float A[64 * 32], B[32 * kN], D[64 * kN];
  static uint8_t s0[64 * 8], s1[64 * 8];
  srand(11);
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < 8; ++c) {
      int p = rand() % 4, q = rand() % 3;
      if (q >= p) ++q;
      s0[r * 8 + c] = p < q ? p : q;
      s1[r * 8 + c] = p < q ? q : p;
      A[r * 32 + 4 * c + s0[r * 8 + c]] = bf((rand() % 2001 - 1000) / 500.f);
      A[r * 32 + 4 * c + s1[r * 8 + c]] = bf((rand() % 2001 - 1000) / 500.f);
    }
  for (int i = 0; i < 32 * kN; ++i) B[i] = bf((rand() % 2001 - 1000) / 500.f);
  float *dA, *dB, *dD;
  uint8_t *d0, *d1;
  CHECK(cudaMalloc(&dA, sizeof A));
  CHECK(cudaMalloc(&dB, sizeof B));
  CHECK(cudaMalloc(&dD, sizeof D));
  CHECK(cudaMalloc(&d0, sizeof s0));
  CHECK(cudaMalloc(&d1, sizeof s1));
  CHECK(cudaMemcpy(dA, A, sizeof A, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dB, B, sizeof B, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(d0, s0, sizeof s0, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(d1, s1, sizeof s1, cudaMemcpyHostToDevice));
  CHECK(cudaMemset(dD, 0xff, sizeof D));  // NaN: unwritten outputs show
  probe<<<1, 128>>>(dA, d0, d1, dB, dD);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaMemcpy(D, dD, sizeof D, cudaMemcpyDeviceToHost));
  int bad = 0;
  double worst = 0.0;
  for (int m = 0; m < 64; ++m)
    for (int n = 0; n < kN; ++n) {
      double ref = 0.0;
      for (int k = 0; k < 32; ++k) ref += (double)A[m * 32 + k] * B[k * kN + n];
      const double err = std::fabs(D[m * kN + n] - ref);
      worst = std::isnan(D[m * kN + n]) ? INFINITY : std::fmax(worst, err);
      if (!(err <= 1e-3 * (1.0 + std::fabs(ref)))) {
        if (bad < 8) std::printf("  mismatch m=%d n=%d got %.5f want %.5f\n", m, n, D[m * kN + n], ref);
        ++bad;
      }
    }
  std::printf("wgmma.sp m64n128k32 bf16 layout probe (A regs, metadata sel 0, B N-major SW128): %s (%d of %d wrong, max |err| %.2e)\n",
              bad ? "FAIL" : "PASS", bad, 64 * kN, worst);
  return bad ? 1 : 0;
}
