// CUDA kernels of the kernel ops: one launch per call covers every pair on the
// device, whatever the mix of dtypes and sizes (the tile engine is multi_tensor.h).
//
// Tables live on the device and are cached per set of pairs: the key holds every
// pair's two addresses, size and dtypes, so a tensor whose storage moved makes a new
// key and a new table, and a table is only ever used with the addresses it was built
// from.  A cache hit costs no host-to-device copy and no host sync; a miss copies the
// table from pinned memory on the current stream (asynchronously).  A miss while a
// CUDA graph is being captured is refused: the captured copy would not run until
// replay, so the cached table would be empty for eager calls.
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
#include <mutex>
#include <vector>

#include "multi_tensor.h"
#include "pairs.h"

namespace ema_fused {
namespace {

template <Kind K>
__global__ void __launch_bounds__(kThreads, 4)
    tiles_kernel(const int64_t* __restrict__ table, int64_t n_rows, float scalar,
                 const float* __restrict__ scalar_ptr) {
  // graph-safe calls read the weight here, at run time, instead of at launch
  const float s = scalar_ptr != nullptr ? *scalar_ptr : scalar;
  run_tile<K>(table, n_rows, blockIdx.x, threadIdx.x, s);
}

struct Table {
  std::vector<int64_t> key;
  at::Tensor words;  // on the device
  int64_t n_rows = 0, n_tiles = 0;
  std::vector<c10::StreamId> streams;  // streams that used it (recorded with the allocator)
};

// Most recently used first; a handful of sets per process is typical (the shadows
// of one model, plus a few copy-out targets).
constexpr size_t kCacheSize = 16;
std::mutex cache_mutex;
std::list<Table> cache;

std::vector<int64_t> key_of(const std::vector<Pair>& pairs, const at::Device& device) {
  std::vector<int64_t> key;
  key.reserve(1 + 3 * pairs.size());
  key.push_back(device.index());
  for (const Pair& p : pairs) {
    key.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.a)));
    key.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.b)));
    key.push_back(p.numel * 16 + p.code_a * 4 + p.code_b);
  }
  return key;
}

// What a launch needs of a table; holding `words` keeps it alive until the launch is
// enqueued even if another thread evicts it meanwhile.
struct Launchable {
  at::Tensor words;
  int64_t n_rows, n_tiles;
};

// The table for exactly these pairs, built on a miss; usable on `stream` (the
// allocator learns of every stream that reads it, so evicting it while a kernel on
// another stream still reads it cannot hand its memory out early).
Launchable table_for(const char* op, const std::vector<Pair>& pairs, const at::Device& device,
                       const c10::cuda::CUDAStream& stream) {
  std::vector<int64_t> key = key_of(pairs, device);
  std::lock_guard<std::mutex> lock(cache_mutex);
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    if (it->key == key) {
      cache.splice(cache.begin(), cache, it);
      Table& hit = cache.front();
      bool seen = false;
      for (c10::StreamId id : hit.streams) seen = seen || id == stream.id();
      if (!seen) {
        c10::cuda::CUDACachingAllocator::recordStream(hit.words.storage().data_ptr(), stream);
        hit.streams.push_back(stream.id());
      }
      return {hit.words, hit.n_rows, hit.n_tiles};
    }
  }
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              op, ": the kernel table for these ", pairs.size(),
              " tensors is not built yet, and it cannot be built while a CUDA graph is being "
              "captured; run the same call once before capturing (a warm-up step)");
  const std::vector<int64_t> words = table_words(pairs);
  at::Tensor host = at::empty({static_cast<int64_t>(words.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(words.begin(), words.end(), host.data_ptr<int64_t>());
  Table fresh;
  fresh.key = std::move(key);
  fresh.words = at::empty({static_cast<int64_t>(words.size())},
                          at::TensorOptions().dtype(at::kLong).device(device));
  fresh.words.copy_(host, /*non_blocking=*/true);  // the host block is kept until it is done
  fresh.n_rows = static_cast<int64_t>(pairs.size());
  fresh.n_tiles = static_cast<int64_t>(words.size()) - fresh.n_rows * kRow;
  fresh.streams.push_back(stream.id());
  cache.push_front(std::move(fresh));
  if (cache.size() > kCacheSize) cache.pop_back();
  const Table& made = cache.front();
  return {made.words, made.n_rows, made.n_tiles};
}

template <Kind K>
void launch(const char* op, at::TensorList a, at::TensorList b, float scalar,
            const float* scalar_ptr) {
  TORCH_CHECK(a.size() == b.size(), op, ": the first list has ", a.size(),
              " tensors but the second has ", b.size());
  if (a.empty()) return;
  TORCH_CHECK(a[0].defined(), op, ": tensors[0] is undefined");
  const at::Device device = a[0].device();
  TORCH_CHECK(device.is_cuda(), op, ": tensors[0] is on ", device, "; this kernel runs on CUDA");
  const std::vector<Pair> pairs = check_pairs(op, a, b, K, device);
  if (pairs.empty()) return;
  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const Launchable table = table_for(op, pairs, device, stream);
  TORCH_CHECK(table.n_tiles < (int64_t(1) << 31), op, ": ", table.n_tiles,
              " tiles are more than one launch can take");
  tiles_kernel<K><<<static_cast<unsigned>(table.n_tiles), kThreads, 0, stream.stream()>>>(
      table.words.data_ptr<int64_t>(), table.n_rows, scalar, scalar_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void kernel_update_cuda(at::TensorList shadows, at::TensorList params, double weight) {
  TORCH_CHECK(weight >= 0.0 && weight <= 1.0, "kernel_update_: weight must be in [0, 1], got ",
              weight);
  launch<Kind::Update>("kernel_update_", shadows, params, static_cast<float>(weight), nullptr);
}

void kernel_update_graph_safe_cuda(at::TensorList shadows, at::TensorList params,
                                   const at::Tensor& weight) {
  const char* op = "kernel_update_graph_safe_";
  if (shadows.empty()) return;
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.numel() == 1, op,
              ": weight must be a 1-element float32 tensor, got ", weight.scalar_type(),
              " with shape ", weight.sizes());
  TORCH_CHECK(weight.device() == shadows[0].device(), op, ": weight is on ", weight.device(),
              " but tensors[0] is on ", shadows[0].device());
  launch<Kind::Update>(op, shadows, params, 0.0f, weight.data_ptr<float>());
}

void kernel_copy_cuda(at::TensorList dst, at::TensorList src, double scale) {
  TORCH_CHECK(scale >= 0.0 && std::isfinite(scale),
              "kernel_copy_: scale must be finite and >= 0, got ", scale);
  launch<Kind::Copy>("kernel_copy_", dst, src, static_cast<float>(scale), nullptr);
}

void kernel_swap_cuda(at::TensorList a, at::TensorList b) {
  launch<Kind::Swap>("kernel_swap_", a, b, 0.0f, nullptr);
}

}  // namespace
}  // namespace ema_fused

TORCH_LIBRARY_IMPL(ema_fused, CUDA, m) {
  m.impl("kernel_update_", &ema_fused::kernel_update_cuda);
  m.impl("kernel_update_graph_safe_", &ema_fused::kernel_update_graph_safe_cuda);
  m.impl("kernel_copy_", &ema_fused::kernel_copy_cuda);
  m.impl("kernel_swap_", &ema_fused::kernel_swap_cuda);
}
