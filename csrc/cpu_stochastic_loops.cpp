// The stochastic update's CPU loops over one span of a pair (cpu_stochastic.h): a scalar
// loop (stochastic.h's functions, one Philox draw per 8 elements) for the heads and tails
// of spans and for CPUs without AVX2, and the choice of the SIMD body
// (cpu_stochastic_avx512.cpp, cpu_stochastic_avx2.cpp) by what the CPU has.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "cpu_ranges.h"
#include "cpu_stochastic.h"

namespace ema_fused {
namespace {

// One element type's load and stochastic store (the loads: cpu_ranges.h, exact).
struct SrBF16 {
  using Raw = uint16_t;
  static float load(uint16_t v) { return BF16::load(v); }
  static uint16_t round(float x, uint32_t r) { return sr::round_bf16(x, r); }
};
struct SrF16 {
  using Raw = uint16_t;
  static float load(uint16_t v) { return F16::load(v); }
  static uint16_t round(float x, uint32_t r) { return sr::round_f16(x, r); }
};

// Elements [begin, end) of a span, one draw per group of 8 elements.
template <typename S, typename P, bool kFinite>
void scalar_body(const SrSpan& sp, int64_t begin, int64_t end) {
  auto* s = static_cast<uint16_t*>(sp.s);
  const auto* p = static_cast<const typename P::Raw*>(sp.p);
  for (int64_t i = begin; i < end;) {
    const uint64_t e = sp.first + static_cast<uint64_t>(i);
    const sr::Draw d = sr::draw(sp.st, e >> 3);
    const int64_t stop = std::min<int64_t>(end, i + static_cast<int64_t>(8 - (e & 7)));
    for (; i < stop; ++i) {
      const float b = P::load(p[i]);
      const uint32_t r = sr::bits16(d, static_cast<uint32_t>(sp.first + static_cast<uint64_t>(i)) & 7u);
      const uint16_t out = S::round(sr::lerp_unfused(S::load(s[i]), b, sp.w), r);
      s[i] = kFinite && !finite_bits(b) ? s[i] : out;
    }
  }
}

template <typename S, typename P>
SrBody scalar_of(bool finite) {
  return finite ? scalar_body<S, P, true> : scalar_body<S, P, false>;
}

template <typename S>
SrBody scalar_row(int code_p, bool finite) {
  return code_p == 0 ? scalar_of<S, F32>(finite)
                     : code_p == 1 ? scalar_of<S, BF16>(finite) : scalar_of<S, F16>(finite);
}

enum class Isa { Scalar, Avx2, Avx512 };

Isa best_isa() {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  static const Isa best = __builtin_cpu_supports("avx512f")
                              ? Isa::Avx512
                              : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"))
                                    ? Isa::Avx2
                                    : Isa::Scalar;
  return best;
#else
  return Isa::Scalar;
#endif
}

// EMA_FUSED_SR_ISA may ask for a narrower set than the CPU has (the tests compare them;
// every AVX-512 CPU also has AVX2 and F16C).
Isa chosen_isa() {
  const Isa best = best_isa();
  const char* env = std::getenv("EMA_FUSED_SR_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  TORCH_CHECK(want == "scalar" || want == "avx2" || want == "avx512",
              "EMA_FUSED_SR_ISA must be scalar, avx2 or avx512, got '", want, "'");
  const Isa asked = want == "scalar" ? Isa::Scalar : want == "avx2" ? Isa::Avx2 : Isa::Avx512;
  TORCH_CHECK(asked <= best, "EMA_FUSED_SR_ISA=", want, ": this CPU (or build) does not have it");
  return asked;
}

}  // namespace

void SrKernel::run(const SrSpan& span) const {
  const int64_t n = span.n;
  int64_t head = static_cast<int64_t>((8 - (span.first & 7)) & 7);
  head = std::min(head, n);
  scalar(span, 0, head);
  int64_t body_end = head;
  if (simd.body != nullptr) {
    body_end = head + (n - head) / simd.block * simd.block;
    if (body_end > head) simd.body(span, head, body_end);
  }
  scalar(span, body_end, n);
}

SrKernel sr_kernel(int code_s, int code_p, bool finite) {
  SrKernel k{code_s == 1 ? scalar_row<SrBF16>(code_p, finite)  // codes: multi_tensor.h
                                 : scalar_row<SrF16>(code_p, finite),
             {nullptr, 0}};
  switch (chosen_isa()) {
    case Isa::Avx512: k.simd = sr_simd_avx512(code_s, code_p, finite); break;
    case Isa::Avx2: k.simd = sr_simd_avx2(code_s, code_p, finite); break;
    default: break;
  }
  return k;
}

}  // namespace ema_fused
