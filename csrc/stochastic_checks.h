// The stochastic update ops' own checks (kernel_update_stochastic_ and
// kernel_multi_update_stochastic_, CPU and CUDA alike), before anything is written.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <vector>

#include "pairs.h"
#include "stochastic.h"

namespace ema_fused {

// One position and one start per tensor of `tensors` (the pairs' first list, or the
// params of a multi update); positions 32-bit; every element index, start included,
// inside the counter's range (2^35 elements).
inline void check_counters(const char* op, at::TensorList tensors, at::IntArrayRef positions,
                           at::IntArrayRef starts) {
  TORCH_CHECK_VALUE(positions.size() == tensors.size() && starts.size() == tensors.size(), op,
                    ": ", tensors.size(), " tensors but ", positions.size(), " positions and ",
                    starts.size(), " starts (one of each per pair)");
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_VALUE(positions[i] >= 0 && positions[i] < (int64_t(1) << 32), op,
                      ": positions[", i, "] = ", positions[i], " is not in [0, 2^32)");
    TORCH_CHECK_VALUE(starts[i] >= 0 && tensors[i].defined() &&
                          starts[i] + tensors[i].numel() <= sr::kMaxElements,
                      op, ": tensors[", i, "] with start ", starts[i],
                      " reach past element 2^35, the last one the random counter addresses");
  }
}

// Stochastic rounding is for 16-bit shadows (the Python layer sends wider ones to the
// nearest update: there is nothing to round).
inline void check_rounded(const char* op, const std::vector<Pair>& pairs) {
  for (const Pair& p : pairs) {
    TORCH_CHECK(p.code_a != kFloat, op, ": shadows[", p.index,
                "] is float32; stochastic rounding is for bfloat16 and float16 shadows");
  }
}

// Every moving profile's pairs of a multi update (`plan`: multi_checks.h's MultiPlan).
template <typename Plan>
inline void check_rounded_profiles(const char* op, const Plan& plan) {
  for (size_t j = 0; j < plan.active.size(); ++j) {
    for (const Pair& q : plan.pairs[j]) {
      TORCH_CHECK(q.code_a != kFloat, op, ": shadows[", plan.active[j], "][", q.index,
                  "] is float32; stochastic rounding is for bfloat16 and float16 shadows");
    }
  }
}

}  // namespace ema_fused
