// A CPU emulation of the CUDA kernels for the tests: the same checks, the same table
// words and the same per-block code (csrc/multi_tensor.h: run_block, with the weight's
// exact ends) as cuda_kernels.cu, run block by block and thread by thread on CPU
// tensors.  Threads of a block share nothing (no shared memory, no barriers), so
// running them one after another gives exactly what the GPU computes, up to fp32
// contraction choices of the two compilers.  Every thread's path is counted
// (EMA_FUSED_TRACE), so the tests can see which path ran and that a zero weight reads
// nothing.
#include <array>
#include <cstdint>

namespace emulation {
std::array<int64_t, 5> trace{};  // indexed by ema_fused::Trace
}
#define EMA_FUSED_TRACE(event) (++emulation::trace[event])

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "multi_tensor.h"
#include "pairs.h"
#include "stochastic_checks.h"

namespace {

using ema_fused::Kind;

template <Kind K>
void emulate(const char* op, at::TensorList a, at::TensorList b, float scalar, bool from_ptr) {
  const std::vector<ema_fused::Pair> pairs =
      ema_fused::check_pairs(op, a, b, K, at::Device(at::kCPU));
  ema_fused::check_overlaps(op, pairs, K);
  std::vector<int64_t> words(ema_fused::table_size(pairs));
  ema_fused::fill_table(pairs, words.data(), words.data());
  const int64_t n_rows = static_cast<int64_t>(pairs.size());
  const int64_t n_tiles = static_cast<int64_t>(words.size()) - n_rows * ema_fused::kRow;
  const float* ptr = from_ptr ? &scalar : nullptr;  // the graph-safe form: read in the kernel
  for (int64_t block = 0; block < n_tiles; ++block) {
    for (int thread = 0; thread < ema_fused::kThreads; ++thread) {
      ema_fused::run_block<K>(words.data(), n_rows, block, thread, from_ptr ? 0.0f : scalar, ptr);
    }
  }
}

// kind: "update" | "update_finite" | "copy" | "weighted_sum" | "swap".  Returns the per-thread counts of each traced path:
// [tile entries read, full tiles with vector b, full tiles with scalar b, guarded
// partial tiles, head elements].
std::vector<int64_t> run(at::TensorList a, at::TensorList b, const std::string& kind,
                         double scalar, bool from_ptr) {
  emulation::trace.fill(0);
  const float s = static_cast<float>(scalar);
  if (kind == "update") {
    emulate<Kind::Update>("emulated update", a, b, s, from_ptr);
  } else if (kind == "update_finite") {  // skip_nonfinite (its weight 1 runs CopyFinite)
    emulate<Kind::UpdateFinite>("emulated update", a, b, s, from_ptr);
  } else if (kind == "copy") {
    emulate<Kind::Copy>("emulated copy", a, b, s, from_ptr);
  } else if (kind == "weighted_sum") {
    emulate<Kind::Accumulate>("emulated weighted sum", a, b, s, from_ptr);
  } else {
    TORCH_CHECK(kind == "swap", "unknown kind ", kind);
    emulate<Kind::Swap>("emulated swap", a, b, s, from_ptr);
  }
  return std::vector<int64_t>(emulation::trace.begin(), emulation::trace.end());
}

// The stochastic update's engine as cuda_kernels.cu runs it (rows with the counter words,
// run_block_stochastic), with the same checks; returns the traced path counts as run().
std::vector<int64_t> run_stochastic(at::TensorList a, at::TensorList b, double scalar,
                                    bool skip_nonfinite, int64_t seed, int64_t offset,
                                    at::IntArrayRef positions, at::IntArrayRef starts) {
  emulation::trace.fill(0);
  const char* op = "emulated stochastic update";
  ema_fused::check_counters(op, a, positions, starts);
  const std::vector<ema_fused::Pair> pairs =
      ema_fused::check_pairs(op, a, b, Kind::Update, at::Device(at::kCPU));
  ema_fused::check_rounded(op, pairs);
  ema_fused::check_overlaps(op, pairs, Kind::Update);
  std::vector<int64_t> words(ema_fused::table_size(pairs, ema_fused::kRowStochastic));
  ema_fused::fill_table(pairs, words.data(), words.data(), positions.data(), starts.data());
  const int64_t n_rows = static_cast<int64_t>(pairs.size());
  const int64_t n_tiles = static_cast<int64_t>(words.size()) - n_rows * ema_fused::kRowStochastic;
  const auto u_seed = static_cast<uint64_t>(seed), u_offset = static_cast<uint64_t>(offset);
  const ema_fused::RandomKey key{uint32_t(u_seed), uint32_t(u_seed >> 32), uint32_t(u_offset),
                                 uint32_t(u_offset >> 32)};
  const float s = static_cast<float>(scalar);
  for (int64_t block = 0; block < n_tiles; ++block) {
    for (int thread = 0; thread < ema_fused::kThreads; ++thread) {
      if (skip_nonfinite) {
        ema_fused::run_block_stochastic<Kind::UpdateFinite>(words.data(), n_rows, block, thread, s, key);
      } else {
        ema_fused::run_block_stochastic<Kind::Update>(words.data(), n_rows, block, thread, s, key);
      }
    }
  }
  return std::vector<int64_t>(emulation::trace.begin(), emulation::trace.end());
}

// stochastic.h's Philox4x32-10 of one counter under one key, for the tests to compare
// with Random123's known answers, Triton's tl.philox and the torch version.
std::vector<int64_t> philox(int64_t c0, int64_t c1, int64_t c2, int64_t c3, int64_t seed) {
  const auto key = static_cast<uint64_t>(seed);
  const ema_fused::sr::Draw d = ema_fused::sr::philox(uint32_t(c0), uint32_t(c1), uint32_t(c2),
                                                      uint32_t(c3), uint32_t(key), uint32_t(key >> 32));
  return {d.w0, d.w1, d.w2, d.w3};
}

}  // namespace

TORCH_LIBRARY(ema_fused_emulation, m) {
  m.def("run_(Tensor(a!)[] a, Tensor(b!)[] b, str kind, float scalar, bool from_ptr=False) -> int[]");
  m.impl("run_", c10::DispatchKey::CompositeExplicitAutograd, &run);
  m.def("run_stochastic_(Tensor(a!)[] a, Tensor[] b, float scalar, bool skip_nonfinite, int seed, "
        "int offset, int[] positions, int[] starts) -> int[]");
  m.impl("run_stochastic_", c10::DispatchKey::CompositeExplicitAutograd, &run_stochastic);
  m.def("philox(int c0, int c1, int c2, int c3, int seed) -> int[]");
  m.impl("philox", c10::DispatchKey::CompositeExplicitAutograd, &philox);
}
