// The extension's Python module (``ema_fused._C`` in the AOT build; the JIT build's
// module has the build's name).  Loading the library registers the kernel ops with the
// dispatcher (torch.ops.ema_fused.*); the module itself holds the host-path helpers
// (host_path.cpp) that EMA's cached plan uses, and the offload helpers (cpu_offload.cpp).
#include <torch/extension.h>

namespace ema_fused {
void bind_host_path(pybind11::module_& m);
void bind_offload(pybind11::module_& m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ema_fused's C++/CUDA kernel ops and host-path helpers";
  ema_fused::bind_host_path(m);
  ema_fused::bind_offload(m);
}
