// The CPU kernels' element work, shared by every CPU kernel op (cpu_kernels.cpp,
// cpu_multi_shadow.cpp): storage formats, the update/copy/swap loops over one range of
// a pair, and their dispatch table by dtype codes (kFloat, kBFloat16, kHalf).
//
//  * target_clones("arch=haswell") tests the CPU *model* (Intel Haswell), so AMD and
//    newer Intel CPUs got the SSE2 clone; "arch=x86-64-v3" tests the features (AVX2,
//    FMA, F16C): 94 -> 88 ms on one thread.
//  * c10::Half's conversions branch on subnormals, so no fp16 loop vectorised; the exact
//    branch-free ones below do (fp16 param, fp32 shadow: 403 -> 78 ms).
//  * bf16 shadow and bf16 param are updated two elements per 32-bit word (bf16_pairs):
//    one shift or mask makes each half an fp32 value and the results join with one or,
//    where the element loop widens and narrows across vector lanes: 5e7 elements on one
//    core of the 2-core AMD EPYC VM, 0.30 -> 0.19 ns per element (AVX2), 0.175 with an
//    AVX-512 clone (that loop only: on every loop an "arch=x86-64-v4" clone made the
//    fp32-shadow update of a bf16 model 4-7% slower there); the same bits.
//
// Everything here has internal linkage in each translation unit (an unnamed namespace),
// so each one keeps its own target_clones resolvers; the loops are the same templates
// compiled with the same flags, so every op computes the same bits for an element.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

// GCC < 12 has no "arch=x86-64-v3" clone; "avx2" also tests the feature (no FMA).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define EMA_FUSED_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define EMA_FUSED_CLONES_AVX512 \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define EMA_FUSED_CLONES __attribute__((target_clones("avx2", "default")))
#define EMA_FUSED_CLONES_AVX512 EMA_FUSED_CLONES
#else
#define EMA_FUSED_CLONES
#define EMA_FUSED_CLONES_AVX512
#endif

// The element helpers below must inline into the loops, or nothing vectorises: in a
// translation unit with many instantiations GCC stopped inlining F16::load/store (its
// unit-growth limit), and every update with a 16-bit shadow and an fp16 on either side
// became calls, 6-7 ns per element instead of 0.25-1.
#if defined(__GNUC__)
#define EMA_FUSED_INLINE inline __attribute__((always_inline))
#else
#define EMA_FUSED_INLINE inline
#endif

namespace ema_fused {
namespace {

EMA_FUSED_INLINE uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
EMA_FUSED_INLINE float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
// c ? a : b as a bit mask: GCC turns plain ?: here into branches (it will not
// speculate the float ops of the other side), and branches stop vectorisation.
EMA_FUSED_INLINE uint32_t pick(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - uint32_t(c);
  return (a & m) | (b & ~m);
}

// Storage formats: load to fp32 exactly, store from fp32 rounded to nearest even.
// Checked against F16C and a nearest-even reference for all 2^32 floats / 2^16 halves.
struct F32 {
  static constexpr bool kBF16 = false;
  using Raw = float;
  static EMA_FUSED_INLINE float load(float v) { return v; }
  static EMA_FUSED_INLINE float store(float f) { return f; }
};
struct BF16 {
  static constexpr bool kBF16 = true;
  using Raw = uint16_t;
  static EMA_FUSED_INLINE float load(uint16_t v) { return float_of(uint32_t(v) << 16); }
  static EMA_FUSED_INLINE uint16_t store(float f) {
    const uint32_t x = bits_of(f);
    const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;  // may carry up to inf
    return uint16_t(pick((x & 0x7fffffffu) > 0x7f800000u, 0x7fc0u, rounded));  // NaN
  }
};
struct F16 {
  static constexpr bool kBF16 = false;
  using Raw = uint16_t;
  static EMA_FUSED_INLINE float load(uint16_t v) {
    const uint32_t em = v & 0x7fffu;
    const float sub = float(int32_t(em)) * 0x1p-24f;  // subnormal: em * 2^-24, exact
    // rebias the exponent by 127 - 15 (inf/NaN: to 255, i.e. twice that)
    const uint32_t normal = (em << 13) + pick(em >= 0x7c00u, 0x70000000u, 0x38000000u);
    return float_of((uint32_t(v & 0x8000u) << 16) | pick(em < 0x400u, bits_of(sub), normal));
  }
  static EMA_FUSED_INLINE uint16_t store(float f) {
    const uint32_t x = bits_of(f), a = x & 0x7fffffffu;
    // normal half (|f| >= 2^-14): drop 13 mantissa bits, rounding to nearest even
    const uint32_t normal = (a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13;
    // subnormal half: the FPU rounds |f| + 0.5 to a multiple of 2^-24 (even on ties)
    const uint32_t sub = bits_of(float_of(a) + 0.5f) - 0x3f000000u;
    uint32_t h = pick(a < 0x38800000u, sub, normal);
    h = pick(a >= 0x477ff000u, 0x7c00u, h);  // 65520 and up round to inf
    h = pick(a > 0x7f800000u, 0x7e00u, h);   // NaN
    return uint16_t(h | ((x >> 16) & 0x8000u));
  }
};

// Each kernel gets a chunk's two base pointers, its length and one scalar.
using RangeFn = void (*)(void*, void*, int64_t, float);

// BF16::store's bits of f in the high half of a word (the low half zero).
EMA_FUSED_INLINE uint32_t bf16_high(float f) {
  const uint32_t x = bits_of(f);
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) & 0xffff0000u;
  return pick((x & 0x7fffffffu) > 0x7f800000u, 0x7fc00000u, rounded);
}

// Two bf16 elements read and written as one word (may_alias: the storage is uint16_t).
using Word __attribute__((may_alias)) = uint32_t;

// update_range<BF16, BF16> over n pairs of elements, each pair one 32-bit word (the
// lower-addressed element in the low half: little-endian), the same formulas.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "bf16_pairs: little-endian words");
EMA_FUSED_CLONES_AVX512 void bf16_pairs(Word* __restrict__ s, const Word* __restrict__ p,
                                 int64_t n, float w) {
  if (w < 0.5f) {
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t a = s[i], b = p[i];
      const float a0 = float_of(a << 16), a1 = float_of(a & 0xffff0000u);
      const float b0 = float_of(b << 16), b1 = float_of(b & 0xffff0000u);
      s[i] = (bf16_high(a0 + w * (b0 - a0)) >> 16) | bf16_high(a1 + w * (b1 - a1));
    }
  } else {
    const float v = 1.0f - w;
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t a = s[i], b = p[i];
      const float a0 = float_of(a << 16), a1 = float_of(a & 0xffff0000u);
      const float b0 = float_of(b << 16), b1 = float_of(b & 0xffff0000u);
      s[i] = (bf16_high(b0 - v * (b0 - a0)) >> 16) | bf16_high(b1 - v * (b1 - a1));
    }
  }
}

template <typename S, typename P>
EMA_FUSED_CLONES void update_elements(void* s_raw, void* p_raw, int64_t n, float w);

// s += w * (p - s) for 0 < w < 1 (update_with copies for w == 1 and skips w == 0).  For
// w >= 0.5 the form p - (1 - w) * (p - s) (1 - w is exact there), like torch.lerp.
// bf16 <- bf16 goes by pairs where both pointers can reach a 4-byte boundary together.
template <typename S, typename P>
void update_range(void* s_raw, void* p_raw, int64_t n, float w) {
  if constexpr (sizeof(typename S::Raw) == 2 && sizeof(typename P::Raw) == 2 &&
                S::kBF16 && P::kBF16) {
    auto* s = static_cast<uint16_t*>(s_raw);
    auto* p = static_cast<uint16_t*>(p_raw);
    const auto sa = reinterpret_cast<uintptr_t>(s), pa = reinterpret_cast<uintptr_t>(p);
    if (((sa ^ pa) & 3u) == 0 && n >= 8) {
      const int64_t head = (sa & 3u) ? 1 : 0;  // one element to the 4-byte boundary
      update_elements<S, P>(s, p, head, w);
      const int64_t pairs = (n - head) / 2;
      bf16_pairs(reinterpret_cast<Word*>(s + head), reinterpret_cast<const Word*>(p + head),
                 pairs, w);
      const int64_t done = head + 2 * pairs;
      update_elements<S, P>(s + done, p + done, n - done, w);
      return;
    }
  }
  update_elements<S, P>(s_raw, p_raw, n, w);
}

template <typename S, typename P>
EMA_FUSED_CLONES void update_elements(void* s_raw, void* p_raw, int64_t n, float w) {
  auto* __restrict__ s = static_cast<typename S::Raw*>(s_raw);
  const auto* __restrict__ p = static_cast<const typename P::Raw*>(p_raw);
  if (w < 0.5f) {
    for (int64_t i = 0; i < n; ++i) {
      const float a = S::load(s[i]);
      s[i] = S::store(a + w * (P::load(p[i]) - a));
    }
  } else {  // also NaN, which then flows into the shadows
    const float v = 1.0f - w;
    for (int64_t i = 0; i < n; ++i) {
      const float b = P::load(p[i]);
      s[i] = S::store(b - v * (b - S::load(s[i])));
    }
  }
}

// skip_nonfinite: where the param element is NaN or +-Inf the shadow element keeps its
// bits; chosen with masks, so the loops still vectorise.
EMA_FUSED_INLINE bool finite_bits(float f) { return (bits_of(f) & 0x7fffffffu) < 0x7f800000u; }
EMA_FUSED_INLINE float keep_unless(bool c, float fresh, float old) {
  return float_of(pick(c, bits_of(fresh), bits_of(old)));
}
EMA_FUSED_INLINE uint16_t keep_unless(bool c, uint16_t fresh, uint16_t old) {
  return uint16_t(pick(c, fresh, old));
}

template <typename S, typename P>
EMA_FUSED_CLONES void update_finite_range(void* s_raw, void* p_raw, int64_t n, float w) {
  auto* __restrict__ s = static_cast<typename S::Raw*>(s_raw);
  const auto* __restrict__ p = static_cast<const typename P::Raw*>(p_raw);
  if (w < 0.5f) {
    for (int64_t i = 0; i < n; ++i) {
      const float a = S::load(s[i]), b = P::load(p[i]);
      s[i] = keep_unless(finite_bits(b), S::store(a + w * (b - a)), s[i]);
    }
  } else {
    const float v = 1.0f - w;
    for (int64_t i = 0; i < n; ++i) {
      const float a = S::load(s[i]), b = P::load(p[i]);
      s[i] = keep_unless(finite_bits(b), S::store(b - v * (b - a)), s[i]);
    }
  }
}

// Weight 1 with skip_nonfinite: the copy of the finite elements (the scale is 1).
template <typename S, typename P>
EMA_FUSED_CLONES void copy_finite_range(void* s_raw, void* p_raw, int64_t n, float) {
  auto* __restrict__ s = static_cast<typename S::Raw*>(s_raw);
  const auto* __restrict__ p = static_cast<const typename P::Raw*>(p_raw);
  for (int64_t i = 0; i < n; ++i) {
    const float b = P::load(p[i]);
    s[i] = keep_unless(finite_bits(b), S::store(b), s[i]);
  }
}

template <typename D, typename S>
EMA_FUSED_CLONES void copy_range(void* d_raw, void* s_raw, int64_t n, float scale) {
  auto* __restrict__ d = static_cast<typename D::Raw*>(d_raw);
  const auto* __restrict__ s = static_cast<const typename S::Raw*>(s_raw);
  for (int64_t i = 0; i < n; ++i) d[i] = D::store(S::load(s[i]) * scale);
}

// Swap moves raw 2- or 4-byte units: bit-exact for every dtype of that size.
template <typename U>
EMA_FUSED_CLONES void swap_range(void* a_raw, void* b_raw, int64_t n, float) {
  U* __restrict__ a = static_cast<U*>(a_raw);
  U* __restrict__ b = static_cast<U*>(b_raw);
  for (int64_t i = 0; i < n; ++i) std::swap(a[i], b[i]);
}

template <template <typename, typename> class K>
struct Table {  // get(code of the first dtype, code of the second)
  template <typename A>
  static constexpr RangeFn row(int b) {
    return b == 0 ? K<A, F32>::fn : b == 1 ? K<A, BF16>::fn : K<A, F16>::fn;
  }
  static RangeFn get(int a, int b) {
    return a == 0 ? row<F32>(b) : a == 1 ? row<BF16>(b) : row<F16>(b);
  }
};
template <typename A, typename B>
struct Update { static constexpr RangeFn fn = update_range<A, B>; };
template <typename A, typename B>
struct Copy { static constexpr RangeFn fn = copy_range<A, B>; };
template <typename A, typename B>
struct UpdateFinite { static constexpr RangeFn fn = update_finite_range<A, B>; };
template <typename A, typename B>
struct CopyFinite { static constexpr RangeFn fn = copy_finite_range<A, B>; };

}  // namespace
}  // namespace ema_fused
