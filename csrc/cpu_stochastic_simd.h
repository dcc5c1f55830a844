// The stochastic update's CPU loops with explicit AVX-512 / AVX2 intrinsics: included by
// cpu_stochastic_avx512.cpp and cpu_stochastic_avx2.cpp, which compile everything after
// their `#pragma GCC target` for that instruction set (EMA_FUSED_SR_AVX512 / _AVX2 picks
// the traits below).  cpu_stochastic.cpp calls them only where the CPU has the set.
//
// Why intrinsics: the work per element is the update itself (~1 vector op) plus an
// eighth of a Philox4x32-10 draw (10 rounds of two 32x32 -> 64-bit products), ~1 more.
// GCC vectorised neither the draws (it used 64-bit vpmullq, or scalar code) nor their
// transposition into element order well: 1.0-2.1 ns per element on one core of the
// 2-core EPYC VM, against 0.38 ns with this code (in cache; the fp32-shadow update of
// the same bf16 params: 0.07 ns in cache, 0.29 ns streaming from memory).
//
// Layout: Philox runs one draw per 64-bit lane (its words in the low halves: vpmuludq
// multiplies exactly those, and the `hi` word is the product's high half after one
// shift; the high halves carry garbage that is never read), 8 draws per AVX-512
// register, 4 per AVX2 one.  The four words of each draw are then transposed into
// element order (draw g's 128 bits are the 16-bit random numbers of elements 8g .. 8g + 7,
// low half first), and each vector of W elements takes a widened slice of them.  Every
// result is bit for bit what the scalar loop (stochastic.h's round_bf16 / round_f16)
// gives; the tests run all three on the same data.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu_stochastic.h"

namespace ema_fused {
namespace {

#define EMA_SIMD_INLINE inline __attribute__((always_inline))

// Storage formats as tags: the loops are templates over (shadow, param, skip_nonfinite).
struct TagF32 { static constexpr int64_t size = 4; };
struct TagBF16 { static constexpr int64_t size = 2; };
struct TagF16 { static constexpr int64_t size = 2; };

#if defined(EMA_FUSED_SR_AVX512)
// ------------------------------------------------------------------ AVX-512, 16 lanes
struct Avx512 {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;

  // Draws for groups g .. g + 7: out[0] holds groups g .. g + 3 (elements 8g .. 8g + 31
  // as 32 16-bit numbers), out[1] groups g + 4 .. g + 7.
  static EMA_SIMD_INLINE void draws(uint32_t g, const sr::Stream& st, I (&out)[2]) {
    I c0 = _mm512_add_epi64(_mm512_set1_epi64(g), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
    I c1 = _mm512_set1_epi64(st.position), c2 = _mm512_set1_epi64(st.off_lo);
    I c3 = _mm512_set1_epi64(st.off_hi);
    const I ma = _mm512_set1_epi64(sr::kMulA), mb = _mm512_set1_epi64(sr::kMulB);
    uint32_t k0 = st.k0, k1 = st.k1;
#pragma GCC unroll 10
    for (int r = 0; r < sr::kRounds; ++r) {
      const I pb = _mm512_mul_epu32(c2, mb), pa = _mm512_mul_epu32(c0, ma);
      // hi ^ c ^ k (0x96: three-way xor); the high halves carry garbage, never read
      c0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1, _mm512_set1_epi64(k0), 0x96);
      c2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3, _mm512_set1_epi64(k1), 0x96);
      c1 = pb;
      c3 = pa;
      k0 += sr::kKeyA;
      k1 += sr::kKeyB;
    }
    const I w01 = _mm512_mask_blend_epi32(0xAAAA, c0, _mm512_slli_epi64(c1, 32));
    const I w23 = _mm512_mask_blend_epi32(0xAAAA, c2, _mm512_slli_epi64(c3, 32));
    const I even = _mm512_unpacklo_epi64(w01, w23);  // groups g, g+2, g+4, g+6
    const I odd = _mm512_unpackhi_epi64(w01, w23);   // groups g+1, g+3, g+5, g+7
    out[0] = _mm512_permutex2var_epi64(even, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), odd);
    out[1] = _mm512_permutex2var_epi64(even, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), odd);
  }
  // The 16-bit numbers h * 16 .. h * 16 + 15 of `words`, one per 32-bit lane.
  static EMA_SIMD_INLINE I widen(const I& words, int h) {
    return _mm512_cvtepu16_epi32(h == 0 ? _mm512_castsi512_si256(words)
                                        : _mm512_extracti64x4_epi64(words, 1));
  }
  // A 16-bit format's raw bits, widened to 32-bit lanes.
  static EMA_SIMD_INLINE I raw16(const void* p) {
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
  }
  static EMA_SIMD_INLINE F to_float(TagBF16, const I& raw) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  }
  static EMA_SIMD_INLINE F to_float(TagF16, const I& raw) {
    return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(raw));  // exact
  }
  static EMA_SIMD_INLINE F load(TagF32, const void* p) {
    return _mm512_loadu_ps(p);
  }
  template <typename Tag>
  static EMA_SIMD_INLINE F load(Tag tag, const void* p) {
    return to_float(tag, raw16(p));
  }
  static EMA_SIMD_INLINE void store16(void* p, const I& bits) {
    _mm256_storeu_si256(static_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bits));
  }
  static EMA_SIMD_INLINE I bits(const F& x) { return _mm512_castps_si512(x); }
  static EMA_SIMD_INLINE I c(uint32_t v) { return _mm512_set1_epi32(int(v)); }
  // where (a > b, both < 2^31 as integers) take x, else y
  static EMA_SIMD_INLINE I if_gt(const I& a, uint32_t b, const I& x, const I& y) {
    return _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(a, c(b)), y, x);
  }
  static EMA_SIMD_INLINE I if_ne0(const I& a, const I& x, const I& y) {
    return _mm512_mask_blend_epi32(_mm512_test_epi32_mask(a, a), y, x);
  }
  static EMA_SIMD_INLINE I add(const I& a, const I& b) { return _mm512_add_epi32(a, b); }
  static EMA_SIMD_INLINE I sub(const I& a, const I& b) { return _mm512_sub_epi32(a, b); }
  static EMA_SIMD_INLINE I band(const I& a, const I& b) { return _mm512_and_si512(a, b); }
  static EMA_SIMD_INLINE I bor(const I& a, const I& b) { return _mm512_or_si512(a, b); }
  static EMA_SIMD_INLINE I shr(const I& a, int n) { return _mm512_srli_epi32(a, n); }
  static EMA_SIMD_INLINE I shl(const I& a, int n) { return _mm512_slli_epi32(a, n); }
  // logical right shift by per-lane counts; counts >= 32 give 0
  static EMA_SIMD_INLINE I shrv(const I& a, const I& n) { return _mm512_srlv_epi32(a, n); }
  static EMA_SIMD_INLINE F fsub(const F& a, const F& b) { return _mm512_sub_ps(a, b); }
  static EMA_SIMD_INLINE F fadd(const F& a, const F& b) { return _mm512_add_ps(a, b); }
  static EMA_SIMD_INLINE F fmul(const F& a, const F& b) { return _mm512_mul_ps(a, b); }
  static EMA_SIMD_INLINE F fset(float v) { return _mm512_set1_ps(v); }
};

#elif defined(EMA_FUSED_SR_AVX2)
// ------------------------------------------------------------------ AVX2, 8 lanes
struct Avx2 {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;

  // Draws for groups g .. g + 3: out[0] holds groups g, g + 1, out[1] groups g + 2, g + 3.
  static EMA_SIMD_INLINE void draws(uint32_t g, const sr::Stream& st, I (&out)[2]) {
    I c0 = _mm256_add_epi64(_mm256_set1_epi64x(g), _mm256_setr_epi64x(0, 1, 2, 3));
    I c1 = _mm256_set1_epi64x(st.position), c2 = _mm256_set1_epi64x(st.off_lo);
    I c3 = _mm256_set1_epi64x(st.off_hi);
    const I ma = _mm256_set1_epi64x(sr::kMulA), mb = _mm256_set1_epi64x(sr::kMulB);
    uint32_t k0 = st.k0, k1 = st.k1;
#pragma GCC unroll 10
    for (int r = 0; r < sr::kRounds; ++r) {
      const I pb = _mm256_mul_epu32(c2, mb), pa = _mm256_mul_epu32(c0, ma);
      c0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb, 32), c1), _mm256_set1_epi64x(k0));
      c2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa, 32), c3), _mm256_set1_epi64x(k1));
      c1 = pb;
      c3 = pa;
      k0 += sr::kKeyA;
      k1 += sr::kKeyB;
    }
    const I w01 = _mm256_blend_epi32(c0, _mm256_slli_epi64(c1, 32), 0xAA);
    const I w23 = _mm256_blend_epi32(c2, _mm256_slli_epi64(c3, 32), 0xAA);
    const I even = _mm256_unpacklo_epi64(w01, w23);  // groups g, g + 2
    const I odd = _mm256_unpackhi_epi64(w01, w23);   // groups g + 1, g + 3
    out[0] = _mm256_permute2x128_si256(even, odd, 0x20);
    out[1] = _mm256_permute2x128_si256(even, odd, 0x31);
  }
  static EMA_SIMD_INLINE I widen(const I& words, int h) {
    return _mm256_cvtepu16_epi32(h == 0 ? _mm256_castsi256_si128(words)
                                        : _mm256_extracti128_si256(words, 1));
  }
  static EMA_SIMD_INLINE I raw16(const void* p) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  }
  static EMA_SIMD_INLINE __m128i narrow(const I& bits) {  // low 16 bits of each lane
    const I packed = _mm256_packus_epi32(_mm256_and_si256(bits, c(0xffffu)), _mm256_setzero_si256());
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
  }
  static EMA_SIMD_INLINE F to_float(TagBF16, const I& raw) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  }
  static EMA_SIMD_INLINE F to_float(TagF16, const I& raw) {
    return _mm256_cvtph_ps(narrow(raw));  // exact
  }
  static EMA_SIMD_INLINE F load(TagF32, const void* p) {
    return _mm256_loadu_ps(static_cast<const float*>(p));
  }
  template <typename Tag>
  static EMA_SIMD_INLINE F load(Tag tag, const void* p) {
    return to_float(tag, raw16(p));
  }
  static EMA_SIMD_INLINE void store16(void* p, const I& bits) {
    _mm_storeu_si128(static_cast<__m128i*>(p), narrow(bits));
  }
  static EMA_SIMD_INLINE I bits(const F& x) { return _mm256_castps_si256(x); }
  static EMA_SIMD_INLINE I c(uint32_t v) { return _mm256_set1_epi32(int(v)); }
  static EMA_SIMD_INLINE I if_gt(const I& a, uint32_t b, const I& x, const I& y) {
    return _mm256_blendv_epi8(y, x, _mm256_cmpgt_epi32(a, c(b)));
  }
  static EMA_SIMD_INLINE I if_ne0(const I& a, const I& x, const I& y) {
    return _mm256_blendv_epi8(x, y, _mm256_cmpeq_epi32(a, _mm256_setzero_si256()));
  }
  static EMA_SIMD_INLINE I add(const I& a, const I& b) { return _mm256_add_epi32(a, b); }
  static EMA_SIMD_INLINE I sub(const I& a, const I& b) { return _mm256_sub_epi32(a, b); }
  static EMA_SIMD_INLINE I band(const I& a, const I& b) { return _mm256_and_si256(a, b); }
  static EMA_SIMD_INLINE I bor(const I& a, const I& b) { return _mm256_or_si256(a, b); }
  static EMA_SIMD_INLINE I shr(const I& a, int n) { return _mm256_srli_epi32(a, n); }
  static EMA_SIMD_INLINE I shl(const I& a, int n) { return _mm256_slli_epi32(a, n); }
  static EMA_SIMD_INLINE I shrv(const I& a, const I& n) { return _mm256_srlv_epi32(a, n); }
  static EMA_SIMD_INLINE F fsub(const F& a, const F& b) { return _mm256_sub_ps(a, b); }
  static EMA_SIMD_INLINE F fadd(const F& a, const F& b) { return _mm256_add_ps(a, b); }
  static EMA_SIMD_INLINE F fmul(const F& a, const F& b) { return _mm256_mul_ps(a, b); }
  static EMA_SIMD_INLINE F fset(float v) { return _mm256_set1_ps(v); }
};

#endif


// The rounding of stochastic.h's round_bf16 / round_f16, W lanes at a time (the tests
// check every lane against them, specials included).
template <typename V>
EMA_SIMD_INLINE typename V::I round_lanes(TagBF16, const typename V::F& x, const typename V::I& r) {
  using I = typename V::I;
  const I u = V::bits(x), a = V::band(u, V::c(0x7fffffffu));
  const I rr = V::if_gt(a, 0x7f7f0000u, V::c(0x8000u), r);  // beyond the largest bf16, Inf: nearest
  return V::if_gt(a, 0x7f800000u, V::c(0x7fc0u), V::shr(V::add(u, rr), 16));  // NaN
}

template <typename V>
EMA_SIMD_INLINE typename V::I round_lanes(TagF16, const typename V::F& x, const typename V::I& r) {
  using I = typename V::I;
  const I u = V::bits(x), a = V::band(u, V::c(0x7fffffffu));
  const I normal = V::shr(V::add(V::sub(a, V::c(0x38000000u)), V::shr(r, 3)), 13);
  const I e = V::shr(a, 23);
  const I m = V::bor(V::band(a, V::c(0x7fffffu)), V::if_ne0(e, V::c(0x800000u), V::c(0u)));
  // (m << 8) >> (126 - e - 8): shift counts of 32 and more give 0, as round_f16 has it
  const I shift = V::sub(V::c(118u), V::if_ne0(e, e, V::c(1u)));
  const I sub = V::shr(V::add(V::shrv(V::shl(m, 8), shift), r), 16);
  I out = V::if_gt(a, 0x387fffffu, normal, sub);
  out = V::if_gt(a, 0x477fe000u, V::if_gt(a, 0x477fefffu, V::c(0x7c00u), V::c(0x7bffu)), out);
  out = V::if_gt(a, 0x7f800000u, V::c(0x7e00u), out);  // NaN
  return V::bor(out, V::band(V::shr(u, 16), V::c(0x8000u)));
}

// Elements [begin, end) of a span: first + begin a multiple of 8, end - begin of 4 * W.
// Per draw call: 4 vectors of W elements, each with a quarter of the draws' bits.
template <typename V, typename S, typename P, bool kFinite>
void simd_body(const SrSpan& sp, int64_t begin, int64_t end) {
  using F = typename V::F;
  using I = typename V::I;
  auto* s = static_cast<uint16_t*>(sp.s);
  const char* p = static_cast<const char*>(sp.p);
  const F w = V::fset(sp.w), v = V::fset(1.0f - sp.w);
  const bool low = sp.w < 0.5f;
  for (int64_t i = begin; i < end; i += 4 * V::W) {
    I words[2];
    V::draws(static_cast<uint32_t>((sp.first + static_cast<uint64_t>(i)) >> 3), sp.st, words);
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const int64_t j = i + q * V::W;
      const I raw = V::raw16(s + j);
      const F a = V::to_float(S(), raw), b = V::load(P(), p + j * P::size);
      const F d = V::fsub(b, a);
      const F x = low ? V::fadd(a, V::fmul(w, d)) : V::fsub(b, V::fmul(v, d));
      I out = round_lanes<V>(S(), x, V::widen(words[q >> 1], q & 1));
      if (kFinite) out = V::if_gt(V::band(V::bits(b), V::c(0x7fffffffu)), 0x7f7fffffu, raw, out);
      V::store16(s + j, out);
    }
  }
}

template <typename V, typename S, typename P>
SrBody body_of(bool finite) {
  return finite ? simd_body<V, S, P, true> : simd_body<V, S, P, false>;
}

template <typename V, typename S>
SrBody body_row(int code_p, bool finite) {
  return code_p == 0 ? body_of<V, S, TagF32>(finite)
                     : code_p == 1 ? body_of<V, S, TagBF16>(finite) : body_of<V, S, TagF16>(finite);
}

template <typename V>
SrSimd simd_for(int code_s, int code_p, bool finite) {
  return {code_s == 1 ? body_row<V, TagBF16>(code_p, finite) : body_row<V, TagF16>(code_p, finite),
          4 * V::W};
}

#undef EMA_SIMD_INLINE

}  // namespace
}  // namespace ema_fused
