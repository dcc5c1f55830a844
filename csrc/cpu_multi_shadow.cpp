// kernel_multi_update_ on the CPU: K profiles' shadows of every param in one parallel
// pass, each param element read from memory once.
//
// Bytes per element, bf16 param + K fp32 shadows: 2 + 8K in one pass against 10K for K
// separate updates, so at best 0.9 of their time for K = 2 and 0.85 for K = 4.  Each
// chunk of a param (cpu_parallel.h) is walked in blocks of kBlock elements.  The common
// case (every profile's shadow of one dtype, every weight strictly between 0 and 1) runs
// fused loops: each param element loaded and widened once, and up to kFused shadows
// advanced with it.  Otherwise each profile's own range loop (cpu_ranges.h: the single
// update's update_range, or copy_range with scale 1 for weight 1) runs over the block in
// turn, the block of param staying in L1.  Measured on the 2-core EPYC VM, 30M bf16
// elements, K = 4, one thread, paired runs in one process: the per-profile blocks took
// 0.84-1.4x the time of 4 separate updates from run to run, the fused loop 0.79-0.91x
// (a shared, busy machine).  The recorded run (benchmarks/results/multi_update_cpu-2core_
// 2026-12-02.json, llama-200m, two threads): 0.885 of K separate updates' time for
// K = 2, 0.798 for K = 4.
// Either way each shadow gets the single update's bits (the fused loop computes both
// sides of the two-sided lerp as update_range does and picks the side its weight takes;
// the tests compare every dtype pair bit for bit).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_parallel.h"
#include "cpu_ranges.h"
#include "multi_checks.h"

namespace {

using ema_fused::Chunk;
using ema_fused::kChunk;
using ema_fused::kMaxProfiles;
using ema_fused::MultiPlan;
using ema_fused::Pair;
using ema_fused::RangeFn;

// 2048 elements: 4-8 KB of param (bf16/fp32) and 8 KB of each fp32 shadow, so the block
// of param stays in the 32 KB L1 while the profiles stream their shadows past it.
constexpr int64_t kBlock = 2048;
constexpr int kFused = 4;  // profiles one fused loop advances together

// Up to kFused profiles of one shadow dtype, all with 0 < w < 1, in one loop: each param
// element loaded and widened once, every shadow advanced with it (K + 1 sequential
// streams).  Per shadow the single update's arithmetic, both sides of its two-sided lerp
// computed and the side update_range would take picked by the weight (bit for bit).
using FusedFn = void (*)(char* const* s, const float* w, const void* p, int64_t n);

template <typename S, typename P, int G>
EMA_FUSED_CLONES void fused_range(char* const* s_raw, const float* w, const void* p_raw,
                                  int64_t n) {
  typename S::Raw* s[G];
  float up[G], down[G];
  uint32_t low[G];
  for (int g = 0; g < G; ++g) {
    s[g] = reinterpret_cast<typename S::Raw*>(s_raw[g]);
    up[g] = w[g];
    down[g] = 1.0f - w[g];
    low[g] = 0u - uint32_t(w[g] < 0.5f);  // update_range's branch
  }
  const auto* __restrict__ p = static_cast<const typename P::Raw*>(p_raw);
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const float b = P::load(p[i]);
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const float a = S::load(s[g][i]);
      const float lo = a + up[g] * (b - a);
      const float hi = b - down[g] * (b - a);
      s[g][i] = S::store(ema_fused::float_of(ema_fused::pick(low[g] != 0, ema_fused::bits_of(lo),
                                                              ema_fused::bits_of(hi))));
    }
  }
}

template <typename S, typename P>
FusedFn fused_for(int g) {
  return g == 1 ? fused_range<S, P, 1> : g == 2 ? fused_range<S, P, 2>
                : g == 3 ? fused_range<S, P, 3> : fused_range<S, P, 4>;
}

template <typename S>
FusedFn fused_row(int code_p, int g) {
  using ema_fused::BF16;
  using ema_fused::F16;
  using ema_fused::F32;
  return code_p == 0 ? fused_for<S, F32>(g) : code_p == 1 ? fused_for<S, BF16>(g)
                                                          : fused_for<S, F16>(g);
}

FusedFn fused_get(int code_s, int code_p, int g) {
  using ema_fused::BF16;
  using ema_fused::F16;
  using ema_fused::F32;
  return code_s == 0 ? fused_row<F32>(code_p, g) : code_s == 1 ? fused_row<BF16>(code_p, g)
                                                               : fused_row<F16>(code_p, g);
}

// One chunk: a range of one param and the same range of up to kMaxProfiles shadows.
// `fused` set: every profile shares a shadow dtype and moves (0 < w < 1), and runs in
// fused loops of kFused; else each profile's own range loop runs over the block in turn.
struct Profiles {
  char* p;
  int size_p, count, size_s;
  FusedFn fused[kMaxProfiles / kFused];
  RangeFn fn[kMaxProfiles];
  char* s[kMaxProfiles];
  int size_of[kMaxProfiles];
  float w[kMaxProfiles];
};

// A RangeFn over a chunk: `desc` is its Profiles, `n` its length.
void multi_range(void* desc, void*, int64_t n, float) {
  const Profiles& d = *static_cast<const Profiles*>(desc);
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    void* p = d.p + start * d.size_p;
    if (d.fused[0] != nullptr) {
      for (int k = 0; k < d.count; k += kFused) {
        char* s[kFused];
        for (int g = 0; g < kFused && k + g < d.count; ++g) s[g] = d.s[k + g] + start * d.size_s;
        d.fused[k / kFused](s, d.w + k, p, len);
      }
      continue;
    }
    for (int k = 0; k < d.count; ++k) d.fn[k](d.s[k] + start * d.size_of[k], p, len, d.w[k]);
  }
}

// Profiles in groups of kMaxProfiles, each group's chunks reading the params once.
void run_plan(const MultiPlan& plan) {
  if (plan.active.empty()) return;
  const size_t rows = plan.pairs[0].size();
  std::vector<Profiles> descs;
  std::vector<std::pair<size_t, int64_t>> lengths;  // (desc, elements) per chunk
  for (size_t g = 0; g < plan.active.size(); g += kMaxProfiles) {
    const size_t end = std::min(plan.active.size(), g + kMaxProfiles);
    for (size_t r = 0; r < rows; ++r) {
      const Pair& first = plan.pairs[g][r];
      for (int64_t start = 0; start < first.numel; start += kChunk) {
        Profiles d{};
        d.p = static_cast<char*>(const_cast<void*>(first.b)) + start * first.size_b;
        d.size_p = first.size_b;
        for (size_t j = g; j < end; ++j) {
          const Pair& q = plan.pairs[j][r];
          const float w = plan.weights[j];
          const int k = d.count++;
          d.fn[k] = w == 1.0f ? ema_fused::Table<ema_fused::Copy>::get(q.code_a, q.code_b)
                              : ema_fused::Table<ema_fused::Update>::get(q.code_a, q.code_b);
          d.s[k] = static_cast<char*>(q.a) + start * q.size_a;
          d.size_of[k] = q.size_a;
          d.w[k] = w;  // 1.0f is the copy's scale
        }
        bool fuse = true;
        for (int k = 0; k < d.count; ++k) {
          fuse = fuse && d.w[k] != 1.0f && d.size_of[k] == d.size_of[0] &&
                 plan.pairs[g + k][r].code_a == plan.pairs[g][r].code_a;
        }
        for (int k = 0; fuse && k < d.count; k += kFused) {
          d.fused[k / kFused] = fused_get(plan.pairs[g][r].code_a, first.code_b,
                                          std::min(kFused, d.count - k));
        }
        d.size_s = d.size_of[0];
        descs.push_back(d);
        lengths.emplace_back(descs.size() - 1, std::min(kChunk, first.numel - start));
      }
    }
  }
  std::vector<Chunk> chunks;  // after `descs` stops growing: they point into it
  chunks.reserve(lengths.size());
  for (const auto& [d, n] : lengths) chunks.push_back({multi_range, &descs[d], nullptr, n});
  // run() returns once every chunk ran, so `descs` outlives every use of it
  ema_fused::run(std::move(chunks), 0.0f);
}

void kernel_multi_update_cpu(at::TensorList shadows, at::TensorList params,
                             c10::ArrayRef<double> weights) {
  const char* op = "kernel_multi_update_";
  const MultiPlan plan = ema_fused::check_multi(op, shadows, params, weights, at::Device(at::kCPU));
  static ema_fused::CheckedMultiSets checked;
  checked.check(op, shadows, params);
  run_plan(plan);
}

}  // namespace

TORCH_LIBRARY_IMPL(ema_fused, CPU, m) {
  m.impl("kernel_multi_update_", &kernel_multi_update_cpu);
}
