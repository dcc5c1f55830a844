// Kernel-level op schemas of ema_fused's C++ extension (ema_fused._C).
//
// The public ops (ema_fused::update_, copy_, swap_, weighted_sum_) are defined in Python
// (ema_fused/ops.py) and choose a backend per device; the "cpu" and "cuda" backends
// call the kernel ops below.  They are defined here once (a FRAGMENT, since Python
// also adds ops to the namespace); each device's kernels register beside their
// implementation with TORCH_LIBRARY_IMPL (cpu_kernels.cpp, cuda_kernels.cu).
//
// Every kernel op takes tensors the kernels support: float32, bfloat16 or float16,
// contiguous, pairs of equal shape on one device.  They check that (naming the index
// and both sides) before writing anything; the Python backends send other pairs to
// the foreach fallback.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ema_fused, m) {
  // shadows[i] += weight * (params[i] - shadows[i]); fp32 math, rounded once.  With
  // skip_nonfinite, an element whose param is NaN or +-Inf keeps its shadow.
  m.def("kernel_update_(Tensor(a!)[] shadows, Tensor[] params, float weight, "
        "bool skip_nonfinite=False) -> ()");
  // The same with the weight read from a 1-element float32 tensor on the shadows'
  // device, at run time (CUDA: on the device, so a captured graph replays with the
  // value the tensor holds at replay).
  m.def("kernel_update_graph_safe_(Tensor(a!)[] shadows, Tensor[] params, Tensor weight, "
        "bool skip_nonfinite=False) -> ()");
  // dst[i] = src[i] * scale, rounded once into dst[i]'s dtype.
  m.def("kernel_copy_(Tensor(a!)[] dst, Tensor[] src, float scale) -> ()");
  // Exchange the contents of a[i] and b[i] (equal dtypes).
  m.def("kernel_swap_(Tensor(a!)[] a, Tensor(b!)[] b) -> ()");
  // out[i] += weight * inputs[i] (out float32, any finite weight); fp32 math, rounded once.
  m.def("kernel_weighted_sum_(Tensor(a!)[] out, Tensor[] inputs, float weight) -> ()");
  // K profiles in one pass: for k < len(weights), shadows[k * n + i] (flat,
  // profile-major; n = len(params)) gets kernel_update_'s result for params[i] and
  // weights[k], each param read once (cpu_multi_shadow.cpp, cuda_multi_shadow.cu).
  m.def("kernel_multi_update_(Tensor(a!)[] shadows, Tensor[] params, float[] weights) -> ()");
  // kernel_update_ for bfloat16/float16 shadows, the fp32 result rounded stochastically
  // (stochastic.h): element e of pair i is element starts[i] + e of its tensor, and its
  // random bits come from the Philox4x32-10 draw of counter ((starts[i] + e) / 8,
  // positions[i], offset) under key seed (seed and offset: 64-bit unsigned numbers in
  // two's complement).  Weight 0 and 1 as kernel_update_ (nothing random in either).
  m.def("kernel_update_stochastic_(Tensor(a!)[] shadows, Tensor[] params, float weight, "
        "bool skip_nonfinite, int seed, int offset, int[] positions, int[] starts) -> ()");
  // kernel_multi_update_ rounded stochastically: profile k as kernel_update_stochastic_ with
  // seeds[k]; positions and starts are the params'.
  m.def("kernel_multi_update_stochastic_(Tensor(a!)[] shadows, Tensor[] params, "
        "float[] weights, int[] seeds, int offset, int[] positions, int[] starts) -> ()");
}
