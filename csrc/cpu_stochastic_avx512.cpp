// The stochastic update's AVX-512 loops (cpu_stochastic_simd.h), compiled for AVX-512F
// here only: everything after the pragma, in an unnamed namespace, so that no function
// built for AVX-512 is shared with code that runs on any CPU.
#include <immintrin.h>

#include <cstdint>

#include "cpu_stochastic.h"

#if defined(__GNUC__) && defined(__x86_64__)
#pragma GCC optimize("fp-contract=off")  // the update's products and sums rounded one by one
#pragma GCC target("avx512f")
// GCC 12 warns that the intrinsics' own _mm512_undefined_* placeholders "may be used
// uninitialized" once they are inlined here: their own idiom, not a read of our data.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define EMA_FUSED_SR_AVX512 1
#include "cpu_stochastic_simd.h"

ema_fused::SrSimd ema_fused::sr_simd_avx512(int code_s, int code_p, bool finite) {
  return simd_for<Avx512>(code_s, code_p, finite);
}
#else
ema_fused::SrSimd ema_fused::sr_simd_avx512(int, int, bool) { return {nullptr, 0}; }
#endif
