// Checks shared by the kernel ops: every pair before anything is written, with
// messages that name the index and both sides.  Returns the pairs as the table
// engine (multi_tensor.h) sees them.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

// Whether the tensor's elements lie inside its storage (a storage resized to 0 keeps
// the tensor's sizes but not its memory).
inline bool fits_storage(const at::Tensor& t) {
  return t.has_storage() &&
         (t.storage_offset() + t.numel()) * static_cast<int64_t>(t.element_size()) <=
             static_cast<int64_t>(t.storage().nbytes());
}

// All pairs must be on `device` (for CUDA: the first tensor's device), of equal
// shapes, contiguous, float32/bfloat16/float16 (equal dtypes for a swap), and the two
// sides of a pair must not partially overlap (the same tensor on both sides is fine).
// The second list is only read, except by a swap: const_data_ptr leaves a
// copy-on-write tensor unmaterialised.
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
    TORCH_CHECK(x.numel() < (int64_t(1) << 32) * kTile, op, ": tensors[", i, "] has ", x.numel(),
                " elements, more than this kernel's tile table can address");
    if (x.numel() == 0) continue;  // nothing to do, and no table row needed
    TORCH_CHECK(fits_storage(x) && fits_storage(y), op, ": tensors[", i,
                "] reach past the end of their storage (freed or resized, e.g. by FSDP?)");
    TORCH_CHECK(at::get_overlap_status(x, y) != at::MemOverlapStatus::Partial, op, ": tensors[",
                i, "] partially overlap");
    const void* yp = kind == Kind::Swap ? y.data_ptr() : y.const_data_ptr();
    pairs.push_back({x.data_ptr(), yp, x.numel(), ca, cb,
                     static_cast<int>(x.element_size()), static_cast<int>(y.element_size())});
  }
  return pairs;
}

}  // namespace ema_fused
