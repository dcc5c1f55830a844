// C++ CPU kernels: every pair in one parallel region, one pass, no temporaries.
//
// Bytes per element (the bound): update, bf16 param + fp32 shadow: 2 + 4 + 4 = 10;
// fp32 + fp32: 12.  The foreach fallback casts bf16 params into a temporary first
// (2 + 4 written + 4 read back, plus the shadow's 8), so one fused pass moves less.
//
// Work is cut into chunks of at most kChunk elements across all tensors, so that
// at::parallel_for balances a few huge tensors and many small ones alike.  The inner
// loops are plain loops over contiguous memory that the compiler vectorises (-O3);
// bf16/fp16 <-> fp32 use c10's conversions (round to nearest even).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 16;

// Built for AVX2+FMA and for the baseline; the loader picks by the CPU it runs on.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define EMA_FUSED_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define EMA_FUSED_CLONES
#endif

template <typename S, typename P>
EMA_FUSED_CLONES void update_range(void* s_raw, const void* p_raw, int64_t begin, int64_t end, float w) {
  S* __restrict__ s = static_cast<S*>(s_raw);
  const P* __restrict__ p = static_cast<const P*>(p_raw);
  for (int64_t i = begin; i < end; ++i) {
    const float a = static_cast<float>(s[i]);
    s[i] = static_cast<S>(a + w * (static_cast<float>(p[i]) - a));
  }
}

template <typename D, typename S>
EMA_FUSED_CLONES void copy_range(void* d_raw, const void* s_raw, int64_t begin, int64_t end, float scale) {
  D* __restrict__ d = static_cast<D*>(d_raw);
  const S* __restrict__ s = static_cast<const S*>(s_raw);
  for (int64_t i = begin; i < end; ++i) {
    d[i] = static_cast<D>(static_cast<float>(s[i]) * scale);
  }
}

using RangeFn = void (*)(void*, const void*, int64_t, int64_t, float);

int code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: return -1;
  }
}


RangeFn update_fn(int a, int b) {
  static const RangeFn table[3][3] = {
      {update_range<float, float>, update_range<float, c10::BFloat16>, update_range<float, c10::Half>},
      {update_range<c10::BFloat16, float>, update_range<c10::BFloat16, c10::BFloat16>,
       update_range<c10::BFloat16, c10::Half>},
      {update_range<c10::Half, float>, update_range<c10::Half, c10::BFloat16>,
       update_range<c10::Half, c10::Half>}};
  return table[a][b];
}

RangeFn copy_fn(int a, int b) {
  static const RangeFn table[3][3] = {
      {copy_range<float, float>, copy_range<float, c10::BFloat16>, copy_range<float, c10::Half>},
      {copy_range<c10::BFloat16, float>, copy_range<c10::BFloat16, c10::BFloat16>,
       copy_range<c10::BFloat16, c10::Half>},
      {copy_range<c10::Half, float>, copy_range<c10::Half, c10::BFloat16>,
       copy_range<c10::Half, c10::Half>}};
  return table[a][b];
}

struct Chunk {
  RangeFn fn;
  void* a;
  const void* b;
  int64_t begin, end;
};

// Checks every pair before anything is written; names the index and both sides.
std::vector<Chunk> plan(const char* op, at::TensorList a, at::TensorList b, bool update) {
  TORCH_CHECK(a.size() == b.size(), op, ": the first list has ", a.size(),
              " tensors but the second has ", b.size());
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < a.size(); ++i) {
    const at::Tensor& x = a[i];
    const at::Tensor& y = b[i];
    TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), op, ": tensors[", i,
                "] are on ", x.device(), " and ", y.device(), "; this kernel runs on the CPU");
    TORCH_CHECK(x.sizes() == y.sizes(), op, ": tensors[", i, "] have shapes ", x.sizes(),
                " and ", y.sizes());
    TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), op, ": tensors[", i,
                "] must be contiguous (got strides ", x.strides(), " and ", y.strides(), ")");
    const int ca = code(x), cb = code(y);
    TORCH_CHECK(ca >= 0 && cb >= 0, op, ": tensors[", i, "] have dtypes ", x.scalar_type(),
                " and ", y.scalar_type(), "; only float32, bfloat16 and float16 are supported");
    const RangeFn fn = update ? update_fn(ca, cb) : copy_fn(ca, cb);
    const int64_t n = x.numel();
    for (int64_t start = 0; start < n; start += kChunk) {
      chunks.push_back({fn, x.data_ptr(), y.data_ptr(), start, std::min(n, start + kChunk)});
    }
  }
  return chunks;
}

void run(const std::vector<Chunk>& chunks, float scalar) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& k = chunks[c];
      k.fn(k.a, k.b, k.begin, k.end, scalar);
    }
  });
}

void kernel_update_cpu(at::TensorList shadows, at::TensorList params, double weight) {
  TORCH_CHECK(weight >= 0.0 && weight <= 1.0, "kernel_update_: weight must be in [0, 1], got ",
              weight);
  run(plan("kernel_update_", shadows, params, true), static_cast<float>(weight));
}

void kernel_copy_cpu(at::TensorList dst, at::TensorList src, double scale) {
  TORCH_CHECK(scale >= 0.0 && std::isfinite(scale), "kernel_copy_: scale must be finite and >= 0, got ",
              scale);
  run(plan("kernel_copy_", dst, src, false), static_cast<float>(scale));
}

}  // namespace

TORCH_LIBRARY_IMPL(ema_fused, CPU, m) {
  m.impl("kernel_update_", &kernel_update_cpu);
  m.impl("kernel_copy_", &kernel_copy_cpu);
}
