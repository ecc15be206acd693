// The host side of every CUDA call (staging.cuh): staging slots, device
// checks and launch geometry; and the module's device queries (launch.h).
#include <atomic>

#include "staging.cuh"

namespace dps {
namespace cuda {
namespace {

// Staging allocations, frees and event waits so far (each may make the host wait for the GPU).
std::atomic<uint64_t> host_wait_count(0);

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

}  // namespace

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear it, so that later calls do not report it again
    throw std::runtime_error(std::string("dps_fast CUDA kernels: ") + what + ": " + cudaGetErrorString(status));
  }
}

Slot* Staging::acquire(int device, size_t host_bytes, size_t device_bytes) {
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

void Staging::release(Slot* slot, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  cudaError_t status = cudaEventRecord(slot->done, stream);
  slot->recorded = ++calls_;
  slot->in_use = false;
  check(status, "recording a staging event");
}

Staging& update_staging() {
  static Staging* instance = new Staging();  // never destroyed: the CUDA runtime may be gone at exit
  return *instance;
}

Staging& select_staging() {
  static Staging* instance = new Staging();
  return *instance;
}

void ensure_ready() {
  static std::atomic<bool> ready(false);
  if (ready.load(std::memory_order_acquire)) return;
  std::string reason = unavailable_reason();
  if (!reason.empty()) throw std::runtime_error("dps_fast CUDA kernels cannot run: " + reason);
  ready.store(true, std::memory_order_release);
}

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

}  // namespace cuda
}  // namespace dps
