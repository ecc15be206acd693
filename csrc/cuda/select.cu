// The batched radix select (dps_select.h) of every tensor's k-th largest
// score: per pass, histogram_kernel then narrow_kernel; then pack_kernel
// writes the mask bits. No sort, no copy of the scores.
#include "../dps_select.h"
#include "staging.cuh"

namespace dps {
namespace cuda {
namespace {

constexpr int kUnroll = 4;  // loads in flight per thread
static_assert(kSelectChunk % (kUnroll * kThreads) == 0, "the passes' loops take kUnroll * kThreads entries");

// The selection passes' loads: kUnroll scores per thread from [base, end), 0 past the end
// (all loads issued before any is used, to keep kUnroll of them in flight).
__device__ __forceinline__ void load_scores(const float* score, int64_t base, int64_t end, float x[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = base + u * kThreads + threadIdx.x;
    x[u] = i < end ? score[i] : 0.0f;
  }
}

// Histogram of pass `pass`: per-block shared histograms of the candidates' digits, added
// to the tensor's global histogram. Lanes with the same digit are combined
// first (__match_any_sync), since scores crowd into few bins.
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(const SelectArgs* __restrict__ tensors, const Chunk* __restrict__ chunks, int nchunks,
                     const RadixState* __restrict__ states, unsigned long long* __restrict__ hist, int pass) {
  __shared__ uint32_t local[kBins];
  const int lane = threadIdx.x & 31;
  for (int c = blockIdx.x; c < nchunks; c += gridDim.x) {
    for (int d = threadIdx.x; d < kBins; d += kThreads) local[d] = 0;
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
        const uint32_t key = order_key(x[u]);
        const bool candidate = base + u * kThreads + threadIdx.x < end && is_candidate(state, key);
        if (__ballot_sync(0xffffffffu, candidate) == 0) continue;
        const uint32_t digit = digit_of(key, pass);
        const uint32_t peers = __match_any_sync(0xffffffffu, candidate ? digit : 0xffffffffu);
        if (candidate && lane == __ffs(peers) - 1) atomicAdd(&local[digit], (uint32_t)__popc(peers));
      }
    }
    __syncthreads();
    unsigned long long* out = hist + (size_t)chunk.tensor * kBins;
    for (int d = threadIdx.x; d < kBins; d += kThreads)
      if (local[d] != 0) atomicAdd(&out[d], (unsigned long long)local[d]);
    __syncthreads();
  }
}

// Narrow, one block per tensor: find the digit of pass `pass` whose bin holds
// the wanted entry (a scan of the histogram split over the block), append it
// to the prefix, and clear the histogram for the next pass.
__global__ void __launch_bounds__(kThreads) narrow_kernel(RadixState* __restrict__ states,
                                                          unsigned long long* __restrict__ hist, int pass) {
  __shared__ long long scan[kThreads];
  const int t = blockIdx.x;
  unsigned long long* h = hist + (size_t)t * kBins;
  const int per = ((int)digit_mask(pass) + 1) / kThreads;
  const int top = (int)digit_mask(pass) - (int)threadIdx.x * per;  // this thread: digits top .. top-per+1
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
        narrow_to(state, pass, (uint32_t)(top - q), seen);
        break;
      }
      seen += count;
    }
    states[t] = state;
  }
  __syncthreads();
  for (int q = 0; q < per; ++q) h[top - q] = 0;
}

// Pack order_key(score) >= the threshold key: a warp's ballot is the 32-bit word of its 32
// consecutive entries (entry i is bit i % 8 of byte i / 8, little-endian).
__global__ void __launch_bounds__(kThreads)
    pack_kernel(const SelectArgs* __restrict__ tensors, const Chunk* __restrict__ chunks, int nchunks,
                const RadixState* __restrict__ states) {
  const int lane = threadIdx.x & 31;
  for (int c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const Chunk chunk = chunks[c];
    const SelectArgs a = tensors[chunk.tensor];
    const uint32_t threshold = threshold_key(states[chunk.tensor]);
    const int64_t begin = (int64_t)chunk.index * kSelectChunk;
    const int64_t end = min64(begin + kSelectChunk, a.numel);
    for (int64_t base = begin; base < end; base += (int64_t)kUnroll * kThreads) {
      float x[kUnroll];
      load_scores(a.score, base, end, x);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t first = base + u * kThreads + (threadIdx.x & ~31);  // the warp's first entry
        const bool keep = first + lane < end && order_key(x[u]) >= threshold;
        const uint32_t word = __ballot_sync(0xffffffffu, keep);
        if (lane < 4 && first + 8 * lane < end) a.mask[(first >> 3) + lane] = (uint8_t)(word >> (8 * lane));
      }
    }
  }
}

}  // namespace

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
  const size_t hist_bytes = n * kBins * sizeof(unsigned long long);
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
  for (int pass = 0; pass < kPasses; ++pass) {
    histogram_kernel<<<grid, kThreads, 0, stream>>>(table, chunk_table, nchunks, state_table, hist, pass);
    narrow_kernel<<<(unsigned)n, kThreads, 0, stream>>>(state_table, hist, pass);
  }
  pack_kernel<<<grid, kThreads, 0, stream>>>(table, chunk_table, nchunks, state_table);
  check(cudaGetLastError(), "launching the selection kernels");
}

}  // namespace cuda
}  // namespace dps
