// What the CUDA kernel files (update.cu, norms.cu, select.cu) share: the
// launch geometry, and the host side of a call (staging.cu), which gets its
// tables to the GPU without waiting for it.
//
// Tables are built on the host (dps_table.h), copied into a pinned staging
// buffer and sent with the work on the caller's stream; a buffer is reused
// only once an event says the GPU is done with it, so the host does not wait
// for the GPU, except when a staging buffer must grow (cudaFree and
// cudaFreeHost synchronise; buffers double, so this stops after the first
// calls) or more than Staging::kMaxSlots calls are in flight; host_waits()
// counts those moments, so that tests can check they stop after warm-up.
#pragma once
#include <cuda_runtime.h>
#include <string.h>

#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "launch.h"

namespace dps {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;  // grid size; registers let about 4 blocks reside at once

// Throws std::runtime_error naming `what` unless `status` is cudaSuccess.
void check(cudaError_t status, const char* what);

// Throws, saying why, when no CUDA device is usable (checked once).
void ensure_ready();

// The tables are staged from host memory at each call, so a captured graph
// would replay stale tables: throws when `stream` is capturing.
void refuse_capture(cudaStream_t stream);

// Blocks for `nchunks` work items on `device`: at most kBlocksPerSm per SM.
int grid_for(int device, int nchunks);

// `bytes` rounded up to a 256-byte boundary (where each table section starts).
static inline size_t round_up(size_t bytes) { return (bytes + 255) & ~(size_t)255; }

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// A pinned host buffer and a device buffer for one call's tables; reusable
// once `done` (recorded after the call's last kernel) has completed.
struct Slot {
  char* host = nullptr;
  size_t host_bytes = 0;
  char* device = nullptr;
  size_t device_bytes = 0;
  cudaEvent_t done = nullptr;
  uint64_t recorded = 0;  // when `done` was last recorded (a call counter)
  bool in_use = false;
};

// Slots per device. A call takes a slot the GPU is done with, or adds one:
// the host never waits for the GPU, unless it runs kMaxSlots calls ahead.
class Staging {
 public:
  static constexpr size_t kMaxSlots = 64;
  Slot* acquire(int device, size_t host_bytes, size_t device_bytes);
  void release(Slot* slot, cudaStream_t stream);

 private:
  std::mutex mutex_;
  std::map<int, std::vector<std::unique_ptr<Slot>>> slots_;
  uint64_t calls_ = 0;
};

// Updates and selections keep separate slots: a selection's slot holds its
// histograms (16 KiB per tensor), an update's only the tables.
Staging& update_staging();
Staging& select_staging();

// Holds a slot for one call; the event is recorded whatever happens.
class SlotUse {
 public:
  SlotUse(Staging& staging, int device, size_t host_bytes, size_t device_bytes, cudaStream_t stream)
      : staging_(staging), slot_(staging.acquire(device, host_bytes, device_bytes)), stream_(stream) {}
  ~SlotUse() {
    try {
      staging_.release(slot_, stream_);
    } catch (...) {
    }
  }
  char* host() const { return slot_->host; }
  char* device() const { return slot_->device; }

 private:
  Staging& staging_;
  Slot* slot_;
  cudaStream_t stream_;
};

// Makes `device` current for its lifetime.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "reading the current device");
    if (previous_ != device) check(cudaSetDevice(device), "selecting the device");
    device_ = device;
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0, device_ = 0;
};

template <typename T>
struct Type {
  using type = T;
};

// f(Type<P>()) with P the storage type of dtype code `dtype`.
template <typename F>
void with_dtype(int dtype, F f) {
  switch (dtype) {
    case kFloat32: return f(Type<float>());
    case kBFloat16: return f(Type<bf16_t>());
    case kFloat16: return f(Type<f16_t>());
    default: throw std::invalid_argument("dps_fast: unsupported dtype code " + std::to_string(dtype));
  }
}

// Stages a call's per-tensor table and chunk table (chunks of `chunk` entries)
// through a slot, sends them on `stream`, and calls
// launch(tensor_table, chunk_table, nchunks, grid) to queue the kernels
// while the slot is held. Nothing is launched when every tensor is empty.
template <typename Args, typename Launch>
void with_tables(int device, cudaStream_t stream, const std::vector<Args>& tensors, int64_t chunk, Launch launch) {
  const std::vector<Chunk> chunks = make_chunks(tensors, chunk);
  if (chunks.empty()) return;
  const size_t tensor_bytes = round_up(tensors.size() * sizeof(Args));
  const size_t bytes = tensor_bytes + chunks.size() * sizeof(Chunk);
  DeviceGuard guard(device);
  refuse_capture(stream);
  SlotUse slot(update_staging(), device, bytes, bytes, stream);
  memcpy(slot.host(), tensors.data(), tensors.size() * sizeof(Args));
  memcpy(slot.host() + tensor_bytes, chunks.data(), chunks.size() * sizeof(Chunk));
  check(cudaMemcpyAsync(slot.device(), slot.host(), bytes, cudaMemcpyHostToDevice, stream), "copying the table");
  const int nchunks = (int)chunks.size();
  launch((const Args*)slot.device(), (const Chunk*)(slot.device() + tensor_bytes), nchunks, grid_for(device, nchunks));
}

}  // namespace cuda
}  // namespace dps
