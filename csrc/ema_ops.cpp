// Kernel-level op schemas of ema_fused's C++ extension (ema_fused._C).
//
// The public ops (ema_fused::update_, copy_, swap_) are defined in Python
// (ema_fused/ops.py) and choose a backend per device; the "cpu" backend calls the
// kernel ops below.  They are defined here once (a FRAGMENT, since Python also adds
// ops to the namespace); each device's kernels register beside their implementation
// with TORCH_LIBRARY_IMPL (cpu_kernels.cpp; the CUDA kernels will join them).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ema_fused, m) {
  // shadows[i] += weight * (params[i] - shadows[i]); fp32 math, rounded once.
  m.def("kernel_update_(Tensor(a!)[] shadows, Tensor[] params, float weight) -> ()");
  // dst[i] = src[i] * scale, rounded once into dst[i]'s dtype.
  m.def("kernel_copy_(Tensor(a!)[] dst, Tensor[] src, float scale) -> ()");
}
