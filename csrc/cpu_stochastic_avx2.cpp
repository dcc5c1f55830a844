// The stochastic update's AVX2 loops (cpu_stochastic_simd.h), compiled for AVX2 + F16C
// here only: everything after the pragma, in an unnamed namespace, so that no function
// built for AVX2 is shared with code that runs on any CPU.
#include <immintrin.h>

#include <cstdint>

#include "cpu_stochastic.h"

#if defined(__GNUC__) && defined(__x86_64__)
#pragma GCC optimize("fp-contract=off")  // the update's products and sums rounded one by one
#pragma GCC target("avx2,f16c")
#define EMA_FUSED_SR_AVX2 1
#include "cpu_stochastic_simd.h"

ema_fused::SrSimd ema_fused::sr_simd_avx2(int code_s, int code_p, bool finite) {
  return simd_for<Avx2>(code_s, code_p, finite);
}
#else
ema_fused::SrSimd ema_fused::sr_simd_avx2(int, int, bool) { return {nullptr, 0}; }
#endif
