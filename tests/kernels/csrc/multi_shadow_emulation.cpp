// A CPU emulation of the CUDA multi-shadow kernel for the tests: the same checks
// (multi_checks.h), the same table words and the same per-block code (multi_shadow.h:
// run_multi_block) as cuda_multi_shadow.cu, run block by block and thread by thread on
// CPU tensors, with every thread's path counted (EMA_FUSED_MULTI_TRACE).  For the
// reference it also runs the single update's engine (multi_tensor.h: run_block) the
// same way, so the two can be compared bit for bit, compiled by the same compiler.
#include <array>
#include <cstdint>

namespace emulation {
std::array<int64_t, 8> trace{};  // indexed by ema_fused::MultiTrace
}
#define EMA_FUSED_MULTI_TRACE(event) (++emulation::trace[event])

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "multi_checks.h"
#include "multi_shadow.h"
#include "stochastic_checks.h"

namespace {

using ema_fused::kMaxProfiles;

// Flat, profile-major shadows as kernel_multi_update_ takes them.  Returns the per-thread
// counts of each traced path (ema_fused::MultiTrace order).
std::vector<int64_t> multi(at::TensorList shadows, at::TensorList params,
                           c10::ArrayRef<double> weights) {
  emulation::trace.fill(0);
  const char* op = "emulated multi update";
  const ema_fused::MultiPlan plan =
      ema_fused::check_multi(op, shadows, params, weights, at::Device(at::kCPU));
  ema_fused::check_multi_overlaps(op, shadows, params);
  for (size_t g = 0; g < plan.active.size() && !plan.pairs[0].empty(); g += kMaxProfiles) {
    const size_t end = std::min(plan.active.size(), g + static_cast<size_t>(kMaxProfiles));
    std::vector<int64_t> words(ema_fused::multi_table_size(plan.pairs, g, end));
    ema_fused::fill_multi_table(plan.pairs, g, end, words.data(), words.data());
    const int64_t n_rows = static_cast<int64_t>(plan.pairs[g].size());
    const int n_profiles = static_cast<int>(end - g);
    const int64_t n_tiles = static_cast<int64_t>(words.size()) -
                            n_rows * (ema_fused::kMultiHead + n_profiles);
    ema_fused::MultiWeights ws{};
    for (size_t j = g; j < end; ++j) ws.w[j - g] = plan.weights[j];
    for (int64_t block = 0; block < n_tiles; ++block) {
      for (int thread = 0; thread < ema_fused::kThreads; ++thread) {
        ema_fused::run_multi_block(words.data(), n_rows, n_profiles, block, thread, ws);
      }
    }
  }
  return std::vector<int64_t>(emulation::trace.begin(), emulation::trace.end());
}

// The single update kernel's engine (cuda_kernels.cu's per-block code), for reference.
void single(at::TensorList shadows, at::TensorList params, double weight) {
  using ema_fused::Kind;
  const std::vector<ema_fused::Pair> pairs =
      ema_fused::check_pairs("emulated update", shadows, params, Kind::Update, at::Device(at::kCPU));
  std::vector<int64_t> words(ema_fused::table_size(pairs));
  ema_fused::fill_table(pairs, words.data(), words.data());
  const int64_t n_rows = static_cast<int64_t>(pairs.size());
  const int64_t n_tiles = static_cast<int64_t>(words.size()) - n_rows * ema_fused::kRow;
  for (int64_t block = 0; block < n_tiles; ++block) {
    for (int thread = 0; thread < ema_fused::kThreads; ++thread) {
      ema_fused::run_block<Kind::Update>(words.data(), n_rows, block, thread,
                                         static_cast<float>(weight), nullptr);
    }
  }
}

// The stochastic multi update as cuda_multi_shadow.cu launches it: tables with the
// params' counter words, profile j's seed in MultiKeys.
std::vector<int64_t> multi_stochastic(at::TensorList shadows, at::TensorList params,
                                      c10::ArrayRef<double> weights, at::IntArrayRef seeds,
                                      int64_t offset, at::IntArrayRef positions,
                                      at::IntArrayRef starts) {
  emulation::trace.fill(0);
  const char* op = "emulated stochastic multi update";
  TORCH_CHECK(seeds.size() == weights.size(), op, ": one seed per profile");
  ema_fused::check_counters(op, params, positions, starts);
  const ema_fused::MultiPlan plan =
      ema_fused::check_multi(op, shadows, params, weights, at::Device(at::kCPU));
  ema_fused::check_rounded_profiles(op, plan);
  ema_fused::check_multi_overlaps(op, shadows, params);
  for (size_t g = 0; g < plan.active.size() && !plan.pairs[0].empty(); g += kMaxProfiles) {
    const size_t end = std::min(plan.active.size(), g + static_cast<size_t>(kMaxProfiles));
    std::vector<int64_t> words(ema_fused::multi_table_size(plan.pairs, g, end, true));
    ema_fused::fill_multi_table(plan.pairs, g, end, words.data(), words.data(), positions.data(),
                                starts.data());
    const int64_t n_rows = static_cast<int64_t>(plan.pairs[g].size());
    const int n_profiles = static_cast<int>(end - g);
    const int64_t n_tiles = static_cast<int64_t>(words.size()) -
                            n_rows * ema_fused::multi_row_words(n_profiles, true);
    ema_fused::MultiWeights ws{};
    ema_fused::MultiKeys ks{};
    for (size_t j = g; j < end; ++j) {
      ws.w[j - g] = plan.weights[j];
      const auto seed = static_cast<uint64_t>(seeds[plan.active[j]]);
      ks.k0[j - g] = uint32_t(seed);
      ks.k1[j - g] = uint32_t(seed >> 32);
    }
    ks.off_lo = uint32_t(static_cast<uint64_t>(offset));
    ks.off_hi = uint32_t(static_cast<uint64_t>(offset) >> 32);
    for (int64_t block = 0; block < n_tiles; ++block) {
      for (int thread = 0; thread < ema_fused::kThreads; ++thread) {
        ema_fused::run_multi_block<true>(words.data(), n_rows, n_profiles, block, thread, ws, ks);
      }
    }
  }
  return std::vector<int64_t>(emulation::trace.begin(), emulation::trace.end());
}

}  // namespace

TORCH_LIBRARY(ema_fused_multi_emulation, m) {
  m.def("multi_stochastic_(Tensor(a!)[] shadows, Tensor[] params, float[] weights, int[] seeds, "
        "int offset, int[] positions, int[] starts) -> int[]");
  m.impl("multi_stochastic_", c10::DispatchKey::CompositeExplicitAutograd, &multi_stochastic);
  m.def("multi_(Tensor(a!)[] shadows, Tensor[] params, float[] weights) -> int[]");
  m.impl("multi_", c10::DispatchKey::CompositeExplicitAutograd, &multi);
  m.def("single_(Tensor(a!)[] shadows, Tensor[] params, float weight) -> ()");
  m.impl("single_", c10::DispatchKey::CompositeExplicitAutograd, &single);
}
