// CUDA kernels of dps_fast: the multi-tensor update (one launch per call for
// every tensor, through a chunk table), the masked gradient norms of
// clip_grad_norm_, and the batched radix selection.
//
// Tables are built on the host (dps_table.h), copied into a pinned staging
// buffer and sent with the work on the caller's stream; a buffer is reused
// only once an event says the GPU is done with it, so the host does not wait
// for the GPU, except when a staging buffer must grow (cudaFree and
// cudaFreeHost synchronise; buffers double, so this stops after the first
// calls) or more than 64 calls are in flight; host_waits() counts those
// moments, so that tests can check they stop after warm-up. GradScaler's
// found_inf and inv_scale and the clip factor are read on the device.
#include <cuda_runtime.h>
#include <string.h>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "../dps_select.h"
#include "launch.h"

namespace dps {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;           // grid size; registers let about 4 blocks reside at once
constexpr int64_t kUpdateChunk = 16384;   // a multiple of 4 * kThreads
constexpr int64_t kSelectChunk = 65536;   // a multiple of kUnroll * kThreads
constexpr int kUnroll = 4;                // selection: loads in flight per thread

// Staging allocations, frees and event waits so far (each may make the host wait for the GPU).
std::atomic<uint64_t> host_wait_count(0);

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear it, so that later calls do not report it again
    throw std::runtime_error(std::string("dps_fast CUDA kernels: ") + what + ": " + cudaGetErrorString(status));
  }
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// The selection passes' loads: kUnroll scores per thread from [base, end), 0 past the end
// (all loads issued before any is used, to keep kUnroll of them in flight).
__device__ __forceinline__ void load_scores(const float* score, int64_t base, int64_t end, float x[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = base + u * kThreads + threadIdx.x;
    x[u] = i < end ? score[i] : 0.0f;
  }
}

// ----- 4-entry vector access (16 bytes of fp32, 8 bytes of a 16-bit dtype) ----------

__device__ __forceinline__ void load4(const float* p, float out[4]) {
  float4 x = *reinterpret_cast<const float4*>(p);
  out[0] = x.x, out[1] = x.y, out[2] = x.z, out[3] = x.w;
}
__device__ __forceinline__ void store4(float* p, const float in[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
}

template <typename T>  // bf16_t or f16_t: two entries per 32-bit word, the first in the low half
__device__ __forceinline__ void load4(const T* p, float out[4]) {
  uint2 x = *reinterpret_cast<const uint2*>(p);
  T e;
  e.bits = (uint16_t)(x.x & 0xffffu), out[0] = load_value(e);
  e.bits = (uint16_t)(x.x >> 16), out[1] = load_value(e);
  e.bits = (uint16_t)(x.y & 0xffffu), out[2] = load_value(e);
  e.bits = (uint16_t)(x.y >> 16), out[3] = load_value(e);
}
template <typename T>
__device__ __forceinline__ void store4(T* p, const float in[4]) {
  uint2 x;
  x.x = (uint32_t)store_value<T>(in[0]).bits | ((uint32_t)store_value<T>(in[1]).bits << 16);
  x.y = (uint32_t)store_value<T>(in[2]).bits | ((uint32_t)store_value<T>(in[3]).bits << 16);
  *reinterpret_cast<uint2*>(p) = x;
}

// ----- the update ------------------------------------------------------------------

// Entries [begin, end) of one tensor; each thread takes 4 consecutive entries
// (one vector access per array) at a time.
template <int M, bool RESET, typename P>
__device__ __forceinline__ void update_range(const TensorArgs& a, int64_t begin, int64_t end, float unscale,
                                             float coef, const Hyper& h) {
  P* __restrict__ p = (P*)a.p;
  const P* __restrict__ g = (const P*)a.g;
  float* __restrict__ m = a.m;
  float* __restrict__ v = a.v;
  float* __restrict__ s = a.s;
  for (int64_t i = begin + 4 * (int64_t)threadIdx.x; i < end; i += 4 * (int64_t)kThreads) {
    uint32_t bits = 0xfu;  // i is a multiple of 4: its 4 mask bits share a byte
    if (M == kExploitGrad || M == kExploitFreeze) bits = (uint32_t)a.mask[i >> 3] >> (i & 7);
    if (a.aligned && i + 4 <= end) {
      float pv[4], gv[4], mv[4], vv[4], sv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      load4(p + i, pv);
      load4(g + i, gv);
      load4(m + i, mv);
      load4(v + i, vv);
      if (M == kExplore && !RESET) load4(s + i, sv);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        dps_entry<M>(pv[j], gv[j], mv[j], vv[j], sv[j], (bits >> j) & 1u, RESET, unscale, coef, h, a.step);
      store4(p + i, pv);
      store4(m + i, mv);
      store4(v + i, vv);
      if (M == kExplore) store4(s + i, sv);
    } else {
      for (int j = 0; j < 4 && i + j < end; ++j) {
        const int64_t k = i + j;
        float pk = load_value(p[k]), mk = m[k], vk = v[k];
        float sk = (M == kExplore && !RESET) ? s[k] : 0.0f;
        dps_entry<M>(pk, load_value(g[k]), mk, vk, sk, (bits >> j) & 1u, RESET, unscale, coef, h, a.step);
        p[k] = store_value<P>(pk);
        m[k] = mk;
        v[k] = vk;
        if (M == kExplore) s[k] = sk;
      }
    }
  }
}

template <int M, typename P>
__global__ void __launch_bounds__(kThreads)
    update_kernel(const TensorArgs* __restrict__ tensors, const Chunk* __restrict__ chunks, int nchunks, Hyper h,
                  const float* grad_coef, const float* inv_scale, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // a skipped GradScaler step writes nothing
  const float unscale = inv_scale != nullptr ? *inv_scale : 1.0f;
  const float coef = grad_coef != nullptr ? *grad_coef : 1.0f;
  for (int c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const Chunk chunk = chunks[c];
    const TensorArgs a = tensors[chunk.tensor];
    const int64_t begin = (int64_t)chunk.index * kUpdateChunk;
    const int64_t end = min64(begin + kUpdateChunk, a.numel);
    if (M == kExplore && a.reset)
      update_range<M, true, P>(a, begin, end, unscale, coef, h);
    else
      update_range<M, false, P>(a, begin, end, unscale, coef, h);
  }
}

template <typename P>
void launch_update(int mode, int grid, cudaStream_t stream, const TensorArgs* tensors, const Chunk* chunks,
                   int nchunks, const Hyper& h, const float* grad_coef, const float* inv_scale,
                   const float* found_inf) {
#define DPS_LAUNCH(M) \
  update_kernel<M, P><<<grid, kThreads, 0, stream>>>(tensors, chunks, nchunks, h, grad_coef, inv_scale, found_inf)
  switch (mode) {
    case kPlain: DPS_LAUNCH(kPlain); break;
    case kExplore: DPS_LAUNCH(kExplore); break;
    case kExploitGrad: DPS_LAUNCH(kExploitGrad); break;
    case kExploitFreeze: DPS_LAUNCH(kExploitFreeze); break;
    default: throw std::invalid_argument("dps_fast: unknown update mode");
  }
#undef DPS_LAUNCH
}

// ----- masked gradient norms (clip_grad_norm_) ------------------------------------------

// Per chunk: each thread sums (g * bit)^2 over its entries in fp32 (at most
// kUpdateChunk / kThreads = 64 terms), the block adds the threads' sums in
// double, and one atomic adds that to the tensor's total. An inf masked out
// gives NaN, as grad * mask does.
template <typename P>
__global__ void __launch_bounds__(kThreads)
    masked_norm_kernel(const NormArgs* __restrict__ tensors, const Chunk* __restrict__ chunks, int nchunks,
                       double* __restrict__ sums) {
  __shared__ double warp_sums[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const Chunk chunk = chunks[c];
    const NormArgs a = tensors[chunk.tensor];
    const P* __restrict__ g = (const P*)a.g;
    const int64_t begin = (int64_t)chunk.index * kUpdateChunk;
    const int64_t end = min64(begin + kUpdateChunk, a.numel);
    float sum = 0.0f;
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      const float x = load_value(g[i]) * (float)((a.mask[i >> 3] >> (i & 7)) & 1u);
      sum = fmaf(x, x, sum);
    }
    double total = sum;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_down_sync(0xffffffffu, total, offset);
    if (lane == 0) warp_sums[warp] = total;
    __syncthreads();
    if (threadIdx.x == 0) {
      double block = 0.0;
      for (int w = 0; w < kThreads / 32; ++w) block += warp_sums[w];
      atomicAdd(&sums[chunk.tensor], block);
    }
    __syncthreads();  // warp_sums is reused by the next chunk
  }
}

// ----- the selection ---------------------------------------------------------------

// Pass `pass`: per-block shared histograms of the candidates' digits, added
// to the tensor's global histogram. Lanes with the same digit are combined
// first (__match_any_sync), since scores crowd into few bins.
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(const SelectArgs* __restrict__ tensors, const Chunk* __restrict__ chunks, int nchunks,
                     const RadixState* __restrict__ states, unsigned long long* __restrict__ hist, int pass) {
  __shared__ uint32_t local[kRadixBins];
  const int lane = threadIdx.x & 31;
  for (int c = blockIdx.x; c < nchunks; c += gridDim.x) {
    for (int d = threadIdx.x; d < kRadixBins; d += kThreads) local[d] = 0;
    __syncthreads();
    const Chunk chunk = chunks[c];
    const SelectArgs a = tensors[chunk.tensor];
    const RadixState state = states[chunk.tensor];
    const int64_t begin = (int64_t)chunk.index * kSelectChunk;
    const int64_t end = min64(begin + kSelectChunk, a.numel);
    for (int64_t base = begin; base < end; base += (int64_t)kUnroll * kThreads) {  // the same trips for every lane
      float x[kUnroll];
      load_scores(a.score, base, end, x);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint32_t key = score_key(x[u]);
        const bool candidate = base + u * kThreads + threadIdx.x < end && radix_candidate(state, key);
        if (__ballot_sync(0xffffffffu, candidate) == 0) continue;
        const uint32_t digit = radix_digit(key, pass);
        const uint32_t peers = __match_any_sync(0xffffffffu, candidate ? digit : 0xffffffffu);
        if (candidate && lane == __ffs(peers) - 1) atomicAdd(&local[digit], (uint32_t)__popc(peers));
      }
    }
    __syncthreads();
    unsigned long long* out = hist + (size_t)chunk.tensor * kRadixBins;
    for (int d = threadIdx.x; d < kRadixBins; d += kThreads)
      if (local[d] != 0) atomicAdd(&out[d], (unsigned long long)local[d]);
    __syncthreads();
  }
}

// One block per tensor: find the bin of pass `pass` that holds the wanted
// entry, record its digit, and clear the histogram for the next pass.
__global__ void __launch_bounds__(kThreads) find_kernel(RadixState* __restrict__ states,
                                                        unsigned long long* __restrict__ hist, int pass) {
  __shared__ long long scan[kThreads];
  const int t = blockIdx.x;
  unsigned long long* h = hist + (size_t)t * kRadixBins;
  const int per = ((int)radix_digit_mask(pass) + 1) / kThreads;
  const int top = (int)radix_digit_mask(pass) - (int)threadIdx.x * per;  // this thread: digits top .. top-per+1
  const long long rank = states[t].rank;  // read by all before anyone writes the state
  long long sum = 0;
  for (int q = 0; q < per; ++q) sum += (long long)h[top - q];
  scan[threadIdx.x] = sum;
  __syncthreads();
  for (int offset = 1; offset < kThreads; offset <<= 1) {  // inclusive prefix sums, from the top digit down
    const long long add = threadIdx.x >= offset ? scan[threadIdx.x - offset] : 0;
    __syncthreads();
    scan[threadIdx.x] += add;
    __syncthreads();
  }
  const long long above = scan[threadIdx.x] - sum;
  if (above < rank && rank <= above + sum) {  // exactly one thread
    RadixState state = states[t];
    long long seen = above;
    for (int q = 0; q < per; ++q) {
      const long long count = (long long)h[top - q];
      if (seen + count >= rank) {
        radix_take(state, pass, (uint32_t)(top - q), seen);
        break;
      }
      seen += count;
    }
    states[t] = state;
  }
  __syncthreads();
  for (int q = 0; q < per; ++q) h[top - q] = 0;
}

// score_key(score) >= the threshold's key, packed: a warp's ballot is the 32-bit word of its 32
// consecutive entries (entry i is bit i % 8 of byte i / 8, little-endian).
__global__ void __launch_bounds__(kThreads)
    mask_kernel(const SelectArgs* __restrict__ tensors, const Chunk* __restrict__ chunks, int nchunks,
                const RadixState* __restrict__ states) {
  const int lane = threadIdx.x & 31;
  for (int c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const Chunk chunk = chunks[c];
    const SelectArgs a = tensors[chunk.tensor];
    const uint32_t threshold = radix_threshold_key(states[chunk.tensor]);
    const int64_t begin = (int64_t)chunk.index * kSelectChunk;
    const int64_t end = min64(begin + kSelectChunk, a.numel);
    for (int64_t base = begin; base < end; base += (int64_t)kUnroll * kThreads) {
      float x[kUnroll];
      load_scores(a.score, base, end, x);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t first = base + u * kThreads + (threadIdx.x & ~31);  // the warp's first entry
        const bool keep = first + lane < end && score_key(x[u]) >= threshold;
        const uint32_t word = __ballot_sync(0xffffffffu, keep);
        if (lane < 4 && first + 8 * lane < end) a.mask[(first >> 3) + lane] = (uint8_t)(word >> (8 * lane));
      }
    }
  }
}

// ----- host side -------------------------------------------------------------------

size_t round_up(size_t bytes) { return (bytes + 255) & ~(size_t)255; }

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

  Slot* acquire(int device, size_t host_bytes, size_t device_bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::unique_ptr<Slot>>& slots = slots_[device];
    Slot* slot = nullptr;
    Slot* oldest = nullptr;
    for (auto& candidate : slots) {
      if (candidate->in_use) continue;
      cudaError_t status = cudaEventQuery(candidate->done);
      if (status == cudaSuccess) {
        slot = candidate.get();
        break;
      }
      if (status != cudaErrorNotReady) check(status, "querying a staging event");
      if (oldest == nullptr || candidate->recorded < oldest->recorded) oldest = candidate.get();
    }
    if (slot == nullptr && oldest != nullptr && slots.size() >= kMaxSlots) {
      host_wait_count.fetch_add(1, std::memory_order_relaxed);
      check(cudaEventSynchronize(oldest->done), "waiting for a staging buffer");
      slot = oldest;
    }
    if (slot == nullptr) {
      slots.push_back(std::make_unique<Slot>());
      slot = slots.back().get();
      check(cudaEventCreateWithFlags(&slot->done, cudaEventDisableTiming), "creating an event");
    }
    if (slot->host_bytes < host_bytes) {
      host_wait_count.fetch_add(1, std::memory_order_relaxed);
      if (slot->host) check(cudaFreeHost(slot->host), "freeing pinned memory");
      slot->host = nullptr, slot->host_bytes = 0;
      size_t bytes = round_up(host_bytes * 2);
      check(cudaHostAlloc((void**)&slot->host, bytes, cudaHostAllocDefault), "allocating pinned memory");
      slot->host_bytes = bytes;
    }
    if (slot->device_bytes < device_bytes) {
      host_wait_count.fetch_add(1, std::memory_order_relaxed);
      if (slot->device) check(cudaFree(slot->device), "freeing device memory");
      slot->device = nullptr, slot->device_bytes = 0;
      size_t bytes = round_up(device_bytes * 2);
      check(cudaMalloc((void**)&slot->device, bytes), "allocating device memory for the tables");
      slot->device_bytes = bytes;
    }
    slot->in_use = true;
    return slot;
  }

  void release(Slot* slot, cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    cudaError_t status = cudaEventRecord(slot->done, stream);
    slot->recorded = ++calls_;
    slot->in_use = false;
    check(status, "recording a staging event");
  }

 private:
  std::mutex mutex_;
  std::map<int, std::vector<std::unique_ptr<Slot>>> slots_;
  uint64_t calls_ = 0;
};

// Updates and selections keep separate slots: a selection's slot holds its
// histograms (16 KiB per tensor), an update's only the tables.
Staging& update_staging() {
  static Staging* instance = new Staging();  // never destroyed: the CUDA runtime may be gone at exit
  return *instance;
}

Staging& select_staging() {
  static Staging* instance = new Staging();
  return *instance;
}

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

std::string describe_failure(cudaError_t status) {
  int driver = 0;
  cudaDriverGetVersion(&driver);
  std::string detail = std::string(" (") + cudaGetErrorName(status) + ": " + cudaGetErrorString(status) + ")";
  if (driver == 0) return "no CUDA driver is installed or loadable" + detail;
  if (driver < CUDART_VERSION)
    return "the CUDA driver supports CUDA " + std::to_string(driver / 1000) + "." +
           std::to_string(driver % 1000 / 10) + ", older than the CUDA " + std::to_string(CUDART_VERSION / 1000) +
           "." + std::to_string(CUDART_VERSION % 1000 / 10) + " this module was built with" + detail;
  return "the CUDA runtime finds no usable GPU" + detail;
}

void ensure_ready() {
  static std::atomic<bool> ready(false);
  if (ready.load(std::memory_order_acquire)) return;
  std::string reason = unavailable_reason();
  if (!reason.empty()) throw std::runtime_error("dps_fast CUDA kernels cannot run: " + reason);
  ready.store(true, std::memory_order_release);
}

// The tables are staged from host memory at each call, so a captured graph
// would replay stale tables: refuse capture rather than run wrong.
void refuse_capture(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(stream, &status), "querying stream capture");
  if (status != cudaStreamCaptureStatusNone)
    throw std::runtime_error("dps_fast CUDA kernels cannot be captured in a CUDA graph (their tables are staged "
                             "from host memory at each call)");
}

int grid_for(int device, int nchunks) {
  static std::mutex mutex;
  static std::map<int, int> sms;
  int count;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto found = sms.find(device);
    if (found == sms.end()) {
      int value = 0;
      check(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device), "reading the SM count");
      found = sms.emplace(device, value).first;
    }
    count = found->second;
  }
  int grid = count * kBlocksPerSm;
  return nchunks < grid ? nchunks : grid;
}

}  // namespace

std::string unavailable_reason() {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();
    return describe_failure(status);
  }
  if (count == 0) return "the CUDA runtime reports no GPU";
  return "";
}

int runtime_version() { return CUDART_VERSION; }

uint64_t host_waits() { return host_wait_count.load(std::memory_order_relaxed); }

int device_count() {
  ensure_ready();
  int count = 0;
  check(cudaGetDeviceCount(&count), "counting devices");
  return count;
}

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

void update(int device, int64_t stream_handle, int mode, int dtype, const std::vector<TensorArgs>& tensors,
            const Hyper& hyper, int64_t grad_coef, int64_t inv_scale, int64_t found_inf) {
  ensure_ready();
  cudaStream_t stream = (cudaStream_t)stream_handle;
  with_tables(device, stream, tensors, kUpdateChunk,
              [&](const TensorArgs* table, const Chunk* chunks, int nchunks, int grid) {
                with_dtype(dtype, [&](auto type) {
                  launch_update<typename decltype(type)::type>(mode, grid, stream, table, chunks, nchunks, hyper,
                                                               (const float*)grad_coef, (const float*)inv_scale,
                                                               (const float*)found_inf);
                });
                check(cudaGetLastError(), "launching the update kernel");
              });
}

void masked_sq_norms(int device, int64_t stream_handle, int dtype, const std::vector<NormArgs>& tensors,
                     int64_t sums) {
  ensure_ready();
  cudaStream_t stream = (cudaStream_t)stream_handle;
  with_tables(device, stream, tensors, kUpdateChunk,
              [&](const NormArgs* table, const Chunk* chunks, int nchunks, int grid) {
                with_dtype(dtype, [&](auto type) {
                  masked_norm_kernel<typename decltype(type)::type>
                      <<<grid, kThreads, 0, stream>>>(table, chunks, nchunks, (double*)sums);
                });
                check(cudaGetLastError(), "launching the masked-norm kernel");
              });
}

void select(int device, int64_t stream_handle, const std::vector<SelectArgs>& tensors) {
  ensure_ready();
  if (tensors.empty()) return;
  const std::vector<Chunk> chunks = make_chunks(tensors, kSelectChunk);
  const size_t n = tensors.size();
  std::vector<RadixState> states;
  for (const SelectArgs& t : tensors) states.push_back(radix_start(t.k));
  // host and device: [tensors][chunks][states]; device only: [histograms]
  const size_t chunks_at = round_up(n * sizeof(SelectArgs));
  const size_t states_at = chunks_at + round_up(chunks.size() * sizeof(Chunk));
  const size_t host_bytes = states_at + n * sizeof(RadixState);
  const size_t hist_at = round_up(host_bytes);
  const size_t hist_bytes = n * kRadixBins * sizeof(unsigned long long);
  cudaStream_t stream = (cudaStream_t)stream_handle;
  DeviceGuard guard(device);
  refuse_capture(stream);
  SlotUse slot(select_staging(), device, host_bytes, hist_at + hist_bytes, stream);
  memcpy(slot.host(), tensors.data(), n * sizeof(SelectArgs));
  memcpy(slot.host() + chunks_at, chunks.data(), chunks.size() * sizeof(Chunk));
  memcpy(slot.host() + states_at, states.data(), n * sizeof(RadixState));
  check(cudaMemcpyAsync(slot.device(), slot.host(), host_bytes, cudaMemcpyHostToDevice, stream), "copying the table");
  unsigned long long* hist = (unsigned long long*)(slot.device() + hist_at);
  check(cudaMemsetAsync(hist, 0, hist_bytes, stream), "clearing the histograms");
  const SelectArgs* table = (const SelectArgs*)slot.device();
  const Chunk* chunk_table = (const Chunk*)(slot.device() + chunks_at);
  RadixState* state_table = (RadixState*)(slot.device() + states_at);
  const int nchunks = (int)chunks.size();
  const int grid = grid_for(device, nchunks);
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    histogram_kernel<<<grid, kThreads, 0, stream>>>(table, chunk_table, nchunks, state_table, hist, pass);
    find_kernel<<<(unsigned)n, kThreads, 0, stream>>>(state_table, hist, pass);
  }
  mask_kernel<<<grid, kThreads, 0, stream>>>(table, chunk_table, nchunks, state_table);
  check(cudaGetLastError(), "launching the selection kernels");
}

}  // namespace cuda
}  // namespace dps
