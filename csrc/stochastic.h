// Stochastic rounding of the fp32 update result into a 16-bit shadow, with random bits
// from Philox4x32-10: one header for the C++ CPU kernels and the CUDA tile engine (host
// and device code), matched bit for bit by the Triton kernels (tl.philox: the same round
// constants and key schedule, seed split into key = (low 32 bits, high 32 bits)) and by
// the foreach fallback's torch ops (ema_fused/backends/stochastic.py).
//
// The random bits are a pure function of (seed, offset, position, element): Philox's
// key is the 64-bit seed, its counter (c0, c1, c2, c3) = (element / 8, position, low and
// high 32 bits of offset).  Position is the pair's index in the caller's list, offset
// the caller's step.  One draw gives 128 bits, 16 for each of 8 consecutive elements
// (element e takes bits 16 * (e % 8) .. 16 * (e % 8) + 15 of the draw read as a
// little-endian 128-bit number: word (e % 8) / 2, half e % 2).  16 bits are exactly the
// bits a bf16 result drops from fp32, and more than a normal fp16 result drops (13).
//
// The rounding (one rule for both formats): the magnitude is rounded toward zero to the
// 16-bit grid, and one ulp is added when frac16 + r >= 2^16, where r is the element's 16
// random bits and frac16 the dropped remainder in units of 2^-16 ulp, truncated.  So the
// chance of rounding up is frac16 / 2^16: exactly the remainder's share of the ulp for
// every bf16 result and every normal fp16 result (they drop 16 and 13 bits); an fp16
// subnormal result (|x| < 2^-14) drops more bits and is rounded up with the remainder
// truncated to 16 bits (low by less than 2^-16 ulp = 2^-40).  Elsewhere as nearest:
// NaN gives the canonical NaN, +-Inf stays, -0 stays -0, and a finite value beyond the
// largest finite 16-bit value rounds as nearest does (to that value, or to Inf from the
// halfway point on), never at random: a random Inf would end the average.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define EMA_SR_HD __host__ __device__ __forceinline__
#else
#define EMA_SR_HD inline
#endif

namespace ema_fused {
namespace sr {

constexpr int kPerDraw = 8;  // elements one Philox draw serves
// Philox4x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11):
// round multipliers and Weyl key increments, as in Triton's random.py and Random123.
constexpr uint32_t kMulA = 0xD2511F53u, kMulB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
constexpr int kRounds = 10;
// The largest element index the counter takes (c0 holds element / 8 in 32 bits).
constexpr int64_t kMaxElements = int64_t(kPerDraw) << 32;

// One 128-bit draw.  Named words, not an array: a run-time index into an array would put
// it in local memory on the GPU.
struct Draw {
  uint32_t w0, w1, w2, w3;
};

// What a call's draws share: the key (seed) and the counter words other than c0.
struct Stream {
  uint32_t k0, k1;        // seed, low and high 32 bits
  uint32_t position;      // c1
  uint32_t off_lo, off_hi;  // c2, c3
};

// The functions have internal linkage in every host translation unit: the CPU loops are
// also compiled for AVX2 / AVX-512 in their own units (cpu_stochastic_avx*.cpp), and a
// shared inline copy could lend those instructions to a caller on any CPU.
namespace {

EMA_SR_HD Stream stream_of(uint64_t seed, uint64_t offset, uint32_t position) {
  return {uint32_t(seed), uint32_t(seed >> 32), position, uint32_t(offset), uint32_t(offset >> 32)};
}

EMA_SR_HD uint32_t mul_hi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * b) >> 32);
#endif
}

// Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1).
EMA_SR_HD Draw philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    const uint32_t n0 = mul_hi(kMulB, c2) ^ c1 ^ k0;
    const uint32_t n2 = mul_hi(kMulA, c0) ^ c3 ^ k1;
    c1 = kMulB * c2;
    c3 = kMulA * c0;
    c0 = n0;
    c2 = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return {c0, c1, c2, c3};
}

// The draw that serves element `group * 8 .. group * 8 + 7`.
EMA_SR_HD Draw draw(const Stream& st, uint64_t group) {
  return philox(uint32_t(group), st.position, st.off_lo, st.off_hi, st.k0, st.k1);
}

// Element e's 16 bits of its draw: lane = e % 8 (selects, no array index).
EMA_SR_HD uint32_t bits16(const Draw& d, uint32_t lane) {
  const uint32_t word = lane & 4 ? (lane & 2 ? d.w3 : d.w2) : (lane & 2 ? d.w1 : d.w0);
  return (word >> (16 * (lane & 1))) & 0xffffu;
}

EMA_SR_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

// c ? a : b as a bit mask: GCC turns ?: into branches, which stop the CPU loops'
// vectorisation (nvcc makes the same selects of either form).
EMA_SR_HD uint32_t pick(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - uint32_t(c);
  return (a & m) | (b & ~m);
}

// bf16 bits of x, rounded stochastically with the 16 random bits r (see the top).
EMA_SR_HD uint16_t round_bf16(float x, uint32_t r) {
  const uint32_t u = float_bits(x), a = u & 0x7fffffffu;
  const uint32_t random = (u + r) >> 16;                                // carry: up one ulp
  const uint32_t nearest = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;      // as the nearest path
  const uint32_t out = pick(a > 0x7f7f0000u, nearest, random);  // beyond the largest bf16, Inf
  return uint16_t(pick(a > 0x7f800000u, 0x7fc0u, out));          // NaN
}

// fp16 bits of x, rounded stochastically with the 16 random bits r (see the top).
EMA_SR_HD uint16_t round_f16(float x, uint32_t r) {
  const uint32_t u = float_bits(x), a = u & 0x7fffffffu;
  // normal result (|x| >= 2^-14): rebias the exponent, 13 bits dropped: the top 13 of r
  const uint32_t normal = (a - 0x38000000u + (r >> 3)) >> 13;
  // subnormal result: units of 2^-24.  |x| = m * 2^(max(e, 1) - 150) (m with its implicit
  // bit), so in those units |x| = m / 2^shift, shift = 126 - max(e, 1) >= 14, and
  // q = floor(m * 2^(16 - shift)) = (m << 8) >> (shift - 8) is the result's units with
  // 16 bits of remainder below them (m < 2^24: m << 8 fits in 32 bits).
  const uint32_t e = a >> 23;
  const uint32_t m = (a & 0x7fffffu) | pick(e != 0, 0x800000u, 0u);
  const uint32_t count = 118u - pick(e != 0, e, 1u);  // shift - 8 (wraps above e = 118)
  const uint32_t q = pick(count < 32u, (m << 8) >> (count & 31u), 0u);  // count >= 32: 0
  uint32_t out = pick(a < 0x38800000u, (q + r) >> 16, normal);
  out = pick(a > 0x477fe000u, pick(a >= 0x477ff000u, 0x7c00u, 0x7bffu), out);  // > 65504, Inf
  out = pick(a > 0x7f800000u, 0x7e00u, out);                                   // NaN
  return uint16_t(out | ((u >> 16) & 0x8000u));
}

// A product that the compiler cannot contract with the sum it feeds into an FMA (on the
// host: an empty asm makes it opaque, whatever -ffp-contract or the target says).
EMA_SR_HD float product(float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(x, y);
#else
  float p = x * y;
#if defined(__GNUC__) && defined(__x86_64__)
  asm("" : "+x"(p));
#elif defined(__GNUC__) && defined(__aarch64__)
  asm("" : "+w"(p));
#else
  volatile float opaque = p;
  p = opaque;
#endif
  return p;
#endif
}

// The update's fp32 result with each product and sum rounded (no FMA), so that every
// compiler, CPU and backend computes the same value before the rounding: the two-sided
// lerp of torch.lerp for 0 < w < 1 (1 - w is exact for w >= 0.5).  The SIMD loops
// (cpu_stochastic_simd.h) and Triton (enable_fp_fusion=False) compute the same.
EMA_SR_HD float lerp_unfused(float a, float b, float w) {
  const float d = b - a;
  return w < 0.5f ? a + product(w, d) : b - product(1.0f - w, d);
}

}  // namespace
}  // namespace sr
}  // namespace ema_fused
