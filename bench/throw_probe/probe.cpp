// Diagnosis only (bench/throw_probe/run.py): which C++ throw from a torch extension crashes the process.
#include <torch/extension.h>
int cu_value(int* count);  // defined in probe_cu.cu (compiled by nvcc)
std::string format_int(int64_t v) { return c10::str("value ", v); }
void throw_str() { TORCH_CHECK(false, "probe: string only"); }
void throw_int(int64_t v) { TORCH_CHECK(false, "probe: int ", v); }
void throw_after_cu() { int c = 0; cu_value(&c); TORCH_CHECK(c < 0, "probe: after nvcc call"); }
void throw_after_cu_int() { int c = 0; cu_value(&c); TORCH_CHECK(c < 0, "probe: after nvcc call ", c); }
void throw_std() { throw std::runtime_error("probe: std::runtime_error"); }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("format_int", &format_int);
  m.def("throw_str", &throw_str);
  m.def("throw_int", &throw_int);
  m.def("throw_after_cu", &throw_after_cu);
  m.def("throw_after_cu_int", &throw_after_cu_int);
  m.def("throw_std", &throw_std);
}
