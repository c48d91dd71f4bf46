// Thin torch binding: checks the inputs (messages prefixed with the op name), fills VnmParams, and calls
// the kernel table entry Python chose. No kernel logic here.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "vnm_limits.h"
#include "vnm_params.h"
#include "vnm_sm90_layout.h"

namespace {

constexpr const char* kOp = "vnmsparse::linear";

// Error messages are assembled here without iostreams and handed to TORCH_CHECK as one string: on the H100 image
// (g++ 13.3, torch 2.11) an extension that formats an integer through std::ostream segfaults in the num_put facet
// lookup (cuda-gdb: basic_ostream::_M_insert<long> inside our .so), which turned every refusal into a crash.
void append(std::string& s, const char* v) { s += v; }
void append(std::string& s, const std::string& v) { s += v; }
void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
void append(std::string& s, const c10::Device& v) { s += v.str(); }
void append(std::string& s, at::IntArrayRef v) {
  s += "(";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  s += ")";
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0> void append(std::string& s, T v) {
  s += std::to_string(v);
}
template <typename... Args> std::string message(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}
#define VNM_CHECK(cond, ...) TORCH_CHECK(cond, message(__VA_ARGS__))

vnm::ElemType elem_type(const at::Tensor& t) {
  VNM_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, kOp,
              ": x must be bfloat16 or float16, got ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16 ? vnm::ElemType::kBf16 : vnm::ElemType::kFp16;
}

void check_cuda_contiguous(const at::Tensor& t, const char* name, const at::Tensor& x) {
  VNM_CHECK(t.is_cuda(), kOp, ": ", name, " must be a CUDA tensor");
  VNM_CHECK(t.device() == x.device(), kOp, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  VNM_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

// Arrival counters of the split-k kernels: zero between launches (the last CTA of each output tile resets its
// own), so one buffer per (device, stream) serves every call and CUDA-graph replay: launches on one stream never
// overlap, while two streams sharing a buffer could (a tile's partials would be summed by the wrong CTA). Graphs
// use the counters of the stream they were captured on. The memory comes from cudaMalloc, not PyTorch's caching
// allocator: a buffer created during torch.compile's CUDA-graph warm-up must not live in the graph's private
// pool (cudagraph trees refuse a pool tensor that outlives the call). Zeroed by a memset on `stream`, ordered
// before the kernel that needs it (inside a capture, the memset becomes a node of that graph). Never freed.
int* counters_for(const at::Device& device, cudaStream_t stream, int64_t n) {
  static std::mutex mu;
  static auto* buffers = new std::map<std::pair<int, uintptr_t>, std::pair<int*, int64_t>>();
  std::lock_guard<std::mutex> lock(mu);
  auto& buf = (*buffers)[{device.index(), reinterpret_cast<uintptr_t>(stream)}];
  if (buf.first == nullptr || buf.second < n) {
    const int64_t count = std::max<int64_t>(n, 4096);
    void* ptr = nullptr;
    // cudaMalloc is not a stream operation: allowed while this thread captures only in relaxed mode.
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    VNM_CHECK(cudaThreadExchangeStreamCaptureMode(&mode) == cudaSuccess, kOp, ": cannot switch the capture mode");
    const cudaError_t err = cudaMalloc(&ptr, count * sizeof(int));
    cudaThreadExchangeStreamCaptureMode(&mode);
    VNM_CHECK(err == cudaSuccess, kOp, ": cannot allocate split-k counters: ", cudaGetErrorString(err));
    VNM_CHECK(cudaMemsetAsync(ptr, 0, count * sizeof(int), stream) == cudaSuccess, kOp, ": cannot zero split-k counters");
    buf = {static_cast<int*>(ptr), count};  // a smaller buffer it replaces may be in a graph: kept, not freed
  }
  return buf.first;
}

// Programmatic dependent launch of the decode kernels: asked for by the caller (`OpsConfig.pdl`), and only on sm_90
// and newer while `stream` is being captured into a CUDA graph: in graphs it takes 0.6-1.0 us off every decode at
// 4096^2 on the H100, while eager calls measured 0.35-1.0 us slower with it (docs/kernels.md).
bool pdl_allowed(bool requested, const at::Device& device, cudaStream_t stream) {
  if (!requested || vnm::compute_capability(device.index()) < 90) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream, &status) == cudaSuccess && status == cudaStreamCaptureStatusActive;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// y = x @ W^T + bias with W given by its packed parts; x is (..., C) with any leading dims (nn.Linear's rule),
// y is (..., R). Flattening here rather than in Python keeps two tensor ops per call off the eager decode path.
// With `inputs` (a 2:4 copy laid out over other columns than x's, pack.PackedVNM.inputs: C int64 x columns), x
// has any number of columns and the kernel reads x[..., inputs], gathered here first (vnm_gather.cu).
at::Tensor run(const at::Tensor& x_in, const at::Tensor& a_vals, const at::Tensor& a_meta, const at::Tensor& cols,
               const c10::optional<at::Tensor>& bias, int64_t R, int64_t C, int64_t V, int64_t kernel,
               int64_t ksplit, const c10::optional<at::Tensor>& out, int64_t window, bool pdl,
               const c10::optional<at::Tensor>& inputs) {
  VNM_CHECK(x_in.dim() >= 1, kOp, ": x must have at least 1 dim, got a scalar");
  VNM_CHECK(x_in.is_cuda(), kOp, ": x must be a CUDA tensor");
  const int64_t Cx = x_in.size(-1);
  if (inputs.has_value()) {
    check_cuda_contiguous(*inputs, "inputs", x_in);
    VNM_CHECK(inputs->scalar_type() == at::kLong && inputs->dim() == 1 && inputs->size(0) == C, kOp,
              ": inputs must be (", C, ",) int64 (the x column of each weight column), got ", inputs->sizes(), " ",
              inputs->scalar_type());
    VNM_CHECK(Cx < (int64_t(1) << 31), kOp, ": x has too many columns to gather");
  } else {
    VNM_CHECK(Cx == C, kOp, ": x has ", Cx, " columns but the weight has in_features=", C);
  }
  // (N, Cx) with contiguous rows: a 2-D x with a row stride >= Cx as it is (no copy), anything else flattened.
  const bool rows_ok = x_in.dim() == 2 && x_in.stride(1) == 1 && (x_in.size(0) <= 1 || x_in.stride(0) >= Cx);
  at::Tensor x = rows_ok ? x_in : x_in.contiguous().view({-1, Cx});
  const vnm::ElemType et = elem_type(x);
  check_cuda_contiguous(a_vals, "a_vals", x);
  check_cuda_contiguous(a_meta, "a_meta", x);
  check_cuda_contiguous(cols, "cols", x);
  VNM_CHECK(a_vals.scalar_type() == x.scalar_type(), kOp, ": weight dtype ", a_vals.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  VNM_CHECK(a_meta.scalar_type() == at::kInt && cols.scalar_type() == at::kInt, kOp,
              ": a_meta and cols must be int32");
  VNM_CHECK(R >= 1 && C >= 1, kOp, ": R and C must be positive");
  VNM_CHECK(std::find(std::begin(vnm::kSupportedV), std::end(vnm::kSupportedV), V) != std::end(vnm::kSupportedV), kOp,
            ": V must be one of ", vnm::kSupportedVText, ", got ", V);
  const int64_t Rt = (R + 15) / 16, Bn = (R + V - 1) / V;
  VNM_CHECK(a_vals.dim() == 4 && a_vals.size(0) == Rt && a_vals.size(2) == 32 && a_vals.size(3) == 8, kOp,
              ": a_vals must be (", Rt, ", Kc, 32, 8), got ", a_vals.sizes());
  const int64_t Kc = a_vals.size(1);
  VNM_CHECK(a_meta.dim() == 3 && a_meta.size(0) == Rt && a_meta.size(1) == Kc && a_meta.size(2) == 16, kOp,
              ": a_meta must be (", Rt, ", ", Kc, ", 16), got ", a_meta.sizes());
  VNM_CHECK(cols.dim() == 3 && cols.size(0) == Bn && cols.size(1) == 8 * Kc && cols.size(2) == 4, kOp,
              ": cols must be (", Bn, ", ", 8 * Kc, ", 4), got ", cols.sizes());
  if (bias.has_value()) {
    check_cuda_contiguous(*bias, "bias", x);
    VNM_CHECK(bias->dim() == 1 && bias->size(0) == R, kOp, ": bias must have shape (", R, ",)");
    VNM_CHECK(bias->scalar_type() == x.scalar_type(), kOp, ": bias dtype must match x");
  }
  const int64_t N = x.size(0);
  std::vector<int64_t> y_sizes(x_in.sizes().begin(), x_in.sizes().end());
  y_sizes.back() = R;
  VNM_CHECK(N < (int64_t(1) << 31) && R * 16 < (int64_t(1) << 31), kOp, ": sizes too large");

  int count = 0;
  const vnm::KernelEntry* table = vnm::kernel_table(&count);
  VNM_CHECK(kernel >= 0 && kernel < count, kOp, ": kernel index ", kernel, " outside the table of ", count);
  const vnm::KernelEntry& entry = table[kernel];
  VNM_CHECK(entry.dtype == et, kOp, ": kernel ", entry.name, " is for another dtype");
  VNM_CHECK(entry.V == 0 || entry.V == V, kOp, ": kernel ", entry.name, " is built for V=", entry.V, ", got V=", V);
  VNM_CHECK(N <= entry.max_n, kOp, ": kernel ", entry.name, " takes at most N=", entry.max_n, " tokens, got ", N);
  VNM_CHECK(entry.rows * 16 <= V, kOp, ": kernel ", entry.name, " needs V >= ", entry.rows * 16, ", got V=", V);
  VNM_CHECK(ksplit >= 0 && ksplit <= 4096, kOp, ": ksplit must be in 1..4096, or 0 (stream-K), got ", ksplit);
  const bool sm90_kernel = entry.kind == vnm::KernelKind::kWgmma || entry.kind == vnm::KernelKind::kWgmmaWindow;
  VNM_CHECK(ksplit != vnm::sm90::kStreamK || sm90_kernel, kOp,
            ": ksplit=0 (stream-K) is for the sparse-wgmma kernels only, not ", entry.name);
  VNM_CHECK(window == 0 || (window % 8 == 0 && window >= 32 && window <= 256), kOp,
            ": window must be 0 or 8*M for M in 4..32 (what pack_for_device computed), got ", window);
  VNM_CHECK(entry.window == 0 || entry.window == window, kOp, ": kernel ", entry.name, " needs weights whose kept columns stay in their own group of ",
            entry.window / 8, " (window=", entry.window, "), got window=", window);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y;
  if (out.has_value()) {  // tests poison it first; every element must be written
    check_cuda_contiguous(*out, "out", x);
    VNM_CHECK(out->sizes() == at::IntArrayRef(y_sizes) && out->scalar_type() == x.scalar_type(), kOp, ": out must be ",
              at::IntArrayRef(y_sizes), " of x's dtype");
    y = *out;
  } else {
    y = at::empty(y_sizes, x.options());
  }
  if (N == 0) return y;

  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  if (inputs.has_value()) {  // rows padded to 8 columns: 16-byte aligned, as every kernel's fast path wants them
    const at::Tensor gathered = at::empty({N, (C + 7) / 8 * 8}, x.options());
    const cudaError_t err = vnm::launch_gather_columns(x.data_ptr(), N > 1 ? x.stride(0) : Cx, static_cast<int>(N),
                                                       static_cast<int>(Cx), inputs->data_ptr<int64_t>(), static_cast<int>(C),
                                                       gathered.data_ptr(), gathered.stride(0), stream.stream());
    VNM_CHECK(err == cudaSuccess, kOp, ": gathering x's columns failed: ", cudaGetErrorString(err));
    x = gathered.narrow(1, 0, C);
  }
  // The window kernels read x by TMA: 16-byte aligned rows. Otherwise they get a copy with rows padded to 8
  // (checked for those kernels only: decode calls skip it).
  at::Tensor x_tma;
  if (entry.kind == vnm::KernelKind::kWgmmaWindow && !(aligned16(x) && (N <= 1 ? C % 8 == 0 : x.stride(0) % 8 == 0))) {
    x_tma = at::empty({N, (C + 7) / 8 * 8}, x.options());
    x_tma.narrow(1, 0, C).copy_(x);
  }
  vnm::VnmParams p{};
  p.x = x_tma.defined() ? x_tma.data_ptr() : x.data_ptr();
  p.a_vals = reinterpret_cast<const uint4*>(a_vals.data_ptr());
  p.a_meta = reinterpret_cast<const uint32_t*>(a_meta.data_ptr<int32_t>());
  p.cols = cols.data_ptr<int32_t>();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.N = static_cast<int>(N);
  p.R = static_cast<int>(R);
  p.C = static_cast<int>(C);
  p.V = static_cast<int>(V);
  p.Rt = static_cast<int>(Rt);
  p.Kc = static_cast<int>(Kc);
  p.Gp = static_cast<int>(8 * Kc);
  p.Bn = static_cast<int>(Bn);
  p.Np = static_cast<int>((N + 7) / 8 * 8);
  p.ldx = x_tma.defined() ? x_tma.stride(0) : N > 1 ? x.stride(0) : C;  // one row: its stride is never used
  // Window copies are 16-byte: x rows and the windows' first columns must be 16-byte aligned.
  const bool aligned = aligned16(x) && p.ldx % 8 == 0 && C % 8 == 0;
  if (entry.kind == vnm::KernelKind::kWgmmaWindow)
    p.window = static_cast<int>(window);
  else
    p.window = window <= vnm::kDecodeMaxWindow && aligned ? static_cast<int>(window) : 0;
  // Its L2 prefetches take 16-byte aligned ranges: every record is a multiple of 16 bytes, so the bases must be.
  p.pdl = entry.kind == vnm::KernelKind::kDecode && pdl_allowed(pdl, x.device(), stream) && aligned16(a_vals) && aligned16(a_meta) &&
          aligned16(cols);
  p.ldy = R;
  at::Tensor xt, ws;
  p.ksplit = 1;
  const int64_t tiles = ((R + entry.tile_m - 1) / entry.tile_m) * ((N + entry.tile_n - 1) / entry.tile_n);
  int64_t shared_slices = 1;  // k slices of an output tile that more than one CTA computes (1: none)
  if (sm90_kernel) {
    // Scheduled in ring steps: one chunk (gather), or a 64-column stage of 64 / window chunks (window kernel).
    const int64_t per_step = entry.kind == vnm::KernelKind::kWgmmaWindow ? vnm::sm90::kWindowCols / entry.window : 1;
    const int64_t steps = (Kc + per_step - 1) / per_step;
    const int sms = vnm::sm_count(x.device().index());
    VNM_CHECK(sms > 0, kOp, ": cannot read the SM count of ", x.device());
    const vnm::sm90::KSchedule sched = vnm::sm90::k_schedule(tiles, static_cast<int>(steps), static_cast<int>(ksplit), sms);
    // The kernel's share arithmetic multiplies a step index by the CTA count in 64 bits.
    VNM_CHECK(sched.ctas <= (int64_t(1) << 62) / (tiles * steps + 1), kOp, ": sizes too large");
    p.ctas = sched.ctas;
    p.ksplit = sched.slices;
    if (sched.ctas != tiles) shared_slices = sched.slices;
  } else if (ksplit > 1) {
    p.ksplit = static_cast<int>(ksplit);
    shared_slices = ksplit;
  }
  if (shared_slices > 1) {
    // One fp32 partial tile per (output tile, k slice); one arrival counter per output tile.
    ws = at::empty({tiles * shared_slices * entry.tile_m * entry.tile_n}, x.options().dtype(at::kFloat));
    p.ws = ws.data_ptr<float>();
    p.counters = counters_for(x.device(), stream.stream(), tiles);
  }
  if (entry.kind == vnm::KernelKind::kGemm || entry.kind == vnm::KernelKind::kWgmma) {
    xt = at::empty({C, p.Np}, x.options());
    p.xt = xt.data_ptr();
  }
  const cudaError_t err = entry.launch(p, stream);
  VNM_CHECK(err == cudaSuccess, kOp, ": kernel ", entry.name, " failed to launch: ", cudaGetErrorString(err));
  return y;
}

// (name, kind, dtype, V, max_n, rows, window) of every compiled kernel, in table order: Python checks it matches
// its list.
std::vector<std::tuple<std::string, int, int, int, int64_t, int, int>> table() {
  int count = 0;
  const vnm::KernelEntry* t = vnm::kernel_table(&count);
  std::vector<std::tuple<std::string, int, int, int, int64_t, int, int>> out;
  for (int i = 0; i < count; ++i)
    out.emplace_back(t[i].name, static_cast<int>(t[i].kind), static_cast<int>(t[i].dtype), t[i].V, t[i].max_n, t[i].rows,
                     t[i].window);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run", &run, "V:N:M linear with a chosen kernel (see vnmsparse.ops)", py::arg("x"), py::arg("a_vals"),
        py::arg("a_meta"), py::arg("cols"), py::arg("bias"), py::arg("R"), py::arg("C"), py::arg("V"),
        py::arg("kernel"), py::arg("ksplit") = 1, py::arg("out") = py::none(), py::arg("window") = 0, py::arg("pdl") = true,
        py::arg("inputs") = py::none());
  m.def("table", &table, "the compiled kernel table");
}
