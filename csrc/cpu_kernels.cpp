// C++ CPU kernels: every pair in one parallel pass, no temporaries, fp32 math.
//
// Bytes per element: update, bf16 param + fp32 shadow: 2 + 4 + 4 = 10; fp32: 12.  The
// foreach fallback casts bf16 params into a temporary first (2 + 4 written + 4 read
// back, plus the shadow's 8).  For fp32, torch._foreach_lerp_ moves the same 12 bytes
// at the memory bandwidth already (~52 GB/s, like _foreach_add_, on the 2-core AMD
// EPYC VM measured here: 336.7M LLaMA-shaped elements, paired runs in one process),
// so the aim is parity.  The first version took 1.13-1.17x lerp's time; now 0.95-1.00x:
//  * at::parallel_for is an inline template, parallel only where the caller is built
//    with -fopenmp; torch's extension builds do not pass it, so all ran on one thread.
//    run() shares the chunks with torch's inter-op pool instead, whatever the flags.
//  * target_clones("arch=haswell") tests the CPU *model* (Intel Haswell), so AMD and
//    newer Intel CPUs got the SSE2 clone; "arch=x86-64-v3" tests the features (AVX2,
//    FMA, F16C): 94 -> 88 ms on one thread.
//  * Chunks handed out round-robin cost 2% against one contiguous range per thread.
// c10::Half's conversions branch on subnormals, so no fp16 loop vectorised; the exact
// branch-free ones below do (fp16 param, fp32 shadow: 403 -> 78 ms).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "pairs.h"

namespace {

using ema_fused::CheckedPairSets;
using ema_fused::check_pairs;
using ema_fused::Kind;
using ema_fused::kFloat;
using ema_fused::Pair;

// Work is cut into chunks of at most 64K elements (256-768 KB of traffic, ~10-20 us)
// across all tensors: small enough to balance a few huge tensors and many small ones
// alike, big enough that claiming one (an atomic increment) costs nothing.
constexpr int64_t kChunk = 1 << 16;

// GCC < 12 has no "arch=x86-64-v3" clone; "avx2" also tests the feature (no FMA).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define EMA_FUSED_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define EMA_FUSED_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define EMA_FUSED_CLONES
#endif

inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
// c ? a : b as a bit mask: GCC turns plain ?: here into branches (it will not
// speculate the float ops of the other side), and branches stop vectorisation.
inline uint32_t pick(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - uint32_t(c);
  return (a & m) | (b & ~m);
}

// Storage formats: load to fp32 exactly, store from fp32 rounded to nearest even.
// Checked against F16C and a nearest-even reference for all 2^32 floats / 2^16 halves.
struct F32 {
  using Raw = float;
  static float load(float v) { return v; }
  static float store(float f) { return f; }
};
struct BF16 {
  using Raw = uint16_t;
  static float load(uint16_t v) { return float_of(uint32_t(v) << 16); }
  static uint16_t store(float f) {
    const uint32_t x = bits_of(f);
    const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;  // may carry up to inf
    return uint16_t(pick((x & 0x7fffffffu) > 0x7f800000u, 0x7fc0u, rounded));  // NaN
  }
};
struct F16 {
  using Raw = uint16_t;
  static float load(uint16_t v) {
    const uint32_t em = v & 0x7fffu;
    const float sub = float(int32_t(em)) * 0x1p-24f;  // subnormal: em * 2^-24, exact
    // rebias the exponent by 127 - 15 (inf/NaN: to 255, i.e. twice that)
    const uint32_t normal = (em << 13) + pick(em >= 0x7c00u, 0x70000000u, 0x38000000u);
    return float_of((uint32_t(v & 0x8000u) << 16) | pick(em < 0x400u, bits_of(sub), normal));
  }
  static uint16_t store(float f) {
    const uint32_t x = bits_of(f), a = x & 0x7fffffffu;
    // normal half (|f| >= 2^-14): drop 13 mantissa bits, rounding to nearest even
    const uint32_t normal = (a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13;
    // subnormal half: the FPU rounds |f| + 0.5 to a multiple of 2^-24 (even on ties)
    const uint32_t sub = bits_of(float_of(a) + 0.5f) - 0x3f000000u;
    uint32_t h = pick(a < 0x38800000u, sub, normal);
    h = pick(a >= 0x477ff000u, 0x7c00u, h);  // 65520 and up round to inf
    h = pick(a > 0x7f800000u, 0x7e00u, h);   // NaN
    return uint16_t(h | ((x >> 16) & 0x8000u));
  }
};

// Each kernel gets a chunk's two base pointers, its length and one scalar.
using RangeFn = void (*)(void*, void*, int64_t, float);

// s += w * (p - s) for 0 < w < 1 (update_with copies for w == 1 and skips w == 0).  For
// w >= 0.5 the form p - (1 - w) * (p - s) (1 - w is exact there), like torch.lerp.
template <typename S, typename P>
EMA_FUSED_CLONES void update_range(void* s_raw, void* p_raw, int64_t n, float w) {
  auto* __restrict__ s = static_cast<typename S::Raw*>(s_raw);
  const auto* __restrict__ p = static_cast<const typename P::Raw*>(p_raw);
  if (w < 0.5f) {
    for (int64_t i = 0; i < n; ++i) {
      const float a = S::load(s[i]);
      s[i] = S::store(a + w * (P::load(p[i]) - a));
    }
  } else {  // also NaN, which then flows into the shadows
    const float v = 1.0f - w;
    for (int64_t i = 0; i < n; ++i) {
      const float b = P::load(p[i]);
      s[i] = S::store(b - v * (b - S::load(s[i])));
    }
  }
}

template <typename D, typename S>
EMA_FUSED_CLONES void copy_range(void* d_raw, void* s_raw, int64_t n, float scale) {
  auto* __restrict__ d = static_cast<typename D::Raw*>(d_raw);
  const auto* __restrict__ s = static_cast<const typename S::Raw*>(s_raw);
  for (int64_t i = 0; i < n; ++i) d[i] = D::store(S::load(s[i]) * scale);
}

// out += w * in, out float32: a weighted sum (10 bytes per element for a bf16 input).
template <typename P>
EMA_FUSED_CLONES void accumulate_range(void* o_raw, void* i_raw, int64_t n, float w) {
  auto* __restrict__ o = static_cast<float*>(o_raw);
  const auto* __restrict__ in = static_cast<const typename P::Raw*>(i_raw);
  for (int64_t i = 0; i < n; ++i) o[i] += w * P::load(in[i]);
}

// Swap moves raw 2- or 4-byte units: bit-exact for every dtype of that size.
template <typename U>
EMA_FUSED_CLONES void swap_range(void* a_raw, void* b_raw, int64_t n, float) {
  U* __restrict__ a = static_cast<U*>(a_raw);
  U* __restrict__ b = static_cast<U*>(b_raw);
  for (int64_t i = 0; i < n; ++i) std::swap(a[i], b[i]);
}

template <template <typename, typename> class K>
struct Table {  // get(code of the first dtype, code of the second)
  template <typename A>
  static constexpr RangeFn row(int b) {
    return b == 0 ? K<A, F32>::fn : b == 1 ? K<A, BF16>::fn : K<A, F16>::fn;
  }
  static RangeFn get(int a, int b) {
    return a == 0 ? row<F32>(b) : a == 1 ? row<BF16>(b) : row<F16>(b);
  }
};
template <typename A, typename B>
struct Update { static constexpr RangeFn fn = update_range<A, B>; };
template <typename A, typename B>
struct Copy { static constexpr RangeFn fn = copy_range<A, B>; };

struct Chunk { RangeFn fn; void* a; void* b; int64_t n; };

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
    RangeFn fn = nullptr;
    if (kind == Kind::Swap) {
      fn = p.code_a == kFloat ? swap_range<uint32_t> : swap_range<uint16_t>;
    } else if (kind == Kind::Accumulate) {  // check_pairs took float32 outs only
      fn = p.code_b == 0 ? accumulate_range<F32>
                         : p.code_b == 1 ? accumulate_range<BF16> : accumulate_range<F16>;
    } else {
      fn = kind == Kind::Update ? Table<Update>::get(p.code_a, p.code_b)
                                : Table<Copy>::get(p.code_a, p.code_b);
    }
    // only a swap writes through b; the range functions take it as void* alike
    char *xp = static_cast<char*>(p.a), *yp = static_cast<char*>(const_cast<void*>(p.b));
    for (int64_t start = 0; start < p.numel; start += kChunk) {
      chunks.push_back({fn, xp + start * p.size_a, yp + start * p.size_b,
                        std::min(kChunk, p.numel - start)});
    }
  }
  return chunks;
}

// The chunks are split into one contiguous range per participant: the calling thread
// and at::get_num_threads() - 1 tasks on torch's inter-op pool.  Each walks its own
// range (one sequential stream for the hardware prefetchers), then helps with the
// others'.  Every chunk is claimed with an atomic increment, so a task that starts
// late (busy pool, or a call from a pool thread) only finds less to do: the caller
// waits just for chunks already claimed, so nothing can deadlock.  Tasks hold the
// shared state, never the caller's stack.
struct Job {
  std::vector<Chunk> chunks;
  float scalar = 0;
  size_t parts = 1;
  std::unique_ptr<std::atomic<size_t>[]> next;  // next[r]: next unclaimed chunk of range r
  std::atomic<size_t> joined{0}, done{0};
  void work() {
    const size_t me = joined.fetch_add(1, std::memory_order_relaxed) % parts;
    for (size_t k = 0; k < parts; ++k) {
      const size_t r = (me + k) % parts, end = chunks.size() * (r + 1) / parts;
      for (size_t c; (c = next[r].fetch_add(1, std::memory_order_relaxed)) < end;) {
        chunks[c].fn(chunks[c].a, chunks[c].b, chunks[c].n, scalar);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  }
};

void run(std::vector<Chunk> chunks, float scalar) {
  if (chunks.empty()) return;
  auto job = std::make_shared<Job>();
  const size_t total = chunks.size();
  job->chunks = std::move(chunks);
  job->scalar = scalar;
  if (total > 1 && !at::in_parallel_region()) {
    // one participant per kChunk elements at most: handing a few small tensors to the
    // pool costs more than it saves (500 tensors of 16 elements: 66 -> 10 us)
    int64_t elements = 0;
    for (const Chunk& c : job->chunks) elements += c.n;
    const size_t worth = static_cast<size_t>(std::max<int64_t>(elements / kChunk, 1));
    job->parts = std::min({static_cast<size_t>(std::max(at::get_num_threads(), 1)), total, worth});
  }
  job->next.reset(new std::atomic<size_t>[job->parts]);
  for (size_t r = 0; r < job->parts; ++r) job->next[r] = total * r / job->parts;
  for (size_t h = 1; h < job->parts; ++h) at::launch([job] { job->work(); });
  job->work();
  while (job->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

// Weight 0 changes nothing (the inputs are still checked; an Inf param must not turn its
// shadow into NaN); weight 1 copies the params exactly, without reading the shadows.
void update_with(const char* op, at::TensorList shadows, at::TensorList params, float weight) {
  const Kind kind = weight == 1.0f ? Kind::Copy : Kind::Update;
  std::vector<Chunk> chunks = plan(op, shadows, params, kind, Kind::Update);
  if (weight != 0.0f) run(std::move(chunks), weight);
}

void kernel_update_cpu(at::TensorList shadows, at::TensorList params, double weight) {
  TORCH_CHECK(weight >= 0.0 && weight <= 1.0, "kernel_update_: weight must be in [0, 1], got ",
              weight);
  update_with("kernel_update_", shadows, params, static_cast<float>(weight));
}

// The weight is read here, when the op runs.  Its value is not range-checked: the
// CUDA kernel cannot without a device sync, and both must behave alike (NaN flows).
void kernel_update_graph_safe_cpu(at::TensorList shadows, at::TensorList params,
                                  const at::Tensor& weight) {
  TORCH_CHECK(weight.numel() == 1 && weight.scalar_type() == at::kFloat &&
                  weight.device().is_cpu(),
              "kernel_update_graph_safe_: weight must be a 1-element float32 tensor on the "
              "shadows' device (cpu), got a ", weight.scalar_type(), " tensor of ",
              weight.numel(), " elements on ", weight.device());
  update_with("kernel_update_graph_safe_", shadows, params, *weight.const_data_ptr<float>());
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
// nothing and reads nothing (the inputs are still checked; an Inf input adds no NaN).
void kernel_weighted_sum_cpu(at::TensorList out, at::TensorList inputs, double weight) {
  TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(weight)),
                    "kernel_weighted_sum_: weight must be finite in float32, got ", weight);
  std::vector<Chunk> chunks =
      plan("kernel_weighted_sum_", out, inputs, Kind::Accumulate, Kind::Accumulate);
  if (weight != 0.0) run(std::move(chunks), static_cast<float>(weight));
}

}  // namespace

TORCH_LIBRARY_IMPL(ema_fused, CPU, m) {
  m.impl("kernel_update_", &kernel_update_cpu);
  m.impl("kernel_update_graph_safe_", &kernel_update_graph_safe_cpu);
  m.impl("kernel_copy_", &kernel_copy_cpu);
  m.impl("kernel_swap_", &kernel_swap_cpu);
  m.impl("kernel_weighted_sum_", &kernel_weighted_sum_cpu);
}
