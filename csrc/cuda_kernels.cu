// CUDA kernels of the kernel ops: one launch per call covers every pair on the
// device, whatever the mix of dtypes and sizes (the tile engine is multi_tensor.h).
//
// Tables live on the device and are cached per set of pairs: the key holds every
// pair's two addresses, size and dtypes, so a tensor whose storage moved makes a new
// key and a new table, and a table is only ever used with the addresses it was built
// from.  A miss checks the pairs for overlaps (the key decides them, so a hit needs no
// check), then copies the table from pinned memory on the current stream,
// asynchronously, and records an event after the copy.  A hit copies nothing and never
// syncs with the host; the first use on another stream makes that stream wait for the
// event (on the device), so its kernel never reads a table still being copied.
//
// CUDA graphs keep the table's device address and replay without asking the cache, so
// a table used while a graph is being captured is pinned: never evicted, its memory
// never handed out again.  A miss during capture is refused: the captured copy would
// not run until replay.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <list>
#include <memory>
#include <mutex>
#include <vector>

#include "multi_tensor.h"
#include "pairs.h"
#include "stochastic_checks.h"

namespace ema_fused {
namespace {

using Event = std::shared_ptr<CUevent_st>;

Event new_event() {
  cudaEvent_t raw = nullptr;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&raw, cudaEventDisableTiming));
  return Event(raw, [](cudaEvent_t e) { cudaEventDestroy(e); });
}

struct Table {
  std::vector<int64_t> key;
  at::Tensor words;  // on the device
  int64_t n_rows = 0, n_tiles = 0;
  Event copied;  // recorded on the building stream after the copy of `words`
  std::vector<c10::StreamId> streams;  // streams ordered after that copy
  bool pinned = false;                 // used in a graph capture: never evicted
};

// Most recently used first; a handful of sets per process is typical (the shadows
// of one model, plus a few copy-out targets).  Pinned tables do not count.
constexpr size_t kCacheSize = 16;
std::mutex cache_mutex;
std::list<Table> cache;

// What a launch needs of a table; holding `words` keeps it alive until the launch is
// enqueued even if another thread evicts it meanwhile.
struct Launchable {
  at::Tensor words;
  int64_t n_rows, n_tiles;
};

void evict_beyond_capacity() {
  size_t unpinned = 0;
  for (const Table& t : cache) unpinned += !t.pinned;
  for (auto it = cache.end(); unpinned > kCacheSize && it != cache.begin();) {
    --it;
    if (!it->pinned) {
      it = cache.erase(it);
      --unpinned;
    }
  }
}

// Make `stream` able to use `table`: wait (on the device) for the table's copy, and tell
// the allocator, so that evicting the table while a kernel on `stream` still reads it
// cannot hand its memory out early.
void admit_stream(Table& table, const c10::cuda::CUDAStream& stream, bool capturing) {
  for (c10::StreamId id : table.streams) {
    if (id == stream.id()) return;
  }
  // during capture the wait becomes an external-event node of the graph
  C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), table.copied.get(),
                                     capturing ? cudaEventWaitExternal : cudaEventWaitDefault));
  c10::cuda::CUDACachingAllocator::recordStream(table.words.storage().data_ptr(), stream);
  table.streams.push_back(stream.id());
}

// The counter words of a stochastic update's table (null for the others' tables).
struct Counters {
  const int64_t* positions = nullptr;
  const int64_t* starts = nullptr;
  size_t n = 0;
};

// The table for exactly these pairs, built on a miss, usable on `stream`.  A stochastic
// update's table (`counters` set) has its own key: its rows also hold the counter words.
Launchable table_for(const char* op, const std::vector<Pair>& pairs, Kind kind,
                     const at::Device& device, const c10::cuda::CUDAStream& stream,
                     const Counters& counters = Counters()) {
  std::vector<int64_t> key = key_of(pairs, device.index(), kind);
  if (counters.positions != nullptr) {
    key.push_back(-1);  // no pair's words are negative: the marker of a stochastic table
    key.insert(key.end(), counters.positions, counters.positions + counters.n);
    key.insert(key.end(), counters.starts, counters.starts + counters.n);
  }
  const int row_words = counters.positions != nullptr ? kRowStochastic : kRow;
  const bool capturing =
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  std::lock_guard<std::mutex> lock(cache_mutex);
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    if (it->key == key) {
      cache.splice(cache.begin(), cache, it);
      Table& hit = cache.front();
      admit_stream(hit, stream, capturing);
      hit.pinned = hit.pinned || capturing;
      return {hit.words, hit.n_rows, hit.n_tiles};
    }
  }
  TORCH_CHECK(!capturing, op, ": the kernel table for these ", pairs.size(),
              " tensors is not built yet, and it cannot be built while a CUDA graph is being "
              "captured; run the same call once before capturing (a warm-up step)");
  check_overlaps(op, pairs, kind);
  const int64_t size = table_size(pairs, row_words);
  Table fresh;
  fresh.key = std::move(key);
  fresh.words = at::empty({size}, at::TensorOptions().dtype(at::kLong).device(device));
  at::Tensor host = at::empty({size}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  fill_table(pairs, host.data_ptr<int64_t>(), fresh.words.data_ptr(), counters.positions,
             counters.starts);
  fresh.words.copy_(host, /*non_blocking=*/true);  // the host block is kept until it is done
  fresh.copied = new_event();
  C10_CUDA_CHECK(cudaEventRecord(fresh.copied.get(), stream.stream()));
  fresh.n_rows = static_cast<int64_t>(pairs.size());
  fresh.n_tiles = size - fresh.n_rows * row_words;
  fresh.streams.push_back(stream.id());
  cache.push_front(std::move(fresh));
  const Table& made = cache.front();
  const Launchable out{made.words, made.n_rows, made.n_tiles};
  evict_beyond_capacity();
  return out;
}

// `kind` is what the kernel does; `names_kind` names the lists in messages (an update
// with weight 1 runs the copy kernel).
template <Kind K>
void launch(const char* op, at::TensorList a, at::TensorList b, float scalar,
            const float* scalar_ptr, Kind names_kind = K) {
  TORCH_CHECK(a.size() == b.size(), op, ": the first list has ", a.size(),
              " tensors but the second has ", b.size());
  if (a.empty()) return;
  TORCH_CHECK(a[0].defined(), op, ": tensors[0] is undefined");
  const at::Device device = a[0].device();
  TORCH_CHECK(device.is_cuda(), op, ": tensors[0] is on ", device, "; this kernel runs on CUDA");
  const std::vector<Pair> pairs = check_pairs(op, a, b, names_kind, device);
  if (pairs.empty()) return;
  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const Launchable table = table_for(op, pairs, names_kind, device, stream);
  TORCH_CHECK(table.n_tiles < (int64_t(1) << 31), op, ": ", table.n_tiles,
              " tiles are more than one launch can take");
  tiles_kernel<K><<<static_cast<unsigned>(table.n_tiles), kThreads, 0, stream.stream()>>>(
      table.words.data_ptr<int64_t>(), table.n_rows, scalar, scalar_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <Kind U, Kind C>
void update_cuda(const char* op, at::TensorList shadows, at::TensorList params, double weight) {
  TORCH_CHECK(weight >= 0.0 && weight <= 1.0, op, ": weight must be in [0, 1], got ", weight);
  if (weight == 0.0) {  // nothing changes; the inputs are still checked
    if (!shadows.empty() && shadows[0].defined()) {
      check_overlaps(op, check_pairs(op, shadows, params, Kind::Update, shadows[0].device()),
                     Kind::Update);
    }
    return;
  }
  if (weight == 1.0) return launch<C>(op, shadows, params, 1.0f, nullptr, Kind::Update);
  launch<U>(op, shadows, params, static_cast<float>(weight), nullptr, Kind::Update);
}

// skip_nonfinite: elements whose param is NaN or +-Inf keep their shadow (in the kernel,
// no extra pass, no host sync).
void kernel_update_cuda(at::TensorList shadows, at::TensorList params, double weight,
                        bool skip_nonfinite) {
  if (skip_nonfinite) {
    return update_cuda<Kind::UpdateFinite, Kind::CopyFinite>("kernel_update_", shadows, params,
                                                             weight);
  }
  update_cuda<Kind::Update, Kind::Copy>("kernel_update_", shadows, params, weight);
}

void kernel_update_graph_safe_cuda(at::TensorList shadows, at::TensorList params,
                                   const at::Tensor& weight, bool skip_nonfinite) {
  const char* op = "kernel_update_graph_safe_";
  if (shadows.empty()) return;
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.numel() == 1, op,
              ": weight must be a 1-element float32 tensor, got ", weight.scalar_type(),
              " with shape ", weight.sizes());
  TORCH_CHECK(weight.device() == shadows[0].device(), op, ": weight is on ", weight.device(),
              " but tensors[0] is on ", shadows[0].device());
  if (skip_nonfinite) {
    return launch<Kind::UpdateFinite>(op, shadows, params, 0.0f, weight.data_ptr<float>(),
                                      Kind::Update);
  }
  launch<Kind::Update>(op, shadows, params, 0.0f, weight.data_ptr<float>());
}

// The stochastic update (stochastic.h): 16-bit shadows only; weight 0 and 1 as
// kernel_update_ (nothing random in either).  The table, cached as any other, holds each
// pair's position and start; the seed and offset are launch arguments, so a new step
// (a new offset) reuses the table.
void kernel_update_stochastic_cuda(at::TensorList shadows, at::TensorList params, double weight,
                                   bool skip_nonfinite, int64_t seed, int64_t offset,
                                   at::IntArrayRef positions, at::IntArrayRef starts) {
  const char* op = "kernel_update_stochastic_";
  TORCH_CHECK(weight >= 0.0 && weight <= 1.0, op, ": weight must be in [0, 1], got ", weight);
  check_counters(op, shadows, positions, starts);
  if (shadows.empty()) return;
  TORCH_CHECK(shadows[0].defined(), op, ": tensors[0] is undefined");
  const at::Device device = shadows[0].device();
  TORCH_CHECK(device.is_cuda(), op, ": tensors[0] is on ", device, "; this kernel runs on CUDA");
  const std::vector<Pair> pairs = check_pairs(op, shadows, params, Kind::Update, device);
  check_rounded(op, pairs);
  if (weight == 0.0 || pairs.empty()) {  // nothing changes; the pairs are still checked
    check_overlaps(op, pairs, Kind::Update);
    return;
  }
  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const Launchable table = table_for(op, pairs, Kind::Update, device, stream,
                                     {positions.data(), starts.data(), positions.size()});
  TORCH_CHECK(table.n_tiles < (int64_t(1) << 31), op, ": ", table.n_tiles,
              " tiles are more than one launch can take");
  const auto u_seed = static_cast<uint64_t>(seed), u_offset = static_cast<uint64_t>(offset);
  const RandomKey key{uint32_t(u_seed), uint32_t(u_seed >> 32), uint32_t(u_offset),
                      uint32_t(u_offset >> 32)};
  const auto blocks = static_cast<unsigned>(table.n_tiles);
  const int64_t* words = table.words.data_ptr<int64_t>();
  const float w = static_cast<float>(weight);
  if (skip_nonfinite) {
    stochastic_tiles_kernel<Kind::UpdateFinite><<<blocks, kThreads, 0, stream.stream()>>>(
        words, table.n_rows, w, key);
  } else {
    stochastic_tiles_kernel<Kind::Update><<<blocks, kThreads, 0, stream.stream()>>>(
        words, table.n_rows, w, key);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void kernel_copy_cuda(at::TensorList dst, at::TensorList src, double scale) {
  TORCH_CHECK(scale >= 0.0 && std::isfinite(scale),
              "kernel_copy_: scale must be finite and >= 0, got ", scale);
  launch<Kind::Copy>("kernel_copy_", dst, src, static_cast<float>(scale), nullptr);
}

void kernel_swap_cuda(at::TensorList a, at::TensorList b) {
  launch<Kind::Swap>("kernel_swap_", a, b, 0.0f, nullptr);
}

// out[i] += weight * inputs[i].  Weight 0 checks the inputs and launches nothing; so does
// a weight that rounds to 0 in float32, the kernels' math (no 0 * Inf = NaN from it).
void kernel_weighted_sum_cuda(at::TensorList out, at::TensorList inputs, double weight) {
  const char* op = "kernel_weighted_sum_";
  TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(weight)), op,
                    ": weight must be finite in float32, got ", weight);
  if (static_cast<float>(weight) == 0.0f) {
    if (!out.empty() && out[0].defined()) {
      check_overlaps(op, check_pairs(op, out, inputs, Kind::Accumulate, out[0].device()),
                     Kind::Accumulate);
    }
    return;
  }
  launch<Kind::Accumulate>(op, out, inputs, static_cast<float>(weight), nullptr);
}

}  // namespace
}  // namespace ema_fused

TORCH_LIBRARY_IMPL(ema_fused, CUDA, m) {
  m.impl("kernel_update_", &ema_fused::kernel_update_cuda);
  m.impl("kernel_update_graph_safe_", &ema_fused::kernel_update_graph_safe_cuda);
  m.impl("kernel_copy_", &ema_fused::kernel_copy_cuda);
  m.impl("kernel_swap_", &ema_fused::kernel_swap_cuda);
  m.impl("kernel_weighted_sum_", &ema_fused::kernel_weighted_sum_cuda);
  m.impl("kernel_update_stochastic_", &ema_fused::kernel_update_stochastic_cuda);
}
