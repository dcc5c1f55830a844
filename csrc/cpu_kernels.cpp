// C++ CPU kernels: every pair in one parallel pass, no temporaries, fp32 math.
//
// Bytes per element: update, bf16 param + fp32 shadow: 2 + 4 + 4 = 10; fp32: 12.  The
// foreach fallback casts bf16 params into a temporary first (2 + 4 written + 4 read
// back, plus the shadow's 8).  For fp32, torch._foreach_lerp_ moves the same 12 bytes
// at the memory bandwidth already (~52 GB/s, like _foreach_add_, on the 2-core AMD
// EPYC VM measured here: 336.7M LLaMA-shaped elements, paired runs in one process),
// so the aim is parity.  The first version took 1.13-1.17x lerp's time; now 0.95-1.00x
// (the parallel pass in cpu_parallel.h, the loops' clones in cpu_ranges.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu_parallel.h"
#include "cpu_ranges.h"
#include "pairs.h"

namespace {

using ema_fused::CheckedPairSets;
using ema_fused::check_pairs;
using ema_fused::Chunk;
using ema_fused::Copy;
using ema_fused::Kind;
using ema_fused::kChunk;
using ema_fused::kFloat;
using ema_fused::Pair;
using ema_fused::BF16;
using ema_fused::F16;
using ema_fused::F32;
using ema_fused::RangeFn;
using ema_fused::run;
using ema_fused::swap_range;
using ema_fused::Table;
using ema_fused::Update;
using ema_fused::UpdateFinite;
using ema_fused::CopyFinite;

// out += w * in, out float32: a weighted sum (10 bytes per element for a bf16 input).
template <typename P>
EMA_FUSED_CLONES void accumulate_range(void* o_raw, void* i_raw, int64_t n, float w) {
  auto* __restrict__ o = static_cast<float*>(o_raw);
  const auto* __restrict__ in = static_cast<const typename P::Raw*>(i_raw);
  for (int64_t i = 0; i < n; ++i) o[i] += w * P::load(in[i]);
}

RangeFn range_fn(Kind kind, int a, int b) {
  switch (kind) {
    case Kind::Update: return Table<Update>::get(a, b);
    case Kind::Copy: return Table<Copy>::get(a, b);
    case Kind::UpdateFinite: return Table<UpdateFinite>::get(a, b);
    case Kind::CopyFinite: return Table<CopyFinite>::get(a, b);
    case Kind::Accumulate:  // check_pairs took float32 outs only
      return b == 0 ? accumulate_range<F32> : b == 1 ? accumulate_range<BF16> : accumulate_range<F16>;
    default: return a == kFloat ? swap_range<uint32_t> : swap_range<uint16_t>;
  }
}

// Every pair is checked (pairs.h), the pairs against each other too (the chunks run in
// parallel, so overlapping pairs would race), before anything is written; then they are
// cut into chunks.  `names` names the lists in messages (an update with weight 1 runs
// the copy kernels).
std::vector<Chunk> plan(const char* op, at::TensorList a, at::TensorList b, Kind kind,
                        Kind names) {
  const std::vector<Pair> pairs = check_pairs(op, a, b, names, at::Device(at::kCPU));
  static CheckedPairSets checked;
  checked.check(op, pairs, names);
  std::vector<Chunk> chunks;
  for (const Pair& p : pairs) {
    const RangeFn fn = range_fn(kind, p.code_a, p.code_b);
    // only a swap writes through b; the range functions take it as void* alike
    char *xp = static_cast<char*>(p.a), *yp = static_cast<char*>(const_cast<void*>(p.b));
    for (int64_t start = 0; start < p.numel; start += kChunk) {
      chunks.push_back({fn, xp + start * p.size_a, yp + start * p.size_b,
                        std::min(kChunk, p.numel - start)});
    }
  }
  return chunks;
}

// Weight 0 changes nothing (the inputs are still checked; an Inf param must not turn its
// shadow into NaN); weight 1 copies the params exactly, without reading the shadows
// (with skip_nonfinite it reads them, to keep those whose param is not finite).
void update_with(const char* op, at::TensorList shadows, at::TensorList params, float weight,
                 bool skip_nonfinite) {
  const Kind kind = weight == 1.0f ? (skip_nonfinite ? Kind::CopyFinite : Kind::Copy)
                                   : (skip_nonfinite ? Kind::UpdateFinite : Kind::Update);
  std::vector<Chunk> chunks = plan(op, shadows, params, kind, Kind::Update);
  if (weight != 0.0f) run(std::move(chunks), weight);
}

void kernel_update_cpu(at::TensorList shadows, at::TensorList params, double weight,
                       bool skip_nonfinite) {
  TORCH_CHECK(weight >= 0.0 && weight <= 1.0, "kernel_update_: weight must be in [0, 1], got ",
              weight);
  update_with("kernel_update_", shadows, params, static_cast<float>(weight), skip_nonfinite);
}

// The weight is read here, when the op runs.  Its value is not range-checked: the
// CUDA kernel cannot without a device sync, and both must behave alike (NaN flows).
void kernel_update_graph_safe_cpu(at::TensorList shadows, at::TensorList params,
                                  const at::Tensor& weight, bool skip_nonfinite) {
  TORCH_CHECK(weight.numel() == 1 && weight.scalar_type() == at::kFloat &&
                  weight.device().is_cpu(),
              "kernel_update_graph_safe_: weight must be a 1-element float32 tensor on the "
              "shadows' device (cpu), got a ", weight.scalar_type(), " tensor of ",
              weight.numel(), " elements on ", weight.device());
  update_with("kernel_update_graph_safe_", shadows, params, *weight.const_data_ptr<float>(),
              skip_nonfinite);
}

void kernel_copy_cpu(at::TensorList dst, at::TensorList src, double scale) {
  TORCH_CHECK(scale >= 0.0 && std::isfinite(scale),
              "kernel_copy_: scale must be finite and >= 0, got ", scale);
  run(plan("kernel_copy_", dst, src, Kind::Copy, Kind::Copy), static_cast<float>(scale));
}

void kernel_swap_cpu(at::TensorList a, at::TensorList b) {
  run(plan("kernel_swap_", a, b, Kind::Swap, Kind::Swap), 0.0f);
}

// Any finite weight (negative ones too: post-hoc EMA's solution has them).  Weight 0 adds
// nothing and reads nothing (the inputs are still checked; an Inf input adds no NaN), and
// so does a weight that rounds to 0 in float32, the kernel's math.
void kernel_weighted_sum_cpu(at::TensorList out, at::TensorList inputs, double weight) {
  TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(weight)),
                    "kernel_weighted_sum_: weight must be finite in float32, got ", weight);
  std::vector<Chunk> chunks =
      plan("kernel_weighted_sum_", out, inputs, Kind::Accumulate, Kind::Accumulate);
  if (static_cast<float>(weight) != 0.0f) run(std::move(chunks), static_cast<float>(weight));
}

}  // namespace

TORCH_LIBRARY_IMPL(ema_fused, CPU, m) {
  m.impl("kernel_update_", &kernel_update_cpu);
  m.impl("kernel_update_graph_safe_", &kernel_update_graph_safe_cpu);
  m.impl("kernel_copy_", &kernel_copy_cpu);
  m.impl("kernel_swap_", &kernel_swap_cpu);
  m.impl("kernel_weighted_sum_", &kernel_weighted_sum_cpu);
}
