// kernel_multi_update_ on CUDA: every param of the device with the shadows of up to
// kMaxProfiles profiles in one launch (multi_shadow.h), on the current stream, under a
// device guard; more profiles run in groups, one launch each.
//
// Tables are cached as cuda_kernels.cu caches its own (the same rules, a cache of its
// own: its key also holds the profiles): the key holds every tensor's address, size and
// dtype, so a moved storage makes a new table; a miss checks every shadow against every
// other shadow and param, copies the table from pinned memory on the current stream and
// records an event; a hit copies nothing and never syncs; the first use on another stream
// waits for that event on the device.  A miss during CUDA-graph capture is refused, and
// a table used in a capture is pinned (the graph replays its address).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <list>
#include <memory>
#include <mutex>
#include <vector>

#include "multi_checks.h"
#include "multi_shadow.h"
#include "stochastic_checks.h"

namespace ema_fused {
namespace {

struct MultiTable {
  std::vector<int64_t> key;
  at::Tensor words;  // on the device
  int64_t n_rows = 0, n_tiles = 0;
  std::shared_ptr<CUevent_st> copied;  // recorded after the copy of `words`
  std::vector<c10::StreamId> streams;  // streams ordered after that copy
  bool pinned = false;                 // used in a graph capture: never evicted
};

constexpr size_t kCacheSize = 16;  // unpinned tables kept, most recently used first
std::mutex cache_mutex;
std::list<MultiTable> cache;

// The key: the overlap check's (every tensor's address and size), the device, the group's
// profiles and every pair's dtype codes.
std::vector<int64_t> table_key(at::TensorList shadows, at::TensorList params,
                               const MultiPlan& plan, size_t g, size_t end, int64_t device) {
  std::vector<int64_t> key = multi_key(shadows, params);
  key.push_back(device);
  for (size_t j = g; j < end; ++j) {
    key.push_back(plan.active[j]);
    for (const Pair& q : plan.pairs[j]) key.push_back(q.code_a * 4 + q.code_b);
  }
  return key;
}

void admit(MultiTable& table, const c10::cuda::CUDAStream& stream, bool capturing) {
  if (std::find(table.streams.begin(), table.streams.end(), stream.id()) != table.streams.end()) {
    return;
  }
  C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), table.copied.get(),
                                     capturing ? cudaEventWaitExternal : cudaEventWaitDefault));
  c10::cuda::CUDACachingAllocator::recordStream(table.words.storage().data_ptr(), stream);
  table.streams.push_back(stream.id());
}

void evict_beyond_capacity() {
  size_t unpinned = 0;
  for (const MultiTable& t : cache) unpinned += !t.pinned;
  for (auto it = cache.end(); unpinned > kCacheSize && it != cache.begin();) {
    --it;
    if (!it->pinned) {
      it = cache.erase(it);
      --unpinned;
    }
  }
}

// What a stochastic update adds: every profile's seed (by profile number k), the offset,
// and the params' counter words.
struct StochasticArgs {
  at::IntArrayRef seeds;
  int64_t offset;
  at::IntArrayRef positions, starts;
};

// Launch profiles [g, end) of `plan`: one table (cached), one kernel.  `sr` set: a
// stochastic update (its tables have their own keys: their rows hold the counter words).
void launch_group(const char* op, at::TensorList shadows, at::TensorList params,
                  const MultiPlan& plan, size_t g, size_t end, const at::Device& device,
                  const c10::cuda::CUDAStream& stream, const StochasticArgs* sr = nullptr) {
  std::vector<int64_t> key = table_key(shadows, params, plan, g, end, device.index());
  if (sr != nullptr) {
    key.push_back(-1);  // the marker of a stochastic table (no other word is negative)
    key.insert(key.end(), sr->positions.begin(), sr->positions.end());
    key.insert(key.end(), sr->starts.begin(), sr->starts.end());
  }
  const bool capturing =
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  at::Tensor words;
  int64_t n_rows = 0, n_tiles = 0;
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = std::find_if(cache.begin(), cache.end(),
                           [&](const MultiTable& t) { return t.key == key; });
    if (it != cache.end()) {
      cache.splice(cache.begin(), cache, it);
    } else {
      TORCH_CHECK(!capturing, op, ": the kernel table for these ", params.size(),
                  " params is not built yet, and it cannot be built while a CUDA graph is "
                  "being captured; run the same call once before capturing (a warm-up step)");
      check_multi_overlaps(op, shadows, params);
      const int64_t size = multi_table_size(plan.pairs, g, end, sr != nullptr);
      MultiTable fresh;
      fresh.key = std::move(key);
      fresh.words = at::empty({size}, at::TensorOptions().dtype(at::kLong).device(device));
      at::Tensor host = at::empty({size}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
      fill_multi_table(plan.pairs, g, end, host.data_ptr<int64_t>(), fresh.words.data_ptr(),
                       sr != nullptr ? sr->positions.data() : nullptr,
                       sr != nullptr ? sr->starts.data() : nullptr);
      fresh.words.copy_(host, /*non_blocking=*/true);  // the host block is kept until done
      cudaEvent_t raw = nullptr;
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&raw, cudaEventDisableTiming));
      fresh.copied = std::shared_ptr<CUevent_st>(raw, [](cudaEvent_t e) { cudaEventDestroy(e); });
      C10_CUDA_CHECK(cudaEventRecord(raw, stream.stream()));
      fresh.n_rows = static_cast<int64_t>(plan.pairs[g].size());
      fresh.n_tiles = size - fresh.n_rows * multi_row_words(static_cast<int>(end - g), sr != nullptr);
      fresh.streams.push_back(stream.id());
      cache.push_front(std::move(fresh));
    }
    MultiTable& table = cache.front();
    admit(table, stream, capturing);
    table.pinned = table.pinned || capturing;
    words = table.words;  // keeps the table alive until the launch is enqueued
    n_rows = table.n_rows;
    n_tiles = table.n_tiles;
    evict_beyond_capacity();
  }
  TORCH_CHECK(n_tiles < (int64_t(1) << 31), op, ": ", n_tiles,
              " tiles are more than one launch can take");
  MultiWeights ws{};
  for (size_t j = g; j < end; ++j) ws.w[j - g] = plan.weights[j];
  const auto blocks = static_cast<unsigned>(n_tiles);
  if (sr == nullptr) {
    multi_tiles_kernel<<<blocks, kThreads, 0, stream.stream()>>>(
        words.data_ptr<int64_t>(), n_rows, static_cast<int>(end - g), ws);
  } else {
    MultiKeys ks{};
    for (size_t j = g; j < end; ++j) {
      const auto seed = static_cast<uint64_t>(sr->seeds[plan.active[j]]);
      ks.k0[j - g] = uint32_t(seed);
      ks.k1[j - g] = uint32_t(seed >> 32);
    }
    const auto offset = static_cast<uint64_t>(sr->offset);
    ks.off_lo = uint32_t(offset);
    ks.off_hi = uint32_t(offset >> 32);
    multi_stochastic_tiles_kernel<<<blocks, kThreads, 0, stream.stream()>>>(
        words.data_ptr<int64_t>(), n_rows, static_cast<int>(end - g), ws, ks);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void multi_update(const char* op, at::TensorList shadows, at::TensorList params,
                  c10::ArrayRef<double> weights, const StochasticArgs* sr) {
  if (params.empty() || weights.empty()) {
    check_multi(op, shadows, params, weights, at::Device(at::kCUDA, 0));
    return;
  }
  TORCH_CHECK(params[0].defined(), op, ": params[0] is undefined");
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), op, ": params[0] is on ", device, "; this kernel runs on CUDA");
  const MultiPlan plan = check_multi(op, shadows, params, weights, device);
  if (sr != nullptr) check_rounded_profiles(op, plan);
  if (plan.active.empty() || plan.pairs[0].empty()) {  // nothing moves: still refuse overlaps
    check_multi_overlaps(op, shadows, params);
    return;
  }
  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  for (size_t g = 0; g < plan.active.size(); g += kMaxProfiles) {
    const size_t end = std::min(plan.active.size(), g + static_cast<size_t>(kMaxProfiles));
    launch_group(op, shadows, params, plan, g, end, device, stream, sr);
  }
}

void kernel_multi_update_cuda(at::TensorList shadows, at::TensorList params,
                              c10::ArrayRef<double> weights) {
  multi_update("kernel_multi_update_", shadows, params, weights, nullptr);
}

// Profile k as kernel_update_stochastic_ with seeds[k] (16-bit shadows only).
void kernel_multi_update_stochastic_cuda(at::TensorList shadows, at::TensorList params,
                                         c10::ArrayRef<double> weights, at::IntArrayRef seeds,
                                         int64_t offset, at::IntArrayRef positions,
                                         at::IntArrayRef starts) {
  const char* op = "kernel_multi_update_stochastic_";
  TORCH_CHECK_VALUE(seeds.size() == weights.size(), op, ": ", weights.size(), " weights but ",
                    seeds.size(), " seeds (one per profile)");
  check_counters(op, params, positions, starts);
  const StochasticArgs sr{seeds, offset, positions, starts};
  multi_update(op, shadows, params, weights, &sr);
}

}  // namespace
}  // namespace ema_fused

TORCH_LIBRARY_IMPL(ema_fused, CUDA, m) {
  m.impl("kernel_multi_update_", &ema_fused::kernel_multi_update_cuda);
  m.impl("kernel_multi_update_stochastic_", &ema_fused::kernel_multi_update_stochastic_cuda);
}
