// What the stochastic update's CPU units share (cpu_stochastic.cpp, its SIMD bodies in
// cpu_stochastic_avx512.cpp / cpu_stochastic_avx2.cpp, and cpu_multi_shadow.cpp): one
// span of a pair, and the loops over it.
#pragma once

#include <cstdint>

#include "stochastic.h"

namespace ema_fused {

// Elements [0, n) of shadow s and param p; element i is element first + i of the pair's
// tensor (its random bits: stochastic.h).  0 < w < 1.
struct SrSpan {
  void* s;
  const void* p;
  int64_t n;
  uint64_t first;
  sr::Stream st;
  float w;
};

// Elements [begin, end) of a span; first + begin a multiple of 8, end - begin of `block`.
using SrBody = void (*)(const SrSpan&, int64_t begin, int64_t end);
struct SrSimd {
  SrBody body;    // nullptr: none for this CPU or build
  int64_t block;  // elements per step of the body
};

// The SIMD bodies for a (shadow code, param code, skip_nonfinite); the shadow is bf16 (1)
// or fp16 (2).  Defined where the build can make them (GCC/Clang on x86-64), else they
// return no body; call each only on a CPU that has its instruction set.
SrSimd sr_simd_avx512(int code_s, int code_p, bool finite);
SrSimd sr_simd_avx2(int code_s, int code_p, bool finite);

// The loops of one (shadow, param, skip_nonfinite): a scalar head up to a multiple of 8
// elements, the SIMD body where the CPU has one, a scalar tail.
struct SrKernel {
  SrBody scalar;
  SrSimd simd;
  void run(const SrSpan& span) const;
};

// The kernel for these codes with the best instruction set this CPU has (or the one the
// environment variable EMA_FUSED_SR_ISA names: "scalar", "avx2", "avx512"; the tests run
// each, as each must give the same bits).
SrKernel sr_kernel(int code_s, int code_p, bool finite);

}  // namespace ema_fused
