// The multi-shadow tile engine of the CUDA kernel_multi_update_: one table row per param
// with the shadows of up to kMaxProfiles profiles, one block per 4096-element tile, and
// per thread: load its param elements once, then update each profile's shadow elements
// from those registers.  Like multi_tensor.h it builds with both compilers: nvcc for the
// kernel (cuda_multi_shadow.cu), the host compiler for the tests' CPU emulation
// (tests/kernels/csrc/multi_shadow_emulation.cpp) and nvcc alone for the PTX checks.
//
// Napkin math: bf16 param + K fp32 shadows = 2 + 8K bytes per element in one launch,
// against 10K for K single updates: 18 vs 20 bytes for K = 2 (0.9), 34 vs 40 for K = 4
// (0.85).  At ~4.3 TB/s on an H200, K = 4 over a 1.1B-parameter model: 37 GB, ~8.7 ms.
//
// Every element goes through multi_tensor.h's apply<Kind::Update> (or apply<Kind::Copy>
// with scale 1 for weight 1, as run_block does), so each shadow gets the bits the
// single update kernel gives it.  Full tiles use vector accesses for every operand that
// starts on its vector grid (tiles start at multiples of kTile, so a tensor's alignment
// is its tiles'), element accesses in the same layout for one that does not; the last,
// partial tile is guarded.  No head: a misaligned tensor is rare (packed buffers), and
// with K shadows there is no one alignment to fix.
#pragma once

#include <cstdint>
#include <vector>

#include "multi_tensor.h"

#ifndef EMA_FUSED_MULTI_TRACE
#define EMA_FUSED_MULTI_TRACE(event) ((void)0)
#endif

namespace ema_fused {

// Profiles one pass updates (one launch; one CPU chunk); more run in groups of this
// many, each group reading the params once.
constexpr int kMaxProfiles = 8;
constexpr int kMultiHead = 3;  // row words before the shadows: param offset, numel, codes
// A stochastic update's rows add the param's counter words (position, start) after the
// head: its shadows then start at word kMultiHead + 2.
constexpr int kMultiCounters = 2;

// Per thread, for the emulation's counters: a tile entry read; the param's elements of a
// tile loaded as vectors / as elements / guarded; one profile's shadow elements of a tile
// as vectors / as elements / guarded; a profile of weight 1 (copied, shadow not read).
enum MultiTrace {
  kMTraceTable = 0, kMTraceParamVector, kMTraceParamScalar, kMTraceParamGuarded,
  kMTraceShadowVector, kMTraceShadowScalar, kMTraceShadowGuarded, kMTraceShadowCopy,
  kMTraceCount
};

struct MultiWeights {
  float w[kMaxProfiles];
};

// A stochastic launch's keys (profile j draws with seed k0[j] | k1[j] << 32) and offset.
struct MultiKeys {
  uint32_t k0[kMaxProfiles], k1[kMaxProfiles];
  uint32_t off_lo, off_hi;
};

inline bool on_vector_grid(const void* p, int size) {
  return reinterpret_cast<uintptr_t>(p) % (kVec * size) == 0;
}

// The codes word: bits 0-1 the param's dtype, bit 2 set when it is on its vector grid;
// profile j: bits 3j+3..3j+4 its shadow's dtype, bit 3j+5 its grid bit.
inline int64_t multi_codes(const std::vector<std::vector<Pair>>& pairs, size_t g, size_t end,
                           size_t r) {
  const Pair& first = pairs[g][r];
  int64_t code = first.code_b | (on_vector_grid(first.b, first.size_b) ? 4 : 0);
  for (size_t j = g; j < end; ++j) {
    const Pair& q = pairs[j][r];
    const int64_t c = q.code_a | (on_vector_grid(q.a, q.size_a) ? 4 : 0);
    code |= c << (3 * (j - g) + 3);
  }
  return code;
}

// Words of one row: the head, a stochastic update's counters, one word per profile.
EMA_HD int64_t multi_row_words(int profiles, bool stochastic) {
  return kMultiHead + (stochastic ? kMultiCounters : 0) + profiles;
}

// Words of the table for profiles [g, end) of `pairs` ([profile][row]): one row of
// multi_row_words per param, then one word per tile, (row << 32) | tile.
inline int64_t multi_table_size(const std::vector<std::vector<Pair>>& pairs, size_t g,
                                size_t end, bool stochastic = false) {
  int64_t words = 0;
  for (const Pair& p : pairs[g]) {
    words += multi_row_words(static_cast<int>(end - g), stochastic) + (p.numel + kTile - 1) / kTile;
  }
  return words;
}

// Addresses as byte offsets from the table (as fill_table does: nvcc then knows every
// access is global).  `out` is, or will be copied to, the table at `table`.  With
// `positions` and `starts` (the params', indexed like the caller's list) the rows of a
// stochastic update.
inline void fill_multi_table(const std::vector<std::vector<Pair>>& pairs, size_t g, size_t end,
                             int64_t* out, const void* table, const int64_t* positions = nullptr,
                             const int64_t* starts = nullptr) {
  const auto base = reinterpret_cast<uintptr_t>(table);
  const size_t rows = pairs[g].size();
  for (size_t r = 0; r < rows; ++r) {
    *out++ = static_cast<int64_t>(reinterpret_cast<uintptr_t>(pairs[g][r].b) - base);
    *out++ = pairs[g][r].numel;
    *out++ = multi_codes(pairs, g, end, r);
    if (positions != nullptr) {
      *out++ = positions[pairs[g][r].index];
      *out++ = starts[pairs[g][r].index];
    }
    for (size_t j = g; j < end; ++j) {
      *out++ = static_cast<int64_t>(reinterpret_cast<uintptr_t>(pairs[j][r].a) - base);
    }
  }
  for (size_t r = 0; r < rows; ++r) {
    const int64_t tiles = (pairs[g][r].numel + kTile - 1) / kTile;
    for (int64_t t = 0; t < tiles; ++t) *out++ = (static_cast<int64_t>(r) << 32) | t;
  }
}

// Weight j without indexing the parameter struct by a run-time index (that would copy it
// to local memory): a chain of selects.
EMA_HD float weight_of(const MultiWeights& ws, int j) {
  float w = ws.w[0];
#pragma unroll
  for (int q = 1; q < kMaxProfiles; ++q) w = j == q ? ws.w[q] : w;
  return w;
}

// Profile j's draws for a row at `position`, `start` (selects, as weight_of).
EMA_HD Stochastic stream_of(const MultiKeys& ks, int j, const int64_t* row) {
  uint32_t k0 = ks.k0[0], k1 = ks.k1[0];
#pragma unroll
  for (int q = 1; q < kMaxProfiles; ++q) {
    k0 = j == q ? ks.k0[q] : k0;
    k1 = j == q ? ks.k1[q] : k1;
  }
  return {{k0, k1, static_cast<uint32_t>(row[kMultiHead]), ks.off_lo, ks.off_hi},
          static_cast<uint64_t>(row[kMultiHead + 1])};
}

// Thread t's param elements of a full tile: kUnroll vectors of kVec, all loads issued
// before any use, in full_tile's layout (consecutive threads, consecutive vectors).
template <typename P, bool kVectorP>
EMA_HD void load_param(const P* __restrict__ p, int t, Vec<P> (&vp)[kUnroll]) {
  EMA_FUSED_MULTI_TRACE(kVectorP ? kMTraceParamVector : kMTraceParamScalar);
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = (int64_t(u) * kThreads + t) * kVec;
    if (kVectorP) {
      vp[u] = *reinterpret_cast<const Vec<P>*>(p + i);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) vp[u].v[k] = p[i + k];
    }
  }
}

// Shadow vectors in flight per profile and thread: all kUnroll for the nearest update; half
// for the stochastic one, whose draws need registers too (all four spilled 48 bytes in
// its kernel at the 64-register cap, sm_90; the param's 16 fp32 registers stay live
// across the profiles).
template <typename R>
constexpr int kShadowBatch = kUnroll;
template <>
constexpr int kShadowBatch<Stochastic> = kUnroll / 2;

// One profile's shadow elements of a full tile, from the param registers.  K: Update, or
// Copy with scale 1 (weight 1: the shadow is not read).  `round` as in full_tile.
template <Kind K, typename S, bool kVectorS, typename P, typename R = Nearest>
EMA_HD void shadow_full(S* __restrict__ s, const Vec<P> (&vp)[kUnroll], int t, float w,
                        const R& round = R(), int64_t first = 0) {
  EMA_FUSED_MULTI_TRACE(kVectorS ? kMTraceShadowVector : kMTraceShadowScalar);
  constexpr int kBatch = kShadowBatch<R>;
#pragma unroll
  for (int h = 0; h < kUnroll; h += kBatch) {
    Vec<S> vs[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t i = (int64_t(h + u) * kThreads + t) * kVec;
      if (kReadsA<K>) {
        if (kVectorS) {
          vs[u] = *reinterpret_cast<const Vec<S>*>(s + i);
        } else {
#pragma unroll
          for (int k = 0; k < kVec; ++k) vs[u].v[k] = s[i + k];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      Vec<P> y = vp[h + u];
      round.template vec<K>(vs[u], y, w, first + (int64_t(h + u) * kThreads + t) * kVec);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t i = (int64_t(h + u) * kThreads + t) * kVec;
      if (kVectorS) {
        *reinterpret_cast<Vec<S>*>(s + i) = vs[u];
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) s[i + k] = vs[u].v[k];
      }
    }
  }
}

// The ends as run_block has them: 0 changes nothing, 1 copies (scale 1), else the lerp
// (rounded as `round` says; the copy is exact).
template <typename S, typename P, typename R = Nearest>
EMA_HD void shadow_full_any(S* s, bool vector_s, const Vec<P> (&vp)[kUnroll], int t, float w,
                            const R& round = R(), int64_t first = 0) {
  if (w == 0.0f) return;
  if (w == 1.0f) EMA_FUSED_MULTI_TRACE(kMTraceShadowCopy);
  if (w == 1.0f && vector_s) return shadow_full<Kind::Copy, S, true>(s, vp, t, 1.0f);
  if (w == 1.0f) return shadow_full<Kind::Copy, S, false>(s, vp, t, 1.0f);
  if (vector_s) return shadow_full<Kind::Update, S, true>(s, vp, t, w, round, first);
  shadow_full<Kind::Update, S, false>(s, vp, t, w, round, first);
}

// One batch of kVec guarded elements (h .. h + kVec - 1 of thread t, element
// j * kThreads + t as partial_tile has them) of one profile's shadow.
template <typename S, typename P, typename R = Nearest>
EMA_HD void shadow_batch(S* __restrict__ s, const P (&xp)[kVec], int h, int64_t len, int t,
                         float w, const R& round = R(), int64_t first = 0) {
  if (w == 0.0f) return;
  S xs[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int64_t i = int64_t(h + j) * kThreads + t;
    if (i < len && w != 1.0f) xs[j] = s[i];
  }
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int64_t i = int64_t(h + j) * kThreads + t;
    if (i < len) {
      P y = xp[j];
      if (w == 1.0f) {
        apply<Kind::Copy>(xs[j], y, 1.0f);
      } else {
        round.template one<Kind::Update>(xs[j], y, w, first + i);
      }
      s[i] = xs[j];
    }
  }
}

// Profile j's shadow pointer (of dtype code `c`) at element `start`, to `f(S*)`.
template <typename F>
EMA_HD void with_shadow(char* at, int64_t c, int64_t start, F&& f) {
  switch (c & 3) {
    case kFloat: return f(reinterpret_cast<float*>(at) + start);
    case kBFloat16: return f(reinterpret_cast<c10::BFloat16*>(at) + start);
    case kHalf: return f(reinterpret_cast<c10::Half*>(at) + start);
    default: return;
  }
}

// Profile j's part of a tile: `f(s)` with the shadow pointer `s` at element `start`, and
// the rounding of a nearest (`round` unused) or a stochastic update (profile j's stream:
// 16-bit shadows only, as the op checks).
template <bool kStochastic, typename F>
EMA_HD void with_profile(char* base, const int64_t* row, int j, int64_t c, int64_t start,
                         const MultiKeys& ks, F&& f) {
  constexpr int kFirst = kMultiHead + (kStochastic ? kMultiCounters : 0);
  with_shadow(base + row[kFirst + j], c, start, [&](auto* s) {
    if constexpr (!kStochastic) {
      f(s, Nearest());
    } else if constexpr (!std::is_same<std::remove_pointer_t<decltype(s)>, float>::value) {
      f(s, stream_of(ks, j, row));
    }
  });
}

// Thread t's share of tile `tile` of a row whose param has dtype P.
template <typename P, bool kStochastic = false>
EMA_HD void multi_row_tile(char* base, const int64_t* row, int n_profiles, int64_t tile, int t,
                           const MultiWeights& ws, const MultiKeys& ks) {
  const P* p = reinterpret_cast<const P*>(base + row[0]);
  const int64_t n = row[1], code = row[2];
  const int64_t start = tile * kTile;
  const int64_t len = n - start < kTile ? n - start : kTile;
  if (len == kTile) {
    Vec<P> vp[kUnroll];
    if (code & 4) {
      load_param<P, true>(p + start, t, vp);
    } else {
      load_param<P, false>(p + start, t, vp);
    }
#pragma unroll 1
    for (int j = 0; j < n_profiles; ++j) {
      const int64_t c = code >> (3 * j + 3);
      const float w = weight_of(ws, j);
      with_profile<kStochastic>(base, row, j, c, start, ks, [&](auto* s, const auto& round) {
        shadow_full_any(s, (c & 4) != 0, vp, t, w, round, start);
      });
    }
    return;
  }
  if (len <= 0) return;
  EMA_FUSED_MULTI_TRACE(kMTraceParamGuarded);
#pragma unroll 1
  for (int h = 0; h < kPerThread; h += kVec) {
    P xp[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t i = int64_t(h + j) * kThreads + t;
      if (i < len) xp[j] = p[start + i];
    }
#pragma unroll 1
    for (int j = 0; j < n_profiles; ++j) {
      const int64_t c = code >> (3 * j + 3);
      const float w = weight_of(ws, j);
      if (h == 0 && w != 0.0f) EMA_FUSED_MULTI_TRACE(kMTraceShadowGuarded);
      if (h == 0 && w == 1.0f) EMA_FUSED_MULTI_TRACE(kMTraceShadowCopy);
      with_profile<kStochastic>(base, row, j, c, start, ks, [&](auto* s, const auto& round) {
        shadow_batch(s, xp, h, len, t, w, round, start);
      });
    }
  }
}

// What one block does: tile entry e of a table of n_rows rows for n_profiles profiles
// (kStochastic: a stochastic update's table and keys).
template <bool kStochastic = false>
EMA_HD void run_multi_block(const int64_t* table, int64_t n_rows, int n_profiles, int64_t e,
                            int t, const MultiWeights& ws, const MultiKeys& ks = MultiKeys{}) {
  EMA_FUSED_MULTI_TRACE(kMTraceTable);
  char* base = const_cast<char*>(reinterpret_cast<const char*>(table));
  const int64_t words = multi_row_words(n_profiles, kStochastic);
  const int64_t entry = table[n_rows * words + e];
  const int64_t* row = table + (entry >> 32) * words;
  const int64_t tile = entry & 0xffffffffLL;
  switch (row[2] & 3) {
    case kFloat: return multi_row_tile<float, kStochastic>(base, row, n_profiles, tile, t, ws, ks);
    case kBFloat16:
      return multi_row_tile<c10::BFloat16, kStochastic>(base, row, n_profiles, tile, t, ws, ks);
    case kHalf: return multi_row_tile<c10::Half, kStochastic>(base, row, n_profiles, tile, t, ws, ks);
    default: return;
  }
}

#if defined(__CUDACC__)
__global__ void __launch_bounds__(kThreads, 4)
    multi_tiles_kernel(const int64_t* __restrict__ table, int64_t n_rows, int n_profiles,
                       MultiWeights ws) {
  run_multi_block(table, n_rows, n_profiles, blockIdx.x, threadIdx.x, ws);
}

__global__ void __launch_bounds__(kThreads, 4)
    multi_stochastic_tiles_kernel(const int64_t* __restrict__ table, int64_t n_rows,
                                  int n_profiles, MultiWeights ws, MultiKeys ks) {
  run_multi_block<true>(table, n_rows, n_profiles, blockIdx.x, threadIdx.x, ws, ks);
}
#endif

}  // namespace ema_fused
