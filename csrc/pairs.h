// Checks shared by the kernel ops: every pair before anything is written, with
// messages that name the index and both sides.  Returns the pairs as the table
// engine (multi_tensor.h) sees them.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <list>
#include <mutex>
#include <vector>

#include "multi_tensor.h"

namespace ema_fused {

inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kFloat;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kHalf;
    default: return -1;
  }
}

// The two lists' names in messages, as the kernel ops' schemas call them.
struct ListNames {
  const char* first;
  const char* second;
};

inline ListNames names_of(Kind kind) {
  switch (kind) {
    case Kind::Update:
    case Kind::UpdateFinite:
    case Kind::CopyFinite: return {"shadows", "params"};
    case Kind::Copy: return {"dst", "src"};
    case Kind::Accumulate: return {"out", "inputs"};
    default: return {"a", "b"};
  }
}

// Whether the tensor's elements lie inside its storage (a storage resized to 0 keeps
// the tensor's sizes but not its memory).
inline bool fits_storage(const at::Tensor& t) {
  return t.has_storage() &&
         (t.storage_offset() + t.numel()) * static_cast<int64_t>(t.element_size()) <=
             static_cast<int64_t>(t.storage().nbytes());
}

inline bool element_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % t.element_size() == 0;
}

// All pairs must be on `device` (for CUDA: the first tensor's device), of equal
// shapes, contiguous, float32/bfloat16/float16 (equal dtypes for a swap, a float32
// first side for an accumulation), at addresses
// that are multiples of their element size, and the two sides of a pair must not
// partially overlap (the same tensor on both sides is fine).  Empty pairs, and pairs
// whose two sides are one tensor under an update or a swap (nothing changes), are left
// out of the result.  The second list is only read, except by a swap: const_data_ptr
// leaves a copy-on-write tensor unmaterialised.
inline std::vector<Pair> check_pairs(const char* op, at::TensorList a, at::TensorList b, Kind kind,
                                     const at::Device& device) {
  TORCH_CHECK(a.size() == b.size(), op, ": the first list has ", a.size(),
              " tensors but the second has ", b.size());
  std::vector<Pair> pairs;
  pairs.reserve(a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const at::Tensor& x = a[i];
    const at::Tensor& y = b[i];
    TORCH_CHECK(x.defined() && y.defined(), op, ": tensors[", i, "] is undefined");
    TORCH_CHECK(x.device() == device && y.device() == device, op, ": tensors[", i, "] are on ",
                x.device(), " and ", y.device(), "; this call runs on ", device);
    TORCH_CHECK(x.sizes() == y.sizes(), op, ": tensors[", i, "] have shapes ", x.sizes(), " and ",
                y.sizes());
    TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), op, ": tensors[", i,
                "] must be contiguous (got strides ", x.strides(), " and ", y.strides(), ")");
    const int ca = dtype_code(x.scalar_type()), cb = dtype_code(y.scalar_type());
    TORCH_CHECK(ca >= 0 && cb >= 0, op, ": tensors[", i, "] have dtypes ", x.scalar_type(), " and ",
                y.scalar_type(), "; only float32, bfloat16 and float16 are supported");
    TORCH_CHECK(kind != Kind::Swap || ca == cb, op, ": tensors[", i, "] have dtypes ",
                x.scalar_type(), " and ", y.scalar_type(), "; swapping needs equal dtypes");
    TORCH_CHECK(kind != Kind::Accumulate || ca == kFloat, op, ": out[", i, "] has dtype ",
                x.scalar_type(), "; a weighted sum accumulates into float32 only");
    TORCH_CHECK(x.numel() < (int64_t(1) << 32) * kTile, op, ": tensors[", i, "] has ", x.numel(),
                " elements, more than this kernel's tile table can address");
    if (x.numel() == 0) continue;  // nothing to do, and no table row needed
    TORCH_CHECK(fits_storage(x) && fits_storage(y), op, ": tensors[", i,
                "] reach past the end of their storage (freed or resized, e.g. by FSDP?)");
    TORCH_CHECK(element_aligned(x) && element_aligned(y), op, ": tensors[", i,
                "] start at addresses that are not multiples of their element sizes");
    TORCH_CHECK_VALUE(at::get_overlap_status(x, y) != at::MemOverlapStatus::Partial, op,
                      ": tensors[", i, "] partially overlap");
    const void* yp = kind == Kind::Swap ? y.data_ptr() : y.const_data_ptr();
    // (a += s * a does change a: an accumulation keeps such a pair)
    if (kind != Kind::Copy && kind != Kind::Accumulate && x.const_data_ptr() == yp && ca == cb) {
      continue;
    }
    pairs.push_back({x.data_ptr(), yp, x.numel(), ca, cb, static_cast<int>(x.element_size()),
                     static_cast<int>(y.element_size()), static_cast<int64_t>(i)});
  }
  return pairs;
}

// One launch writes every pair at once, so a call whose pairs share memory would race:
// refuse a destination that overlaps another pair's destination, or another pair's
// source (the same tensor twice, views of one flat buffer).  Within one pair,
// check_pairs has already allowed only the very same tensor on both sides.  The
// intervals are sorted once, so this costs O(n log n) for n pairs and nothing per element.
inline void check_overlaps(const char* op, const std::vector<Pair>& pairs, Kind kind) {
  struct Span {
    uintptr_t lo, hi;
    int64_t index;
    bool second, written;
  };
  const ListNames names = names_of(kind);
  std::vector<Span> spans;
  spans.reserve(2 * pairs.size());
  for (const Pair& p : pairs) {
    const auto a = reinterpret_cast<uintptr_t>(p.a), b = reinterpret_cast<uintptr_t>(p.b);
    spans.push_back({a, a + static_cast<uintptr_t>(p.numel * p.size_a), p.index, false, true});
    spans.push_back({b, b + static_cast<uintptr_t>(p.numel * p.size_b), p.index, true,
                     kind == Kind::Swap});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& x, const Span& y) { return x.lo < y.lo; });
  std::vector<const Span*> open;  // spans that reach past the current start
  for (const Span& s : spans) {
    open.erase(std::remove_if(open.begin(), open.end(),
                              [&](const Span* o) { return o->hi <= s.lo; }),
               open.end());
    for (const Span* o : open) {
      if (o->index == s.index || !(o->written || s.written)) continue;
      const Span* x = o->index < s.index ? o : &s;  // name the lower index first
      const Span* y = x == o ? &s : o;
      const char* xn = x->second ? names.second : names.first;
      const char* yn = y->second ? names.second : names.first;
      TORCH_CHECK_VALUE(false, op, ": ", xn, "[", x->index, "] and ", yn, "[", y->index,
                  "] overlap in memory, and ", x->written && y->written ? "both are written"
                                                                        : "one is written",
                  "; one call updates every pair at once, so they would race (pass each "
                  "destination once, in memory of its own)");
    }
    open.push_back(&s);
  }
}

// Everything check_overlaps depends on: every pair's addresses, size and dtypes, and
// whether the second list is written (a swap).  The CUDA table cache uses it as its key.
inline std::vector<int64_t> key_of(const std::vector<Pair>& pairs, int64_t device_index,
                                   Kind kind) {
  std::vector<int64_t> key;
  key.reserve(2 + 3 * pairs.size());
  key.push_back(device_index);
  key.push_back(kind == Kind::Swap);
  for (const Pair& p : pairs) {
    key.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.a)));
    key.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.b)));
    key.push_back(p.numel * 16 + p.code_a * 4 + p.code_b);
  }
  return key;
}

// The last few keys of tensor sets that passed an overlap check, for callers without a
// table cache (the CPU kernels): an unchanged set (every EMA update) costs a comparison
// of its key instead of a sort (500 pairs of 16 elements on the 2-core VM,
// kernel_update_ per call: 110 us without an overlap check, 130 us sorting every call,
// 121 us with this cache).
class RecentlyChecked {
 public:
  // Runs `run_check` unless `key` passed before; remembers it once that returned.
  template <typename Check>
  void check(std::vector<int64_t> key, Check&& run_check) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = keys_.begin(); it != keys_.end(); ++it) {
        if (*it == key) {
          keys_.splice(keys_.begin(), keys_, it);
          return;
        }
      }
    }
    run_check();
    std::lock_guard<std::mutex> lock(mutex_);
    keys_.push_front(std::move(key));
    if (keys_.size() > kSets) keys_.pop_back();
  }

 private:
  static constexpr size_t kSets = 8;
  std::mutex mutex_;
  std::list<std::vector<int64_t>> keys_;  // most recently used first
};

// check_overlaps of pair sets, remembered.
class CheckedPairSets {
 public:
  void check(const char* op, const std::vector<Pair>& pairs, Kind kind) {
    recent_.check(key_of(pairs, -1, kind), [&] { check_overlaps(op, pairs, kind); });
  }

 private:
  RecentlyChecked recent_;
};

}  // namespace ema_fused
