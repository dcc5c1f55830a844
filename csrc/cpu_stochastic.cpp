// The stochastic update on the CPU: kernel_update_stochastic_ and
// kernel_multi_update_stochastic_, the update of 16-bit shadows rounded stochastically
// (stochastic.h), every pair in one parallel pass (cpu_parallel.h).
//
// Bytes per element, bf16 param + bf16 shadow: 2 + 2 + 2 = 6, against 10 for the same
// params with fp32 shadows.  The random bits come from registers (an eighth of a Philox
// draw per element, no random tensor in memory), so the loop is as much arithmetic as
// memory traffic: the SIMD bodies do it (cpu_stochastic_loops.cpp picks them).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_parallel.h"
#include "cpu_stochastic.h"
#include "multi_checks.h"
#include "stochastic_checks.h"

namespace ema_fused {
namespace {

// A RangeFn over one chunk: `desc` is its SrJob.  `copy` set: a profile of weight 1 in
// a multi update (its exact copy, scale 1).
struct SrJob {
  SrKernel kernel;
  SrSpan span;
  RangeFn copy;
  int64_t size_p;  // bytes per param element
};

void sr_chunk(void* desc, void*, int64_t, float) {
  const SrJob& job = *static_cast<const SrJob*>(desc);
  job.kernel.run(job.span);
}

// The pairs' checks, then one parallel pass.  Weight 0 changes nothing, weight 1 copies
// the params exactly (nothing random in either); else every shadow must be bf16 or fp16
// (the callers send fp32 shadows to kernel_update_: nothing to round there).
void kernel_update_stochastic_cpu(at::TensorList shadows, at::TensorList params, double weight,
                                  bool skip_nonfinite, int64_t seed, int64_t offset,
                                  at::IntArrayRef positions, at::IntArrayRef starts) {
  const char* op = "kernel_update_stochastic_";
  TORCH_CHECK(weight >= 0.0 && weight <= 1.0, op, ": weight must be in [0, 1], got ", weight);
  check_counters(op, shadows, positions, starts);
  const std::vector<Pair> pairs = check_pairs(op, shadows, params, Kind::Update, at::Device(at::kCPU));
  check_rounded(op, pairs);
  static CheckedPairSets checked;
  checked.check(op, pairs, Kind::Update);
  const float w = static_cast<float>(weight);
  if (w == 0.0f) return;
  std::vector<Chunk> chunks;
  if (w == 1.0f) {  // a copy: exact, as kernel_update_'s
    for (const Pair& p : pairs) {
      const RangeFn fn = skip_nonfinite ? Table<CopyFinite>::get(p.code_a, p.code_b)
                                        : Table<Copy>::get(p.code_a, p.code_b);
      char *xp = static_cast<char*>(p.a), *yp = static_cast<char*>(const_cast<void*>(p.b));
      for (int64_t start = 0; start < p.numel; start += kChunk) {
        chunks.push_back({fn, xp + start * p.size_a, yp + start * p.size_b,
                          std::min(kChunk, p.numel - start)});
      }
    }
    run(std::move(chunks), 1.0f);
    return;
  }
  std::vector<SrJob> jobs;
  for (const Pair& p : pairs) {
    const SrKernel kernel = sr_kernel(p.code_a, p.code_b, skip_nonfinite);
    const sr::Stream st = sr::stream_of(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                                        static_cast<uint32_t>(positions[p.index]));
    for (int64_t start = 0; start < p.numel; start += kChunk) {
      const SrSpan span{static_cast<char*>(p.a) + start * p.size_a,
                        static_cast<const char*>(p.b) + start * p.size_b,
                        std::min(kChunk, p.numel - start),
                        static_cast<uint64_t>(starts[p.index] + start), st, w};
      jobs.push_back({kernel, span, nullptr, p.size_b});
    }
  }
  chunks.reserve(jobs.size());
  for (SrJob& job : jobs) chunks.push_back({sr_chunk, &job, nullptr, job.span.n});
  run(std::move(chunks), w);  // returns once every chunk ran: `jobs` outlives them
}

// 2048 elements: 4-8 KB of param, so that the block stays in L1 while each profile's
// shadow streams past it (as cpu_multi_shadow.cpp's per-profile blocks).
constexpr int64_t kBlock = 2048;

// One chunk of one param with every profile's spans over it.
struct SrMultiJob {
  std::vector<SrJob> profiles;  // span n: the chunk's length; first: its first element
};

void sr_multi_chunk(void* desc, void*, int64_t, float) {
  const SrMultiJob& job = *static_cast<const SrMultiJob*>(desc);
  const int64_t n = job.profiles.front().span.n;
  for (int64_t start = 0; start < n; start += kBlock) {
    for (const SrJob& whole : job.profiles) {
      SrSpan part = whole.span;
      part.s = static_cast<char*>(part.s) + start * 2;  // a 16-bit shadow
      part.p = static_cast<const char*>(part.p) + start * whole.size_p;
      part.n = std::min(kBlock, n - start);
      part.first += static_cast<uint64_t>(start);
      if (whole.copy != nullptr) {
        whole.copy(part.s, const_cast<void*>(part.p), part.n, 1.0f);
      } else {
        whole.kernel.run(part);
      }
    }
  }
}

// K profiles in one pass, each param chunk read from memory once: profile k's shadows get
// exactly kernel_update_stochastic_(shadows[k], params, weights[k], seed=seeds[k], offset,
// positions, starts) (weight 1 copies, weight 0 leaves the profile alone).
void kernel_multi_update_stochastic_cpu(at::TensorList shadows, at::TensorList params,
                                        c10::ArrayRef<double> weights, at::IntArrayRef seeds,
                                        int64_t offset, at::IntArrayRef positions,
                                        at::IntArrayRef starts) {
  const char* op = "kernel_multi_update_stochastic_";
  TORCH_CHECK_VALUE(seeds.size() == weights.size(), op, ": ", weights.size(), " weights but ",
                    seeds.size(), " seeds (one per profile)");
  check_counters(op, params, positions, starts);
  const MultiPlan plan = check_multi(op, shadows, params, weights, at::Device(at::kCPU));
  check_rounded_profiles(op, plan);
  static CheckedMultiSets checked;
  checked.check(op, shadows, params);
  if (plan.active.empty()) return;
  std::vector<SrMultiJob> jobs;
  for (size_t r = 0; r < plan.pairs[0].size(); ++r) {
    const Pair& first = plan.pairs[0][r];
    for (int64_t start = 0; start < first.numel; start += kChunk) {
      SrMultiJob job;
      for (size_t j = 0; j < plan.active.size(); ++j) {
        const Pair& q = plan.pairs[j][r];
        const int k = plan.active[j];
        SrJob one{sr_kernel(q.code_a, q.code_b, false), {}, nullptr, q.size_b};
        if (plan.weights[j] == 1.0f) one.copy = Table<Copy>::get(q.code_a, q.code_b);
        one.span = {static_cast<char*>(q.a) + start * q.size_a,
                    static_cast<const char*>(q.b) + start * q.size_b,
                    std::min(kChunk, q.numel - start),
                    static_cast<uint64_t>(starts[q.index] + start),
                    sr::stream_of(static_cast<uint64_t>(seeds[k]), static_cast<uint64_t>(offset),
                                  static_cast<uint32_t>(positions[q.index])),
                    plan.weights[j]};
        job.profiles.push_back(one);
      }
      jobs.push_back(std::move(job));
    }
  }
  std::vector<Chunk> chunks;
  chunks.reserve(jobs.size());
  for (SrMultiJob& job : jobs) {
    chunks.push_back({sr_multi_chunk, &job, nullptr, job.profiles.front().span.n});
  }
  run(std::move(chunks), 0.0f);  // returns once every chunk ran: `jobs` outlives them
}

}  // namespace
}  // namespace ema_fused

TORCH_LIBRARY_IMPL(ema_fused, CPU, m) {
  m.impl("kernel_update_stochastic_", &ema_fused::kernel_update_stochastic_cpu);
  m.impl("kernel_multi_update_stochastic_", &ema_fused::kernel_multi_update_stochastic_cpu);
}
