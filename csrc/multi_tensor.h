// The multi-tensor tile engine of the CUDA kernels: table layout, the kernel, and the
// work of one thread on one tile.  Written for both compilers: nvcc builds it into the
// kernels (cuda_kernels.cu); the host compiler builds the same code for a CPU emulation
// that the tests run on machines without a GPU (tests/kernels/csrc/cuda_emulation.cpp), so the
// table, the tile decoding, the dtype dispatch, the weight's exact ends and every
// access path are checked everywhere.
//
// Napkin math (the bound): update, bf16 param + fp32 shadow = 2 + 4 + 4 = 10 bytes
// per element; fp32 + fp32 = 12; copy-out reads the source and writes the
// destination only (the destination is not read); swap reads and writes both;
// accumulate (a weighted sum) reads both and writes `a`: fp32 out + bf16 input = 10.
// At ~4.3 TB/s of H200 copy bandwidth a 1.1B-parameter bf16 model moves 11 GB, so
// about 2.6 ms is the floor.
//
// Why device tables (not PyTorch's/apex's by-value kernel arguments): those carry
// at most 64 tensors / 320 blocks per launch at depth 2, so a 500-tensor model needs
// several launches.  Here every tensor of a device is one row of a table in device
// memory and every tile one int64 entry, so one launch covers any number of tensors.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "stochastic.h"

#if defined(__CUDACC__)
#define EMA_HD __host__ __device__ __forceinline__
#else
#define EMA_HD inline
#endif

// The emulation defines this to count what each thread did (kTrace* below); the
// kernels compile it away.
#ifndef EMA_FUSED_TRACE
#define EMA_FUSED_TRACE(event) ((void)0)
#endif

namespace ema_fused {

constexpr int kThreads = 256;  // threads per block; one block per tile
constexpr int kVec = 4;        // elements per vector access (16 bytes of fp32)
constexpr int kUnroll = 4;     // vector accesses in flight per thread and operand
constexpr int kPerThread = kVec * kUnroll;                 // 16 elements
constexpr int64_t kTile = int64_t(kThreads) * kPerThread;  // 4096 elements
constexpr int kRow = 4;        // int64 words per tensor row: a, b, numel, code
// A stochastic update's rows add the counter words of their pair: position, start
// (stochastic.h; the index in its tensor of the pair's element 0).
constexpr int kRowStochastic = 6;

// UpdateFinite / CopyFinite: Update / Copy that leave an element of `a` as it was where
// its `b` element is NaN or +-Inf (skip_nonfinite), decided per element in registers.
// Accumulate: a += s * b (the weighted sum), a float32.
enum class Kind { Update, Copy, Swap, UpdateFinite, CopyFinite, Accumulate };

// What a thread did, for the emulation's counters: read a tile entry; ran a full tile
// with vector accesses to both sides / vector `a` and scalar `b`; ran a partial tile
// (guarded); ran one head element.
enum Trace { kTraceTable = 0, kTraceFullVector, kTraceFullScalarB, kTraceGuarded, kTraceHead };

// A row's code word: bits 0-3 the dtype pair (a + 3 * b), bits 4-5 the head (elements
// before `a`'s first vector-aligned one, run one per thread), bit 8 set when `b` is
// vector-aligned after that head too (both sides start equally misaligned).
constexpr int kFloat = 0, kBFloat16 = 1, kHalf = 2;
constexpr int kHeadShift = 4, kVectorBBit = 8;

// One pair as the table sees it.  Addresses are multiples of the element size
// (pairs.h checks), so a head of at most kVec - 1 elements aligns `a`.
struct Pair {
  void* a;
  const void* b;
  int64_t numel;
  int code_a, code_b;
  int size_a, size_b;  // bytes per element
  int64_t index;       // position in the caller's lists, for messages
};

inline int64_t head_of(const Pair& p) {
  const uintptr_t misplaced = reinterpret_cast<uintptr_t>(p.a) % (kVec * p.size_a) / p.size_a;
  return misplaced == 0 ? 0 : kVec - static_cast<int64_t>(misplaced);
}

inline bool b_vector_after_head(const Pair& p) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(p.b) + head_of(p) * p.size_b;
  return first % (kVec * p.size_b) == 0;
}

inline int64_t row_code(const Pair& p) {
  return p.code_a + 3 * p.code_b + (head_of(p) << kHeadShift) +
         (b_vector_after_head(p) ? int64_t(1) << kVectorBBit : 0);
}

// Tiles of a non-empty row: its elements after the head, kTile at a time; at least one
// (the head rides on tile 0).
inline int64_t tiles_of(const Pair& p) {
  const int64_t rest = p.numel - head_of(p);
  return rest <= 0 ? 1 : (rest + kTile - 1) / kTile;
}

// Table words for these pairs: n rows of `row` words, then one word per tile,
// (row << 32) | tile.
inline int64_t table_size(const std::vector<Pair>& pairs, int row = kRow) {
  int64_t n_tiles = 0;
  for (const Pair& p : pairs) n_tiles += tiles_of(p);
  return static_cast<int64_t>(pairs.size()) * row + n_tiles;
}

// Writes the table_size(pairs) words into `out`, which is (or will be copied to) the
// table at address `table`.  Rows hold the tensors' addresses as byte offsets from the
// table: the kernel adds them to its table parameter, so nvcc knows every access is to
// global memory and emits LDG/STG (an address loaded from memory would be generic).
// With `positions` and `starts` (a stochastic update's, indexed like the caller's
// lists), rows of kRowStochastic words: table_size(pairs, kRowStochastic).
inline void fill_table(const std::vector<Pair>& pairs, int64_t* out, const void* table,
                       const int64_t* positions = nullptr, const int64_t* starts = nullptr) {
  const auto base = reinterpret_cast<uintptr_t>(table);
  for (const Pair& p : pairs) {
    *out++ = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.a) - base);
    *out++ = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.b) - base);
    *out++ = p.numel;
    *out++ = row_code(p);
    if (positions != nullptr) {
      *out++ = positions[p.index];
      *out++ = starts[p.index];
    }
  }
  for (size_t r = 0; r < pairs.size(); ++r) {
    for (int64_t t = 0; t < tiles_of(pairs[r]); ++t) *out++ = (static_cast<int64_t>(r) << 32) | t;
  }
}

template <typename T>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

// One element: Update a += s * (b - a); Copy a = b * s; Swap a <-> b; Accumulate
// a += s * b (a weighted sum, `a` float32 only: run_tile dispatches no other).  fp32 math,
// rounded once into the destination's dtype (c10's conversions round to nearest even).
// The update is the two-sided lerp of torch.lerp and the CPU kernels: for s >= 0.5 it
// is b - (1 - s) * (b - a), where 1 - s is exact.  s = 0 and s = 1 never get here
// (run_block skips the first and copies for the second, exactly).
// Whether f is neither NaN nor +-Inf: a test of the exponent bits, which no compiler
// flag (fast math) can fold away.
EMA_HD bool is_finite_value(float f) {
#if defined(__CUDA_ARCH__)
  const uint32_t u = __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
#endif
  return (u & 0x7fffffffu) < 0x7f800000u;
}

template <Kind K, typename A, typename B>
EMA_HD void apply(A& a, B& b, float s) {
  if constexpr (K == Kind::Update || K == Kind::UpdateFinite) {
    const float x = static_cast<float>(a), y = static_cast<float>(b);
    const A r = static_cast<A>(s < 0.5f ? x + s * (y - x) : y - (1.0f - s) * (y - x));
    if constexpr (K == Kind::Update) {
      a = r;
    } else {
      a = is_finite_value(y) ? r : a;
    }
  } else if constexpr (K == Kind::Copy) {
    a = static_cast<A>(static_cast<float>(b) * s);
  } else if constexpr (K == Kind::CopyFinite) {  // weight 1 of UpdateFinite: no scale
    const float y = static_cast<float>(b);
    a = is_finite_value(y) ? static_cast<A>(y) : a;
  } else if constexpr (K == Kind::Accumulate) {
    a = static_cast<A>(static_cast<float>(a) + s * static_cast<float>(b));
  } else {
    const A t = a;
    a = b;
    b = t;
  }
}

template <Kind K>
constexpr bool kReadsA = K != Kind::Copy;  // copy-out never reads its destination
template <Kind K>
constexpr bool kWritesB = K == Kind::Swap;

// The stochastic update of one 16-bit shadow element (stochastic.h): the fp32 result
// without FMA, rounded with the element's 16 random bits `r`.  Update and UpdateFinite
// only (their ends, weight 0 and 1, never get here: run_block_stochastic).
template <Kind K, typename A, typename B>
EMA_HD void apply_stochastic(A& a, const B& b, float s, uint32_t r) {
  static_assert(K == Kind::Update || K == Kind::UpdateFinite, "an update only");
  const float y = static_cast<float>(b);
  const float x = sr::lerp_unfused(static_cast<float>(a), y, s);
  uint16_t bits;
  if constexpr (std::is_same<A, c10::BFloat16>::value) {
    bits = sr::round_bf16(x, r);
  } else {
    static_assert(std::is_same<A, c10::Half>::value, "a 16-bit shadow only");
    bits = sr::round_f16(x, r);
  }
  const A out(bits, A::from_bits());
  if constexpr (K == Kind::Update) {
    a = out;
  } else {
    a = is_finite_value(y) ? out : a;
  }
}

// How elements are rounded into the first tensor, as a policy of the tile code: Nearest
// is apply<K> (the index is unused, and compiled away); Stochastic draws each element's
// bits from its index in its tensor (`base` + the index in the row).  A vector of kVec
// elements takes one draw (two where it straddles a group of 8: a misaligned tensor).
struct Nearest {
  template <Kind K, typename A, typename B>
  EMA_HD void one(A& a, B& b, float s, int64_t) const { apply<K>(a, b, s); }
  template <Kind K, typename A, typename B>
  EMA_HD void vec(Vec<A>& a, Vec<B>& b, float s, int64_t) const {
#pragma unroll
    for (int k = 0; k < kVec; ++k) apply<K>(a.v[k], b.v[k], s);
  }
};

struct Stochastic {
  sr::Stream st;
  uint64_t base;  // the row's start: the index in its tensor of the pair's element 0
  template <Kind K, typename A, typename B>
  EMA_HD void one(A& a, B& b, float s, int64_t i) const {
    const uint64_t e = base + static_cast<uint64_t>(i);
    apply_stochastic<K>(a, b, s, sr::bits16(sr::draw(st, e >> 3), uint32_t(e) & 7u));
  }
  template <Kind K, typename A, typename B>
  EMA_HD void vec(Vec<A>& a, Vec<B>& b, float s, int64_t i) const {
    const uint64_t e = base + static_cast<uint64_t>(i);
    const uint32_t lane = uint32_t(e) & 7u;
    const sr::Draw d = sr::draw(st, e >> 3);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (lane + k < 8u) apply_stochastic<K>(a.v[k], b.v[k], s, sr::bits16(d, lane + k));
    }
    if (lane > 8u - kVec) {  // the vector straddles two groups (a misaligned tensor only):
      const sr::Draw next = sr::draw(st, (e >> 3) + 1);  // drawn once `d` is dead
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        if (lane + k >= 8u) apply_stochastic<K>(a.v[k], b.v[k], s, sr::bits16(next, lane + k - 8u));
      }
    }
  }
};

// A full tile of kTile elements from a (vector-aligned) and b.  Each thread issues all
// its loads before any math, kUnroll 16-byte (fp32) vector loads per operand, so several
// are in flight; consecutive threads touch consecutive vectors, so each warp access is
// coalesced.  A b that cannot be vector-aligned together with a (the two start at
// different offsets) is read and written as the same kVec elements one by one: a is
// 8 of the 10 bytes of a bf16 -> fp32 update, and the L1 serves b's repeated lines.
template <Kind K, bool kVectorB, typename A, typename B, typename R = Nearest>
EMA_HD void full_tile(A* __restrict__ a, B* __restrict__ b, int t, float s, const R& round = R(),
                      int64_t first = 0) {
  EMA_FUSED_TRACE(kVectorB ? kTraceFullVector : kTraceFullScalarB);
  Vec<A> va[kUnroll];
  Vec<B> vb[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = (int64_t(u) * kThreads + t) * kVec;
    if (kReadsA<K>) va[u] = *reinterpret_cast<const Vec<A>*>(a + i);
    if (kVectorB) {
      vb[u] = *reinterpret_cast<const Vec<B>*>(b + i);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) vb[u].v[k] = b[i + k];
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    round.template vec<K>(va[u], vb[u], s, first + (int64_t(u) * kThreads + t) * kVec);
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = (int64_t(u) * kThreads + t) * kVec;
    *reinterpret_cast<Vec<A>*>(a + i) = va[u];
    if (kWritesB<K>) {
      if (kVectorB) {
        *reinterpret_cast<Vec<B>*>(b + i) = vb[u];
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) b[i + k] = vb[u].v[k];
      }
    }
  }
}

// The last, partial tile of a tensor (len < kTile): guarded scalar accesses, unrolled,
// element j * kThreads + t, so each access is coalesced.  Batches of 4 elements, each
// with every load before any store: larger batches spilled registers at the 64-register
// cap of __launch_bounds__(256, 4) (ptxas -v, sm_90: all 16 at once, 60-68 bytes in the
// update and copy kernels; batches of 8, 68 bytes in the update kernel; batches of 4:
// none, 48 registers).  Partial tiles are at most one per tensor.
template <Kind K, typename A, typename B, typename R = Nearest>
EMA_HD void partial_tile(A* __restrict__ a, B* __restrict__ b, int64_t len, int t, float s,
                         const R& round = R(), int64_t first = 0) {
  EMA_FUSED_TRACE(kTraceGuarded);
  constexpr int kBatch = kVec;
#pragma unroll
  for (int h = 0; h < kPerThread; h += kBatch) {
    A xa[kBatch];
    B xb[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int64_t i = int64_t(h + j) * kThreads + t;
      if (i < len) {
        if (kReadsA<K>) xa[j] = a[i];
        xb[j] = b[i];
      }
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int64_t i = int64_t(h + j) * kThreads + t;
      if (i < len) {
        round.template one<K>(xa[j], xb[j], s, first + i);
        a[i] = xa[j];
        if (kWritesB<K>) b[i] = xb[j];
      }
    }
  }
}

// Thread t's share of tile `tile` of one row: on tile 0, threads below the head take
// one head element each; then the tile's kTile elements after the head.  `round` gets
// each element's index in the row.
template <Kind K, typename A, typename B, typename R = Nearest>
EMA_HD void row_tile(char* base, int64_t a_offset, int64_t b_offset, int64_t n, int64_t head,
                     int64_t tile, bool vector_b, int t, float s, const R& round = R()) {
  A* a = reinterpret_cast<A*>(base + a_offset);
  B* b = reinterpret_cast<B*>(base + b_offset);
  if (tile == 0 && t < head && t < n) {
    EMA_FUSED_TRACE(kTraceHead);
    A x{};
    if (kReadsA<K>) x = a[t];
    B y = b[t];
    round.template one<K>(x, y, s, t);
    a[t] = x;
    if (kWritesB<K>) b[t] = y;
  }
  const int64_t start = head + tile * kTile;
  const int64_t len = n - start < kTile ? n - start : kTile;
  if (len == kTile && vector_b) {
    full_tile<K, true>(a + start, b + start, t, s, round, start);
  } else if (len == kTile) {
    full_tile<K, false>(a + start, b + start, t, s, round, start);
  } else if (len > 0) {
    partial_tile<K>(a + start, b + start, len, t, s, round, start);
  }
}

// What a stochastic launch passes: the key (seed) and the offset words of stochastic.h's
// counter; each row adds its position and start.
struct RandomKey {
  uint32_t k0, k1, off_lo, off_hi;
};

// Thread t's share of tile entry e of a table with n_rows rows.  Tensor addresses are
// offsets from the table (fill_table); the table is never written.  kStochastic: a
// stochastic update's table (rows of kRowStochastic words); its updates round with the
// Stochastic policy (16-bit shadows only: the op refuses others), its copies (weight 1)
// as the nearest path.
template <Kind K, bool kStochastic = false>
EMA_HD void run_tile(const int64_t* table, int64_t n_rows, int64_t e, int t, float s,
                     const RandomKey& key = RandomKey{}) {
  EMA_FUSED_TRACE(kTraceTable);
  constexpr int kWords = kStochastic ? kRowStochastic : kRow;
  char* base = const_cast<char*>(reinterpret_cast<const char*>(table));
  const int64_t entry = table[n_rows * kWords + e];
  const int64_t* row = table + (entry >> 32) * kWords;
  const int64_t tile = entry & 0xffffffffLL;
  const int64_t code = row[3];
  const int64_t head = (code >> kHeadShift) & 3;
  const bool vb = (code >> kVectorBBit) & 1;
  const int64_t a = row[0], b = row[1], n = row[2];
  using f32 = float;
  using bf16 = c10::BFloat16;
  using f16 = c10::Half;
  if constexpr (kStochastic && (K == Kind::Update || K == Kind::UpdateFinite)) {
    const Stochastic r{{key.k0, key.k1, static_cast<uint32_t>(row[4]), key.off_lo, key.off_hi},
                       static_cast<uint64_t>(row[5])};
    switch (code & 15) {
      case 1: return row_tile<K, bf16, f32>(base, a, b, n, head, tile, vb, t, s, r);
      case 2: return row_tile<K, f16, f32>(base, a, b, n, head, tile, vb, t, s, r);
      case 4: return row_tile<K, bf16, bf16>(base, a, b, n, head, tile, vb, t, s, r);
      case 5: return row_tile<K, f16, bf16>(base, a, b, n, head, tile, vb, t, s, r);
      case 7: return row_tile<K, bf16, f16>(base, a, b, n, head, tile, vb, t, s, r);
      case 8: return row_tile<K, f16, f16>(base, a, b, n, head, tile, vb, t, s, r);
      default: return;
    }
  } else if constexpr (K == Kind::Accumulate) {  // float32 out only (pairs.h): codes 0, 3, 6
    switch (code & 15) {
      case 0: return row_tile<K, f32, f32>(base, a, b, n, head, tile, vb, t, s);
      case 3: return row_tile<K, f32, bf16>(base, a, b, n, head, tile, vb, t, s);
      case 6: return row_tile<K, f32, f16>(base, a, b, n, head, tile, vb, t, s);
      default: return;
    }
  } else if constexpr (K == Kind::Swap) {  // equal dtypes only (codes 0, 4, 8): move raw bits
    if ((code & 15) == 0) return row_tile<K, uint32_t, uint32_t>(base, a, b, n, head, tile, vb, t, s);
    return row_tile<K, uint16_t, uint16_t>(base, a, b, n, head, tile, vb, t, s);
  } else {
    switch (code & 15) {
      case 0: return row_tile<K, f32, f32>(base, a, b, n, head, tile, vb, t, s);
      case 1: return row_tile<K, bf16, f32>(base, a, b, n, head, tile, vb, t, s);
      case 2: return row_tile<K, f16, f32>(base, a, b, n, head, tile, vb, t, s);
      case 3: return row_tile<K, f32, bf16>(base, a, b, n, head, tile, vb, t, s);
      case 4: return row_tile<K, bf16, bf16>(base, a, b, n, head, tile, vb, t, s);
      case 5: return row_tile<K, f16, bf16>(base, a, b, n, head, tile, vb, t, s);
      case 6: return row_tile<K, f32, f16>(base, a, b, n, head, tile, vb, t, s);
      case 7: return row_tile<K, bf16, f16>(base, a, b, n, head, tile, vb, t, s);
      case 8: return row_tile<K, f16, f16>(base, a, b, n, head, tile, vb, t, s);
      default: return;
    }
  }
}

// What one block does.  The scalar comes from `scalar_ptr` when it is set (graph-safe
// calls read the weight at run time, not at launch).  An update with weight 0 changes
// nothing, so it returns before touching the table or any tensor (an Inf param must not
// turn its shadow into NaN, and a step skipped by update_every must not stream the
// model); weight 1 is a copy, which is exact and never reads the shadow (with
// skip_nonfinite it reads it, to keep the elements whose param is not finite).
template <Kind K>
EMA_HD void run_block(const int64_t* table, int64_t n_rows, int64_t e, int t, float scalar,
                      const float* scalar_ptr) {
  const float s = scalar_ptr != nullptr ? *scalar_ptr : scalar;
  if constexpr (K == Kind::Update || K == Kind::UpdateFinite) {
    constexpr Kind kCopy = K == Kind::Update ? Kind::Copy : Kind::CopyFinite;
    if (s == 0.0f) return;
    if (s == 1.0f) return run_tile<kCopy>(table, n_rows, e, t, 1.0f);
  }
  if constexpr (K == Kind::Accumulate) {
    if (s == 0.0f) return;  // adds nothing: nothing is read (an Inf input adds no NaN)
  }
  run_tile<K>(table, n_rows, e, t, s);
}

// A stochastic update's block (Update or UpdateFinite, a table of kRowStochastic-word
// rows): the ends as run_block has them (0: nothing, 1: the exact copy), else the
// update rounded stochastically.
template <Kind K>
EMA_HD void run_block_stochastic(const int64_t* table, int64_t n_rows, int64_t e, int t, float s,
                                 const RandomKey& key) {
  constexpr Kind kCopy = K == Kind::Update ? Kind::Copy : Kind::CopyFinite;
  if (s == 0.0f) return;
  if (s == 1.0f) return run_tile<kCopy, true>(table, n_rows, e, t, 1.0f);
  run_tile<K, true>(table, n_rows, e, t, s, key);
}

#if defined(__CUDACC__)
template <Kind K>
__global__ void __launch_bounds__(kThreads, 4)
    tiles_kernel(const int64_t* __restrict__ table, int64_t n_rows, float scalar,
                 const float* __restrict__ scalar_ptr) {
  run_block<K>(table, n_rows, blockIdx.x, threadIdx.x, scalar, scalar_ptr);
}

template <Kind K>
__global__ void __launch_bounds__(kThreads, 4)
    stochastic_tiles_kernel(const int64_t* __restrict__ table, int64_t n_rows, float scalar,
                            RandomKey key) {
  run_block_stochastic<K>(table, n_rows, blockIdx.x, threadIdx.x, scalar, key);
}
#endif

}  // namespace ema_fused
