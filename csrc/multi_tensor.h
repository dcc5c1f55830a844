// The multi-tensor tile engine of the CUDA kernels: table layout and the work of one
// thread on one tile.  Written for both compilers: nvcc builds it into the kernels
// (cuda_kernels.cu); the host compiler builds the same code for a CPU emulation that
// the tests run on machines without a GPU (tests/cuda_emulation.cpp), so the table,
// the tile decoding, the dtype dispatch and the vector path are checked everywhere.
//
// Napkin math (the bound): update, bf16 param + fp32 shadow = 2 + 4 + 4 = 10 bytes
// per element; fp32 + fp32 = 12; copy-out reads the source and writes the
// destination only (the destination is not read); swap reads and writes both.
// At ~3.0 TB/s of H100 copy bandwidth a 1.1B-parameter bf16 model moves 11 GB, so
// about 3.7 ms is the floor.
//
// Why device tables (not PyTorch's/apex's by-value kernel arguments): those carry
// at most 64 tensors / 320 blocks per launch at depth 2, so a 500-tensor model needs
// several launches.  Here every tensor of a device is one row of a table in device
// memory and every tile one int64 entry, so one launch covers any number of tensors.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define EMA_HD __host__ __device__ __forceinline__
#else
#define EMA_HD inline
#endif

namespace ema_fused {

constexpr int kThreads = 256;  // threads per block; one block per tile
constexpr int kVec = 4;        // elements per vector access (16 bytes of fp32)
constexpr int kUnroll = 4;     // vector accesses in flight per thread and operand
constexpr int64_t kTile = int64_t(kThreads) * kVec * kUnroll;  // 4096 elements
constexpr int kRow = 4;        // int64 words per tensor row: a, b, numel, code

enum class Kind { Update, Copy, Swap };

// dtype codes in a row's code word: a + 3 * b, plus kAligned when both base
// addresses allow vector accesses (tile starts are multiples of kTile elements, so
// the base decides for every full tile).
constexpr int kFloat = 0, kBFloat16 = 1, kHalf = 2, kAligned = 9;

// One pair as the table sees it.
struct Pair {
  void* a;
  const void* b;
  int64_t numel;
  int code_a, code_b;
  int size_a, size_b;  // bytes per element
};

inline bool vector_aligned(const Pair& p) {
  return reinterpret_cast<uintptr_t>(p.a) % (kVec * p.size_a) == 0 &&
         reinterpret_cast<uintptr_t>(p.b) % (kVec * p.size_b) == 0;
}

inline int64_t tiles_of(int64_t numel) { return (numel + kTile - 1) / kTile; }

// Table words for these pairs: n rows of kRow words, then one word per tile,
// (row << 32) | tile.  Empty tensors get a row but no tile.
inline std::vector<int64_t> table_words(const std::vector<Pair>& pairs) {
  std::vector<int64_t> words;
  int64_t n_tiles = 0;
  for (const Pair& p : pairs) n_tiles += tiles_of(p.numel);
  words.reserve(pairs.size() * kRow + n_tiles);
  for (const Pair& p : pairs) {
    words.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.a)));
    words.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.b)));
    words.push_back(p.numel);
    words.push_back(p.code_a + 3 * p.code_b + (vector_aligned(p) ? kAligned : 0));
  }
  for (size_t r = 0; r < pairs.size(); ++r) {
    for (int64_t t = 0; t < tiles_of(pairs[r].numel); ++t) {
      words.push_back((static_cast<int64_t>(r) << 32) | t);
    }
  }
  return words;
}

template <typename T>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

// One element: Update a += w * (b - a); Copy a = b * s; Swap a <-> b.  fp32 math,
// rounded once into the destination's dtype (c10's conversions round to nearest even).
template <Kind K, typename A, typename B>
EMA_HD void apply(A& a, B& b, float s) {
  if constexpr (K == Kind::Update) {
    const float x = static_cast<float>(a);
    a = static_cast<A>(x + s * (static_cast<float>(b) - x));
  } else if constexpr (K == Kind::Copy) {
    a = static_cast<A>(static_cast<float>(b) * s);
  } else {
    const A t = a;
    a = b;
    b = t;
  }
}

// Thread t's share of one tile of len elements starting at a and b.  Full aligned
// tiles: kUnroll 16-byte (fp32) vector loads per operand issued before any math, so
// each thread keeps several loads in flight; consecutive threads touch consecutive
// vectors, so each warp access is coalesced.  Otherwise: a guarded scalar loop.
template <Kind K, typename A, typename B>
EMA_HD void tile_typed(A* a, B* b, int64_t len, bool vec, int t, float s) {
  constexpr bool kReadA = K != Kind::Copy;  // copy-out never reads its destination
  constexpr bool kWriteB = K == Kind::Swap;
  if (vec && len == kTile) {
    Vec<A> va[kUnroll];
    Vec<B> vb[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = (int64_t(u) * kThreads + t) * kVec;
      if (kReadA) va[u] = *reinterpret_cast<const Vec<A>*>(a + i);
      vb[u] = *reinterpret_cast<const Vec<B>*>(b + i);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) apply<K>(va[u].v[k], vb[u].v[k], s);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = (int64_t(u) * kThreads + t) * kVec;
      *reinterpret_cast<Vec<A>*>(a + i) = va[u];
      if (kWriteB) *reinterpret_cast<Vec<B>*>(b + i) = vb[u];
    }
    return;
  }
  for (int64_t i = t; i < len; i += kThreads) {
    A x;
    if (kReadA) x = a[i];
    B y = b[i];
    apply<K>(x, y, s);
    a[i] = x;
    if (kWriteB) b[i] = y;
  }
}

template <Kind K, typename A, typename B>
EMA_HD void tile_at(int64_t a, int64_t b, int64_t start, int64_t len, bool vec, int t, float s) {
  A* pa = reinterpret_cast<A*>(a) + start;
  B* pb = reinterpret_cast<B*>(b) + start;
#if defined(__CUDA_ARCH__)
  // Addresses read from the table are generic pointers to nvcc; saying they are global
  // lets it emit LDG/STG (vector and read-only forms) instead of generic LD/ST.
  __builtin_assume(__isGlobal(pa) && __isGlobal(pb));
#endif
  tile_typed<K>(pa, pb, len, vec, t, s);
}

// Thread t's share of tile entry e of a table with n_rows rows.
template <Kind K>
EMA_HD void run_tile(const int64_t* table, int64_t n_rows, int64_t e, int t, float s) {
  const int64_t entry = table[n_rows * kRow + e];
  const int64_t* row = table + (entry >> 32) * kRow;
  const int64_t start = (entry & 0xffffffffLL) * kTile;
  const int64_t rest = row[2] - start;
  const int64_t len = rest < kTile ? rest : kTile;
  const int code = static_cast<int>(row[3]);
  const bool vec = code >= kAligned;
  using f32 = float;
  using bf16 = c10::BFloat16;
  using f16 = c10::Half;
  if constexpr (K == Kind::Swap) {  // equal dtypes only (codes 0, 4, 8): move raw bits
    if (code % kAligned == 0) return tile_at<K, uint32_t, uint32_t>(row[0], row[1], start, len, vec, t, s);
    return tile_at<K, uint16_t, uint16_t>(row[0], row[1], start, len, vec, t, s);
  } else {
    switch (code % kAligned) {
      case 0: return tile_at<K, f32, f32>(row[0], row[1], start, len, vec, t, s);
      case 1: return tile_at<K, bf16, f32>(row[0], row[1], start, len, vec, t, s);
      case 2: return tile_at<K, f16, f32>(row[0], row[1], start, len, vec, t, s);
      case 3: return tile_at<K, f32, bf16>(row[0], row[1], start, len, vec, t, s);
      case 4: return tile_at<K, bf16, bf16>(row[0], row[1], start, len, vec, t, s);
      case 5: return tile_at<K, f16, bf16>(row[0], row[1], start, len, vec, t, s);
      case 6: return tile_at<K, f32, f16>(row[0], row[1], start, len, vec, t, s);
      case 7: return tile_at<K, bf16, f16>(row[0], row[1], start, len, vec, t, s);
      case 8: return tile_at<K, f16, f16>(row[0], row[1], start, len, vec, t, s);
      default: return;
    }
  }
}

}  // namespace ema_fused
