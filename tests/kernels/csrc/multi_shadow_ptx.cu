// Compiled to PTX and SASS by tests/kernels/test_multi_shadow_ptx.py (nvcc, no GPU needed): the
// multi-shadow kernel exactly as cuda_multi_shadow.cu launches it, and one probe per
// (shadow dtype, param dtype, path, kind) that runs one profile's full tile from the
// param's registers, so each path's global accesses can be counted.
#include "multi_shadow.h"

#define EMA_MULTI_PROBE(kind, s_name, S, p_name, P, path, vec)                              \
  extern "C" __global__ void multi_##kind##_##s_name##_##p_name##_##path(                  \
      S* __restrict__ s, const P* __restrict__ p, float w) {                               \
    ema_fused::Vec<P> vp[ema_fused::kUnroll];                                              \
    ema_fused::load_param<P, vec>(p, threadIdx.x, vp);                                     \
    ema_fused::shadow_full<ema_fused::Kind::kind, S, vec>(s, vp, threadIdx.x, w);          \
  }
#define EMA_MULTI_PATHS(kind, s_name, S, p_name, P)             \
  EMA_MULTI_PROBE(kind, s_name, S, p_name, P, vector, true)     \
  EMA_MULTI_PROBE(kind, s_name, S, p_name, P, scalar, false)
#define EMA_MULTI_PROBES(kind)                                          \
  EMA_MULTI_PATHS(kind, f32, float, f32, float)                         \
  EMA_MULTI_PATHS(kind, f32, float, bf16, c10::BFloat16)                \
  EMA_MULTI_PATHS(kind, f32, float, f16, c10::Half)                     \
  EMA_MULTI_PATHS(kind, bf16, c10::BFloat16, f32, float)                \
  EMA_MULTI_PATHS(kind, bf16, c10::BFloat16, bf16, c10::BFloat16)       \
  EMA_MULTI_PATHS(kind, bf16, c10::BFloat16, f16, c10::Half)            \
  EMA_MULTI_PATHS(kind, f16, c10::Half, f32, float)                     \
  EMA_MULTI_PATHS(kind, f16, c10::Half, bf16, c10::BFloat16)            \
  EMA_MULTI_PATHS(kind, f16, c10::Half, f16, c10::Half)
EMA_MULTI_PROBES(Update)
EMA_MULTI_PROBES(Copy)

// The stochastic update's full tile of one profile (16-bit shadows): the same accesses,
// the random bits from registers.
#define EMA_MULTI_SR_PROBE(s_name, S, p_name, P, path, vec)                                  \
  extern "C" __global__ void multi_stochastic_##s_name##_##p_name##_##path(                \
      S* __restrict__ s, const P* __restrict__ p, float w, ema_fused::RandomKey key) {     \
    ema_fused::Vec<P> vp[ema_fused::kUnroll];                                              \
    ema_fused::load_param<P, vec>(p, threadIdx.x, vp);                                     \
    const ema_fused::Stochastic round{{key.k0, key.k1, 3u, key.off_lo, key.off_hi}, 0};    \
    ema_fused::shadow_full<ema_fused::Kind::Update, S, vec>(s, vp, threadIdx.x, w, round, 0); \
  }
#define EMA_MULTI_SR_PATHS(s_name, S, p_name, P)              \
  EMA_MULTI_SR_PROBE(s_name, S, p_name, P, vector, true)      \
  EMA_MULTI_SR_PROBE(s_name, S, p_name, P, scalar, false)
EMA_MULTI_SR_PATHS(bf16, c10::BFloat16, f32, float)
EMA_MULTI_SR_PATHS(bf16, c10::BFloat16, bf16, c10::BFloat16)
EMA_MULTI_SR_PATHS(bf16, c10::BFloat16, f16, c10::Half)
EMA_MULTI_SR_PATHS(f16, c10::Half, f32, float)
EMA_MULTI_SR_PATHS(f16, c10::Half, bf16, c10::BFloat16)
EMA_MULTI_SR_PATHS(f16, c10::Half, f16, c10::Half)
