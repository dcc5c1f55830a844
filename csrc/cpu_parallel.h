// The CPU kernels' parallel pass: chunks of work shared by the calling thread and
// torch's inter-op pool (used by cpu_kernels.cpp and cpu_multi_shadow.cpp).
//
//  * at::parallel_for is an inline template, parallel only where the caller is built
//    with -fopenmp; torch's extension builds do not pass it, so all ran on one thread.
//    run() shares the chunks with torch's inter-op pool instead, whatever the flags.
//  * Chunks handed out round-robin cost 2% against one contiguous range per thread.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "cpu_ranges.h"

namespace ema_fused {

// This thread's cap on the participants of run() (0: none, at::get_num_threads()): the
// offload worker's thread count, set on that thread only (cpu_offload.cpp).  An inline
// function's static is one object across the library's translation units.
inline int& thread_cap() {
  static thread_local int cap = 0;
  return cap;
}

namespace {

// Work is cut into chunks of at most 64K elements (256-768 KB of traffic, ~10-20 us)
// across all tensors: small enough to balance a few huge tensors and many small ones
// alike, big enough that claiming one (an atomic increment) costs nothing.
constexpr int64_t kChunk = 1 << 16;

struct Chunk { RangeFn fn; void* a; void* b; int64_t n; };

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
    const int threads = thread_cap() > 0 ? thread_cap() : at::get_num_threads();
    job->parts = std::min({static_cast<size_t>(std::max(threads, 1)), total, worth});
  }
  job->next.reset(new std::atomic<size_t>[job->parts]);
  for (size_t r = 0; r < job->parts; ++r) job->next[r] = total * r / job->parts;
  for (size_t h = 1; h < job->parts; ++h) at::launch([job] { job->work(); });
  job->work();
  while (job->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

}  // namespace
}  // namespace ema_fused
