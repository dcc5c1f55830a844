// A CPU emulation of the CUDA kernels for the tests: the same table words and the
// same per-thread tile code (csrc/multi_tensor.h) as cuda_kernels.cu, run block by
// block and thread by thread on CPU tensors.  Threads of a block share nothing (no
// shared memory, no barriers), so running them one after another gives exactly what
// the GPU computes, up to fp32 contraction choices of the two compilers.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "multi_tensor.h"
#include "pairs.h"

namespace {

template <ema_fused::Kind K>
void emulate(const char* op, at::TensorList a, at::TensorList b, double scalar) {
  const std::vector<ema_fused::Pair> pairs =
      ema_fused::check_pairs(op, a, b, K, at::Device(at::kCPU));
  const std::vector<int64_t> words = ema_fused::table_words(pairs);
  const int64_t n_rows = static_cast<int64_t>(pairs.size());
  const int64_t n_tiles = static_cast<int64_t>(words.size()) - n_rows * ema_fused::kRow;
  for (int64_t block = 0; block < n_tiles; ++block) {
    for (int thread = 0; thread < ema_fused::kThreads; ++thread) {
      ema_fused::run_tile<K>(words.data(), n_rows, block, thread, static_cast<float>(scalar));
    }
  }
}

// kind: "update" | "copy" | "swap"; returns the number of tiles that took the
// vector path, so the tests can check both paths ran.
int64_t run(at::TensorList a, at::TensorList b, const std::string& kind, double scalar) {
  if (kind == "update") {
    emulate<ema_fused::Kind::Update>("emulated update", a, b, scalar);
  } else if (kind == "copy") {
    emulate<ema_fused::Kind::Copy>("emulated copy", a, b, scalar);
  } else {
    TORCH_CHECK(kind == "swap", "unknown kind ", kind);
    emulate<ema_fused::Kind::Swap>("emulated swap", a, b, scalar);
  }
  int64_t vector_tiles = 0;
  for (const ema_fused::Pair& p : ema_fused::check_pairs("count", a, b, ema_fused::Kind::Copy,
                                                          at::Device(at::kCPU))) {
    if (ema_fused::vector_aligned(p)) vector_tiles += p.numel / ema_fused::kTile;
  }
  return vector_tiles;
}

}  // namespace

TORCH_LIBRARY(ema_fused_emulation, m) {
  m.def("run_(Tensor(a!)[] a, Tensor(b!)[] b, str kind, float scalar) -> int");
  m.impl("run_", c10::DispatchKey::CompositeExplicitAutograd, &run);
}
