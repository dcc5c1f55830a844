// The stochastic update's CPU loops with explicit AVX-512 / AVX2 intrinsics: included by
// cpu_stochastic_avx512.cpp and cpu_stochastic_avx2.cpp, which compile everything after
// their `#pragma GCC target` for that instruction set (EMA_FUSED_SR_AVX512 / _AVX2 picks
// the traits below).  cpu_stochastic_loops.cpp calls them only where the CPU has the set.
//
// Why intrinsics: the work per element is the update itself plus an eighth of a
// Philox4x32-10 draw (10 rounds of two 32x32 -> 64-bit products).  GCC vectorised
// neither the draws (it used 64-bit vpmullq, or scalar code) nor their transposition into
// element order well: 1.0-2.1 ns per element on one core of the 2-core EPYC VM.
//
// Layout.  Philox runs one draw per 64-bit lane (its words in the low halves: vpmuludq
// multiplies exactly those, and the `hi` word is the product's high half after one
// shift; the high halves carry garbage that is never read), 8 draws per AVX-512
// register, 4 per AVX2 one, the key schedule broadcast from memory.  The four words of
// each draw are then transposed into element order: word i of a register holds the
// random numbers of elements 2i (low half) and 2i + 1 (high half) of 2W elements.  The
// elements are taken the same way, in even/odd lanes: a register of 2W 16-bit values
// splits into the even elements (x << 16 for bf16) and the odd ones (x & 0xffff0000)
// with one op each, and the results join with one shift and one or; fp32 params are
// deinterleaved with one permute per half.  So no widening or narrowing shuffles.
// The rounding takes a fast path where every lane is ordinary (bf16: finite and at most
// the largest bf16; fp16: a normal result) and the full rule of stochastic.h otherwise.
// Every result is bit for bit the scalar loop's; the tests run all three on the same data.
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

// A span's key schedule, round by round, broadcast once per span (the rounds then read
// them as memory operands: no broadcast per draw).
//
// The first two rounds are partly the same for every draw of a span (only c0, the
// group, differs): round 0's product B * c2 and round 1's A * c0 are made here, once,
// and what they leave is folded into broadcasts (each draw then makes 18 products of 20).
template <typename V>
struct Keys {
  using I = typename V::I;
  static I kBroadcast(uint64_t v) { return V::broadcast64(v); }
  I k0[sr::kRounds], k1[sr::kRounds];
  I r0_c2;  // round 0: c2' = hi(A * c0) ^ r0_c2; c3' = lo(A * c0)
  I r1_c0;  // round 1: c0' = hi(B * c2) ^ r1_c0; c1' = lo(B * c2)
  I r1_c2;  // round 1: c2' = c3 ^ r1_c2
  I r1_c3;  // round 1: c3'
  explicit Keys(const sr::Stream& st) {
    uint32_t a = st.k0, b = st.k1;
    for (int r = 0; r < sr::kRounds; ++r, a += sr::kKeyA, b += sr::kKeyB) {
      k0[r] = kBroadcast(a);
      k1[r] = kBroadcast(b);
    }
    const uint64_t pb = uint64_t(sr::kMulB) * st.off_lo;  // round 0: c2 is the offset's low word
    const uint32_t c0 = uint32_t(pb >> 32) ^ st.position ^ st.k0, c1 = uint32_t(pb);
    r0_c2 = kBroadcast(st.off_hi ^ st.k1);
    const uint64_t pa = uint64_t(sr::kMulA) * c0;  // round 1: c0 is the same for every draw
    r1_c0 = kBroadcast(c1 ^ (st.k0 + sr::kKeyA));
    r1_c2 = kBroadcast(uint32_t(pa >> 32) ^ (st.k1 + sr::kKeyB));
    r1_c3 = kBroadcast(uint32_t(pa));
  }
};

#if defined(EMA_FUSED_SR_AVX512)
// ------------------------------------------------------------------ AVX-512, 16 lanes
struct Avx512 {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;

  static EMA_SIMD_INLINE I c(uint32_t v) { return _mm512_set1_epi32(int(v)); }
  static I broadcast64(uint64_t v) { return _mm512_set1_epi64(static_cast<int64_t>(v)); }
  using Keys = ema_fused::Keys<Avx512>;

  // Draws for groups g .. g + 8 * kChains - 1, as kChains independent chains of rounds
  // (one chain's latency, 10 dependent products, leaves the core idle: 2 chains took
  // 0.32 ns per element in cache, 4 chains 0.28, on the 2-core EPYC VM): out[k] holds the
  // words of groups g + 4k .. g + 4k + 3 (elements 8g + 32k .. 8g + 32k + 31).
  static constexpr int kChains = 4;
  static EMA_SIMD_INLINE void draws(uint32_t g, const Keys& keys, I (&out)[2 * kChains]) {
    const I iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    I c0[kChains], c1[kChains], c2[kChains], c3[kChains];
    const I ma = _mm512_set1_epi64(sr::kMulA), mb = _mm512_set1_epi64(sr::kMulB);
#pragma GCC unroll 4
    for (int q = 0; q < kChains; ++q) {  // rounds 0 and 1, their uniform parts in `keys`
      const I pa = _mm512_mul_epu32(_mm512_add_epi64(_mm512_set1_epi64(g + 8u * q), iota), ma);
      const I pb = _mm512_mul_epu32(_mm512_xor_si512(_mm512_srli_epi64(pa, 32), keys.r0_c2), mb);
      c0[q] = _mm512_xor_si512(_mm512_srli_epi64(pb, 32), keys.r1_c0);
      c1[q] = pb;
      c2[q] = _mm512_xor_si512(pa, keys.r1_c2);
      c3[q] = keys.r1_c3;
    }
#pragma GCC unroll 8
    for (int r = 2; r < sr::kRounds; ++r) {
#pragma GCC unroll 4
      for (int q = 0; q < kChains; ++q) {
        const I pb = _mm512_mul_epu32(c2[q], mb), pa = _mm512_mul_epu32(c0[q], ma);
        // hi ^ c ^ k (0x96: three-way xor)
        c0[q] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1[q], keys.k0[r], 0x96);
        c2[q] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3[q], keys.k1[r], 0x96);
        c1[q] = pb;
        c3[q] = pa;
      }
    }
#pragma GCC unroll 4
    for (int q = 0; q < kChains; ++q) transpose(c0[q], c1[q], c2[q], c3[q], out[2 * q], out[2 * q + 1]);
  }
  // Eight draws' words (one draw per 64-bit lane, words in the low halves) into element
  // order: lo gets draws 0 .. 3, hi draws 4 .. 7, four words each (4 permutes).
  static EMA_SIMD_INLINE void transpose(const I& c0, const I& c1, const I& c2, const I& c3,
                                        I& lo, I& hi) {
    const I pairs = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
    const I w01 = _mm512_permutex2var_epi32(c0, pairs, c1);  // draw d: words 0, 1 at 64-bit d
    const I w23 = _mm512_permutex2var_epi32(c2, pairs, c3);  // words 2, 3
    lo = _mm512_permutex2var_epi64(w01, _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), w23);
    hi = _mm512_permutex2var_epi64(w01, _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15), w23);
  }
  static EMA_SIMD_INLINE I load_raw(const void* p) { return _mm512_loadu_si512(p); }
  // 2W elements at p as floats: the even ones and the odd ones
  static EMA_SIMD_INLINE void load2(TagBF16, const void* p, F& even, F& odd) {
    const I x = load_raw(p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(x, c(0xffff0000u)));
  }
  static EMA_SIMD_INLINE void load2(TagF16, const void* p, F& even, F& odd) {
    const I x = load_raw(p);  // vpmovdw keeps each lane's low 16 bits; fp16 -> fp32 is exact
    even = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(x));
    odd = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(x, 16)));
  }
  static EMA_SIMD_INLINE void load2(TagF32, const void* p, F& even, F& odd) {
    const F lo = _mm512_loadu_ps(p), hi = _mm512_loadu_ps(static_cast<const float*>(p) + W);
    const I idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    even = _mm512_permutex2var_ps(lo, idx, hi);
    odd = _mm512_permutex2var_ps(lo, _mm512_add_epi32(idx, c(1)), hi);
  }
  // 2W 16-bit results: the even elements' in the low halves of `even` (high halves 0),
  // the odd elements' in the high halves of `odd` (low halves 0)
  static EMA_SIMD_INLINE void store2(void* p, const I& even, const I& odd) {
    _mm512_storeu_si512(p, _mm512_or_si512(even, odd));
  }
  static EMA_SIMD_INLINE I bits(const F& x) { return _mm512_castps_si512(x); }
  // where (a > b, both < 2^31 as integers) take x, else y
  static EMA_SIMD_INLINE I if_gt(const I& a, uint32_t b, const I& x, const I& y) {
    return _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(a, c(b)), y, x);
  }
  static EMA_SIMD_INLINE I if_ne0(const I& a, const I& x, const I& y) {
    return _mm512_mask_blend_epi32(_mm512_test_epi32_mask(a, a), y, x);
  }
  // whether any lane of x or y, as unsigned numbers, is above `limit`
  static EMA_SIMD_INLINE bool any_above(const I& x, const I& y, uint32_t limit) {
    return !_kortestz_mask16_u8(_mm512_cmpgt_epu32_mask(x, c(limit)),
                                _mm512_cmpgt_epu32_mask(y, c(limit)));
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

  static EMA_SIMD_INLINE I c(uint32_t v) { return _mm256_set1_epi32(int(v)); }
  static I broadcast64(uint64_t v) { return _mm256_set1_epi64x(static_cast<int64_t>(v)); }
  using Keys = ema_fused::Keys<Avx2>;

  // Draws for groups g .. g + 4 * kChains - 1 as kChains independent chains (see
  // Avx512::draws; two here: the 16 ymm registers hold no more): out[k] holds groups
  // g + 2k, g + 2k + 1.
  static constexpr int kChains = 2;
  static EMA_SIMD_INLINE void draws(uint32_t g, const Keys& keys, I (&out)[2 * kChains]) {
    const I iota = _mm256_setr_epi64x(0, 1, 2, 3);
    I c0[kChains], c1[kChains], c2[kChains], c3[kChains];
    const I ma = _mm256_set1_epi64x(sr::kMulA), mb = _mm256_set1_epi64x(sr::kMulB);
#pragma GCC unroll 2
    for (int q = 0; q < kChains; ++q) {  // rounds 0 and 1 (see Avx512::draws)
      const I pa = _mm256_mul_epu32(_mm256_add_epi64(_mm256_set1_epi64x(g + 4u * q), iota), ma);
      const I pb = _mm256_mul_epu32(_mm256_xor_si256(_mm256_srli_epi64(pa, 32), keys.r0_c2), mb);
      c0[q] = _mm256_xor_si256(_mm256_srli_epi64(pb, 32), keys.r1_c0);
      c1[q] = pb;
      c2[q] = _mm256_xor_si256(pa, keys.r1_c2);
      c3[q] = keys.r1_c3;
    }
#pragma GCC unroll 8
    for (int r = 2; r < sr::kRounds; ++r) {
#pragma GCC unroll 2
      for (int q = 0; q < kChains; ++q) {
        const I pb = _mm256_mul_epu32(c2[q], mb), pa = _mm256_mul_epu32(c0[q], ma);
        c0[q] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb, 32), c1[q]), keys.k0[r]);
        c2[q] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa, 32), c3[q]), keys.k1[r]);
        c1[q] = pb;
        c3[q] = pa;
      }
    }
#pragma GCC unroll 2
    for (int q = 0; q < kChains; ++q) transpose(c0[q], c1[q], c2[q], c3[q], out[2 * q], out[2 * q + 1]);
  }
  // Four draws' words into element order: lo gets draws 0, 1, hi draws 2, 3.
  static EMA_SIMD_INLINE void transpose(const I& c0, const I& c1, const I& c2, const I& c3,
                                        I& lo, I& hi) {
    const I w01 = _mm256_blend_epi32(c0, _mm256_slli_epi64(c1, 32), 0xAA);
    const I w23 = _mm256_blend_epi32(c2, _mm256_slli_epi64(c3, 32), 0xAA);
    const I even = _mm256_unpacklo_epi64(w01, w23);  // draws 0, 2
    const I odd = _mm256_unpackhi_epi64(w01, w23);   // draws 1, 3
    lo = _mm256_permute2x128_si256(even, odd, 0x20);
    hi = _mm256_permute2x128_si256(even, odd, 0x31);
  }
  static EMA_SIMD_INLINE I load_raw(const void* p) {
    return _mm256_loadu_si256(static_cast<const __m256i*>(p));
  }
  static EMA_SIMD_INLINE __m128i narrow(const I& x) {  // lanes < 2^16 -> 8 packed 16-bit
    return _mm256_castsi256_si128(
        _mm256_permute4x64_epi64(_mm256_packus_epi32(x, _mm256_setzero_si256()), 0x08));
  }
  static EMA_SIMD_INLINE void load2(TagBF16, const void* p, F& even, F& odd) {
    const I x = load_raw(p);
    even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(x, c(0xffff0000u)));
  }
  static EMA_SIMD_INLINE void load2(TagF16, const void* p, F& even, F& odd) {
    const I x = load_raw(p);  // fp16 -> fp32 is exact
    even = _mm256_cvtph_ps(narrow(_mm256_and_si256(x, c(0xffffu))));
    odd = _mm256_cvtph_ps(narrow(_mm256_srli_epi32(x, 16)));
  }
  static EMA_SIMD_INLINE void load2(TagF32, const void* p, F& even, F& odd) {
    const F lo = _mm256_loadu_ps(static_cast<const float*>(p));
    const F hi = _mm256_loadu_ps(static_cast<const float*>(p) + W);
    // in-lane shuffles give elements 0 2 8 10 4 6 12 14; the 64-bit permute orders them
    even = _mm256_castpd_ps(_mm256_permute4x64_pd(
        _mm256_castps_pd(_mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0))), 0xD8));
    odd = _mm256_castpd_ps(_mm256_permute4x64_pd(
        _mm256_castps_pd(_mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1))), 0xD8));
  }
  static EMA_SIMD_INLINE void store2(void* p, const I& even, const I& odd) {
    _mm256_storeu_si256(static_cast<__m256i*>(p), _mm256_or_si256(even, odd));
  }
  static EMA_SIMD_INLINE I bits(const F& x) { return _mm256_castps_si256(x); }
  static EMA_SIMD_INLINE I if_gt(const I& a, uint32_t b, const I& x, const I& y) {
    return _mm256_blendv_epi8(y, x, _mm256_cmpgt_epi32(a, c(b)));
  }
  static EMA_SIMD_INLINE I if_ne0(const I& a, const I& x, const I& y) {
    return _mm256_blendv_epi8(x, y, _mm256_cmpeq_epi32(a, _mm256_setzero_si256()));
  }
  static EMA_SIMD_INLINE bool any_above(const I& x, const I& y, uint32_t limit) {
    const I top = c(limit);  // unsigned: max(v, limit) != limit where v > limit
    const I above = _mm256_or_si256(_mm256_xor_si256(_mm256_max_epu32(x, top), top),
                                    _mm256_xor_si256(_mm256_max_epu32(y, top), top));
    return !_mm256_testz_si256(above, above);
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

// The full rule of stochastic.h's round_bf16 / round_f16, W lanes at a time: the 16-bit
// result in each lane's low half (the tests check every lane against the scalar rule).
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
  // (m << 8) >> (126 - max(e, 1) - 8): counts of 32 and more give 0, as round_f16 has it
  const I count = V::sub(V::c(118u), V::if_ne0(e, e, V::c(1u)));
  const I sub = V::shr(V::add(V::shrv(V::shl(m, 8), count), r), 16);
  I out = V::if_gt(a, 0x387fffffu, normal, sub);
  out = V::if_gt(a, 0x477fe000u, V::if_gt(a, 0x477fefffu, V::c(0x7c00u), V::c(0x7bffu)), out);
  out = V::if_gt(a, 0x7f800000u, V::c(0x7e00u), out);  // NaN
  return V::bor(out, V::band(V::shr(u, 16), V::c(0x8000u)));
}

// Both halves of a step: the fast path where every lane is ordinary, else the full rule.
// The even elements' results come back in the low halves, the odd ones' in the high
// halves (what store2 joins with one or).
template <typename V>
EMA_SIMD_INLINE void round2(TagBF16, const typename V::F& xe, const typename V::F& xo,
                            const typename V::I& re, const typename V::I& ro,
                            typename V::I& oe, typename V::I& oo) {
  const auto ue = V::bits(xe), uo = V::bits(xo);
  const auto mask = V::c(0x7fffffffu);
  if (V::any_above(V::band(ue, mask), V::band(uo, mask), 0x7f7f0000u)) {
    oe = round_lanes<V>(TagBF16(), xe, re);
    oo = V::shl(round_lanes<V>(TagBF16(), xo, ro), 16);
    return;
  }
  oe = V::shr(V::add(ue, re), 16);  // carry: up one ulp
  oo = V::band(V::add(uo, ro), V::c(0xffff0000u));
}

template <typename V>
EMA_SIMD_INLINE void round2(TagF16, const typename V::F& xe, const typename V::F& xo,
                            const typename V::I& re, const typename V::I& ro,
                            typename V::I& oe, typename V::I& oo) {
  const auto ue = V::bits(xe), uo = V::bits(xo);
  const auto mask = V::c(0x7fffffffu), bias = V::c(0x38000000u);
  const auto ae = V::band(ue, mask), ao = V::band(uo, mask);
  // normal results only: |x| in [2^-14, 65504]
  if (V::any_above(V::sub(ae, V::c(0x38800000u)), V::sub(ao, V::c(0x38800000u)),
                   0x477fe000u - 0x38800000u)) {
    oe = round_lanes<V>(TagF16(), xe, re);
    oo = V::shl(round_lanes<V>(TagF16(), xo, ro), 16);
    return;
  }
  const auto sign = V::c(0x8000u);
  oe = V::bor(V::shr(V::add(V::sub(ae, bias), V::shr(re, 3)), 13), V::band(V::shr(ue, 16), sign));
  oo = V::shl(V::bor(V::shr(V::add(V::sub(ao, bias), V::shr(ro, 3)), 13),
                     V::band(V::shr(uo, 16), sign)), 16);
}

// Elements [begin, end) of a span: first + begin a multiple of 8, end - begin of
// 4 * kChains * W.  Per draw call: 2 * kChains steps of 2W elements, each with one
// register of the draws' words.
template <typename V, typename S, typename P, bool kFinite>
void simd_body(const SrSpan& sp, int64_t begin, int64_t end) {
  using F = typename V::F;
  using I = typename V::I;
  char* s = static_cast<char*>(sp.s);
  const char* p = static_cast<const char*>(sp.p);
  const typename V::Keys keys(sp.st);
  const F w = V::fset(sp.w), v = V::fset(1.0f - sp.w);
  const bool low = sp.w < 0.5f;
  constexpr int kSteps = 2 * V::kChains;
  for (int64_t i = begin; i < end; i += kSteps * 2 * V::W) {
    I words[kSteps];
    V::draws(static_cast<uint32_t>((sp.first + static_cast<uint64_t>(i)) >> 3), keys, words);
#pragma GCC unroll 8
    for (int q = 0; q < kSteps; ++q) {
      const int64_t j = i + 2 * V::W * q;
      F ae, ao, be, bo;
      V::load2(S(), s + j * S::size, ae, ao);
      V::load2(P(), p + j * P::size, be, bo);
      const F de = V::fsub(be, ae), d_o = V::fsub(bo, ao);
      const F xe = low ? V::fadd(ae, V::fmul(w, de)) : V::fsub(be, V::fmul(v, de));
      const F xo = low ? V::fadd(ao, V::fmul(w, d_o)) : V::fsub(bo, V::fmul(v, d_o));
      I oe, oo;
      round2<V>(S(), xe, xo, V::band(words[q], V::c(0xffffu)), V::shr(words[q], 16), oe, oo);
      if (kFinite) {  // keep the shadow's bits where the param is NaN or +-Inf
        const I raw = V::load_raw(s + j * S::size), abs = V::c(0x7fffffffu);
        oe = V::if_gt(V::band(V::bits(be), abs), 0x7f7fffffu, V::band(raw, V::c(0xffffu)), oe);
        oo = V::if_gt(V::band(V::bits(bo), abs), 0x7f7fffffu, V::band(raw, V::c(0xffff0000u)), oo);
      }
      V::store2(s + j * S::size, oe, oo);
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
          4 * V::kChains * V::W};
}

#undef EMA_SIMD_INLINE

}  // namespace
}  // namespace ema_fused
