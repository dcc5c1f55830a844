// Compiled to PTX and SASS by tests/kernels/test_cuda_ptx.py (nvcc, no GPU needed): every
// kernel exactly as cuda_kernels.cu launches them, and one probe per (kind, dtype pair)
// that runs only the full-tile path, so each path's global accesses can be counted.
#include "multi_tensor.h"

namespace ema_fused {
template __global__ void tiles_kernel<Kind::Update>(const int64_t*, int64_t, float, const float*);
template __global__ void tiles_kernel<Kind::Copy>(const int64_t*, int64_t, float, const float*);
template __global__ void tiles_kernel<Kind::Swap>(const int64_t*, int64_t, float, const float*);
template __global__ void tiles_kernel<Kind::UpdateFinite>(const int64_t*, int64_t, float,
                                                          const float*);
template __global__ void tiles_kernel<Kind::Accumulate>(const int64_t*, int64_t, float,
                                                        const float*);
template __global__ void stochastic_tiles_kernel<Kind::Update>(const int64_t*, int64_t, float,
                                                               RandomKey);
template __global__ void stochastic_tiles_kernel<Kind::UpdateFinite>(const int64_t*, int64_t, float,
                                                                     RandomKey);
}  // namespace ema_fused

#define EMA_PROBE_ONE(kind, a_name, A, b_name, B, path, vector_b)                           \
  extern "C" __global__ void full_##kind##_##a_name##_##b_name##_##path(A* a, B* b, float s) { \
    ema_fused::full_tile<ema_fused::Kind::kind, vector_b>(a, b, threadIdx.x, s);            \
  }
#define EMA_PROBE(kind, a_name, A, b_name, B)                  \
  EMA_PROBE_ONE(kind, a_name, A, b_name, B, vector, true)      \
  EMA_PROBE_ONE(kind, a_name, A, b_name, B, scalar_b, false)
#define EMA_PROBES(kind)                                         \
  EMA_PROBE(kind, f32, float, f32, float)                        \
  EMA_PROBE(kind, f32, float, bf16, c10::BFloat16)               \
  EMA_PROBE(kind, f32, float, f16, c10::Half)                    \
  EMA_PROBE(kind, bf16, c10::BFloat16, f32, float)               \
  EMA_PROBE(kind, bf16, c10::BFloat16, bf16, c10::BFloat16)      \
  EMA_PROBE(kind, bf16, c10::BFloat16, f16, c10::Half)           \
  EMA_PROBE(kind, f16, c10::Half, f32, float)                    \
  EMA_PROBE(kind, f16, c10::Half, bf16, c10::BFloat16)           \
  EMA_PROBE(kind, f16, c10::Half, f16, c10::Half)
EMA_PROBES(Update)
EMA_PROBES(Copy)
EMA_PROBES(UpdateFinite)
EMA_PROBES(CopyFinite)
EMA_PROBE(Accumulate, f32, float, f32, float)
EMA_PROBE(Accumulate, f32, float, bf16, c10::BFloat16)
EMA_PROBE(Accumulate, f32, float, f16, c10::Half)
EMA_PROBE(Swap, u32, uint32_t, u32, uint32_t)
EMA_PROBE(Swap, u16, uint16_t, u16, uint16_t)

// The stochastic update's full tiles (16-bit shadows): the same accesses as the nearest
// probes above, the random bits from registers.
#define EMA_SR_PROBE_ONE(kind, a_name, A, b_name, B, path, vector_b)                          \
  extern "C" __global__ void stochastic_##kind##_##a_name##_##b_name##_##path(                \
      A* a, B* b, float s, ema_fused::RandomKey key, int64_t first) {                        \
    const ema_fused::Stochastic round{{key.k0, key.k1, 7u, key.off_lo, key.off_hi}, 0};       \
    ema_fused::full_tile<ema_fused::Kind::kind, vector_b>(a, b, threadIdx.x, s, round, first); \
  }
#define EMA_SR_PROBE(kind, a_name, A, b_name, B)                  \
  EMA_SR_PROBE_ONE(kind, a_name, A, b_name, B, vector, true)      \
  EMA_SR_PROBE_ONE(kind, a_name, A, b_name, B, scalar_b, false)
#define EMA_SR_PROBES(kind)                                       \
  EMA_SR_PROBE(kind, bf16, c10::BFloat16, f32, float)             \
  EMA_SR_PROBE(kind, bf16, c10::BFloat16, bf16, c10::BFloat16)    \
  EMA_SR_PROBE(kind, bf16, c10::BFloat16, f16, c10::Half)         \
  EMA_SR_PROBE(kind, f16, c10::Half, f32, float)                  \
  EMA_SR_PROBE(kind, f16, c10::Half, bf16, c10::BFloat16)         \
  EMA_SR_PROBE(kind, f16, c10::Half, f16, c10::Half)
EMA_SR_PROBES(Update)
EMA_SR_PROBES(UpdateFinite)
