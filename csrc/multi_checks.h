// Checks of the multi-shadow update (kernel_multi_update_), shared by its CPU and CUDA
// kernels, all before anything is written: the lists' lengths, each weight, every
// (profile k, tensor i) pair through pairs.h's check_pairs (named "profile k:
// tensors[i]"), and every shadow against every other shadow and every param.
//
// Layout: shadows is flat, profile-major: shadows[k * n + i] is profile k's shadow of
// params[i] (a schema cannot hold a list of lists).  One pass writes every profile's
// shadow of an element while it reads the param once, so a shadow may share memory with
// no other shadow and no param at all, not even the very same tensor as its own param
// (the single update lets that through: there it is a no-op; here profile k would write
// what profile k' reads).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <list>
#include <mutex>
#include <string>
#include <vector>

#include "multi_shadow.h"
#include "pairs.h"

namespace ema_fused {

// What the kernels get: the pairs of every profile that moves (weight != 0), position j
// of each list being the same param (empty params are left out, as check_pairs does).
struct MultiPlan {
  std::vector<int> active;                // profile numbers k, in order
  std::vector<float> weights;             // weights[j] of profile active[j]
  std::vector<std::vector<Pair>> pairs;   // pairs[j][r]: profile active[j], param row r
};

inline at::TensorList profile_of(at::TensorList shadows, size_t n, size_t k) {
  return shadows.slice(k * n, n);
}

// Sorted intervals of every non-empty tensor; a clash is two that overlap where at least
// one is a shadow (params are only read, so params may share memory).  O(m log m).
inline void check_multi_overlaps(const char* op, at::TensorList shadows, at::TensorList params) {
  struct Span {
    uintptr_t lo, hi;
    int64_t profile;  // -1 for a param
    int64_t index;
  };
  const size_t n = params.size();
  std::vector<Span> spans;
  spans.reserve(shadows.size() + n);
  auto add = [&](const at::Tensor& t, int64_t profile, int64_t index) {
    if (t.numel() == 0) return;
    const auto lo = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    spans.push_back({lo, lo + static_cast<uintptr_t>(t.numel() * t.element_size()), profile,
                     index});
  };
  for (size_t i = 0; i < n; ++i) add(params[i], -1, static_cast<int64_t>(i));
  for (size_t j = 0; j < shadows.size(); ++j) {
    add(shadows[j], static_cast<int64_t>(j / n), static_cast<int64_t>(j % n));
  }
  std::sort(spans.begin(), spans.end(), [](const Span& x, const Span& y) { return x.lo < y.lo; });
  auto name = [](const Span& s) {
    return s.profile < 0 ? "params[" + std::to_string(s.index) + "]"
                         : "shadows[" + std::to_string(s.profile) + "][" +
                               std::to_string(s.index) + "]";
  };
  std::vector<const Span*> open;  // spans that reach past the current start
  for (const Span& s : spans) {
    open.erase(std::remove_if(open.begin(), open.end(),
                              [&](const Span* o) { return o->hi <= s.lo; }),
               open.end());
    for (const Span* o : open) {
      if (o->profile < 0 && s.profile < 0) continue;
      // shadows first, lower profile and index first: the same message whatever the order
      const Span* x = o;
      const Span* y = &s;
      if (std::make_pair(-(x->profile >= 0), std::make_pair(x->profile, x->index)) >
          std::make_pair(-(y->profile >= 0), std::make_pair(y->profile, y->index))) {
        std::swap(x, y);
      }
      TORCH_CHECK_VALUE(false, op, ": ", name(*x), " and ", name(*y), " overlap in memory, and ",
                        y->profile >= 0 ? "both are written" : "one is written",
                        "; one pass updates every profile's shadows at once, so they would "
                        "race (give every shadow memory of its own, apart from the params)");
    }
    open.push_back(&s);
  }
}

// Everything the overlap check depends on, for callers that remember checked sets.
inline std::vector<int64_t> multi_key(at::TensorList shadows, at::TensorList params) {
  std::vector<int64_t> key;
  key.reserve(2 + 2 * (shadows.size() + params.size()));
  key.push_back(static_cast<int64_t>(shadows.size()));
  key.push_back(static_cast<int64_t>(params.size()));
  for (at::TensorList list : {params, shadows}) {
    for (const at::Tensor& t : list) {
      key.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.const_data_ptr())));
      key.push_back(t.numel() * 16 + t.element_size());
    }
  }
  return key;
}

// check_multi_overlaps for the CPU kernel, remembered (pairs.h's RecentlyChecked).
class CheckedMultiSets {
 public:
  void check(const char* op, at::TensorList shadows, at::TensorList params) {
    recent_.check(multi_key(shadows, params),
                  [&] { check_multi_overlaps(op, shadows, params); });
  }

 private:
  RecentlyChecked recent_;
};

// Lengths, weights and every pair; the overlap check is the caller's (the CPU kernel
// remembers checked sets, the CUDA one decides it with its table cache).
inline MultiPlan check_multi(const char* op, at::TensorList shadows, at::TensorList params,
                             c10::ArrayRef<double> weights, const at::Device& device) {
  const size_t n = params.size(), k_count = weights.size();
  TORCH_CHECK(shadows.size() == n * k_count, op, ": ", shadows.size(), " shadows for ", n,
              " params and ", k_count, " weights; expected ", n * k_count,
              " (profile-major: shadows[k * ", n, " + i] is profile k's shadow of params[i])");
  MultiPlan plan;
  for (size_t k = 0; k < k_count; ++k) {
    const double w = weights[k];
    TORCH_CHECK(w >= 0.0 && w <= 1.0, op, ": weights[", k, "] must be in [0, 1], got ", w);
    const std::string where = std::string(op) + ": profile " + std::to_string(k);
    std::vector<Pair> pairs =
        check_pairs(where.c_str(), profile_of(shadows, n, k), params, Kind::Update, device);
    if (w != 0.0) {
      plan.active.push_back(static_cast<int>(k));
      plan.weights.push_back(static_cast<float>(w));
      plan.pairs.push_back(std::move(pairs));
    }
  }
  return plan;
}

}  // namespace ema_fused
