// Checks, on the GPU at hand, the mma.sp.m16n8k32 (bf16, ordered metadata) register layout the kernels in
// src/vnmsparse/ops/csrc assume, against an alternative reading of the PTX figure. One warp, random 2:4 A.
//   nvcc -O2 -gencode=arch=compute_90a,code=sm_90a -o /tmp/probe tools/mma_sp_probe.cu && /tmp/probe
// Prints one line per hypothesis; exit status 0 only if the assumed layout ("kernels") matches.
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cmath>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

// meta_mode 0 ("kernels"): lane t=0 holds groups 0-3 of rows gid (bits 0-15) and gid+8 (bits 16-31), t=1 groups 4-7.
// meta_mode 1 (alternative): lane t=0 holds all 8 groups of row gid, t=1 all 8 groups of row gid+8.
__global__ void probe(const float* A, const uint8_t* slot0, const uint8_t* slot1, const float* B, float* D, int meta_mode) {
  const int lane = threadIdx.x, gid = lane >> 2, t = lane & 3;
  auto pack = [](float lo, float hi) {
    return (uint32_t)__bfloat16_as_ushort(__float2bfloat16(lo)) | ((uint32_t)__bfloat16_as_ushort(__float2bfloat16(hi)) << 16);
  };
  auto nib = [&](int r, int g) { return (uint32_t)(slot0[r * 8 + g] | (slot1[r * 8 + g] << 2)); };
  auto kept = [&](int r, int g, int which) { int s = which ? slot1[r * 8 + g] : slot0[r * 8 + g]; return A[r * 32 + 4 * g + s]; };
  uint32_t a[4];
  a[0] = pack(kept(gid, t, 0), kept(gid, t, 1));
  a[1] = pack(kept(gid + 8, t, 0), kept(gid + 8, t, 1));
  a[2] = pack(kept(gid, t + 4, 0), kept(gid, t + 4, 1));
  a[3] = pack(kept(gid + 8, t + 4, 0), kept(gid + 8, t + 4, 1));
  uint32_t b[4];
  for (int j = 0; j < 4; ++j) b[j] = pack(B[(8 * j + 2 * t) * 8 + gid], B[(8 * j + 2 * t + 1) * 8 + gid]);
  uint32_t e = 0;
  if (meta_mode == 0) {
    if (t < 2)
      for (int j = 0; j < 4; ++j) e |= nib(gid, 4 * t + j) << (4 * j) | nib(gid + 8, 4 * t + j) << (16 + 4 * j);
  } else {
    if (t < 2)
      for (int g = 0; g < 8; ++g) e |= nib(gid + 8 * t, g) << (4 * g);
  }
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  for (int i = 0; i < 4; ++i) D[(gid + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = d[i];
}

static float bf(float v) { return __bfloat162float(__float2bfloat16(v)); }

int main() {
  float A[16 * 32] = {}, B[32 * 8], ref[16 * 8] = {};
  uint8_t s0[16 * 8], s1[16 * 8];
  srand(7);
  for (int r = 0; r < 16; ++r)
    for (int g = 0; g < 8; ++g) {
      int p = rand() % 4, q = rand() % 3;
      if (q >= p) ++q;
      s0[r * 8 + g] = p < q ? p : q;
      s1[r * 8 + g] = p < q ? q : p;
      A[r * 32 + 4 * g + s0[r * 8 + g]] = bf((rand() % 2001 - 1000) / 500.f);
      A[r * 32 + 4 * g + s1[r * 8 + g]] = bf((rand() % 2001 - 1000) / 500.f);
    }
  for (int i = 0; i < 32 * 8; ++i) B[i] = bf((rand() % 2001 - 1000) / 500.f);
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 8; ++n)
      for (int k = 0; k < 32; ++k) ref[r * 8 + n] += A[r * 32 + k] * B[k * 8 + n];
  float *dA, *dB, *dD; uint8_t *d0, *d1;
  cudaMalloc(&dA, sizeof A); cudaMalloc(&dB, sizeof B); cudaMalloc(&dD, sizeof ref);
  cudaMalloc(&d0, sizeof s0); cudaMalloc(&d1, sizeof s1);
  cudaMemcpy(dA, A, sizeof A, cudaMemcpyHostToDevice); cudaMemcpy(dB, B, sizeof B, cudaMemcpyHostToDevice);
  cudaMemcpy(d0, s0, sizeof s0, cudaMemcpyHostToDevice); cudaMemcpy(d1, s1, sizeof s1, cudaMemcpyHostToDevice);
  int status = 1;
  const char* names[2] = {"kernels (t=0: groups 0-3 rows gid|gid+8)", "alternative (t=0: row gid, t=1: row gid+8)"};
  for (int mode = 0; mode < 2; ++mode) {
    float D[16 * 8];
    cudaMemset(dD, 0xff, sizeof D);
    probe<<<1, 32>>>(dA, d0, d1, dB, dD, mode);
    cudaError_t err = cudaDeviceSynchronize();
    cudaMemcpy(D, dD, sizeof D, cudaMemcpyDeviceToHost);
    double num = 0, den = 0;
    for (int i = 0; i < 128; ++i) { num += (D[i] - ref[i]) * (D[i] - ref[i]); den += ref[i] * ref[i]; }
    const double rel = std::sqrt(num / den);
    printf("mma.sp layout %-45s rel_err %.2e %s (%s)\n", names[mode], rel, rel < 1e-5 ? "MATCH" : "no", cudaGetErrorString(err));
    if (mode == 0 && rel < 1e-5) status = 0;
  }
  return status;
}
