// The CPU selection: the packed mask of the k largest scores of each tensor
// (ties kept), parallel over chunks of all tensors. Every threshold is the
// exact k-th largest order key (dps_select.h).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <vector>

#include "parallel.h"

namespace dps {
namespace cpu {
namespace {

// Large tensors: a sample bounds the k-th largest key to [low, high]; one
// pass counts the keys above `high` and copies the few in [low, high], and
// the k-th largest is picked among those copies (std::nth_element). When the
// bounds miss, or too many keys fall inside them (heavy ties), the tensor goes
// to the exact radix select (dps_select.h, as on the GPU), which also takes
// the small tensors. Either way the threshold is the exact k-th largest score,
// and a last parallel pass packs the mask bits.

constexpr int64_t kChunkCandidates = kChunk / 8;  // more in one chunk: heavy ties, use radix select
double sample_bounds_sigmas = 4.0;  // half-width of the sample bounds, in standard deviations

struct Bounds {
  uint32_t low, high;
};

Bounds sample_bounds(const SelectArgs& t, double sigmas) {
  const int64_t n = t.numel;
  int64_t size = n / 128;
  size = size < 2048 ? 2048 : (size > 65536 ? 65536 : size);
  const int64_t stride = n / size;
  std::vector<uint32_t> keys((size_t)size);
  uint64_t state = 0x9e3779b97f4a7c15ull ^ (uint64_t)n;
  for (int64_t j = 0; j < size; ++j) {  // one entry from each of `size` equal strata
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    keys[(size_t)j] = order_key(t.score[j * stride + (int64_t)((state >> 33) % (uint64_t)stride)]);
  }
  const double q = (double)t.k / (double)n;
  const double center = q * (double)size, spread = sigmas * std::sqrt((double)size * q * (1 - q)) + 2;
  const int64_t top = (int64_t)std::floor(center - spread), bottom = (int64_t)std::ceil(center + spread);
  Bounds bounds{0u, 0xffffffffu};  // the r-th largest of the sample is its (size - r)-th smallest
  if (bottom <= size) {
    std::nth_element(keys.begin(), keys.begin() + (size - bottom), keys.end());
    bounds.low = keys[(size_t)(size - bottom)];
  }
  if (top >= 1) {
    std::nth_element(keys.begin(), keys.begin() + (size - top), keys.end());
    bounds.high = keys[(size_t)(size - top)];
  }
  return bounds;
}

// Threshold keys of the tensors `which`; returns those it could not settle.
std::vector<size_t> sampled_select(const Kernels& kernels, const std::vector<SelectArgs>& tensors,
                                   const std::vector<size_t>& which, std::vector<uint32_t>& keys, int nt) {
  const size_t n = which.size();
  std::vector<Bounds> bounds(n);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t i = 0; i < (int64_t)n; ++i) bounds[i] = sample_bounds(tensors[which[i]], sample_bounds_sigmas);

  std::vector<SelectArgs> subset;
  for (size_t t : which) subset.push_back(tensors[t]);
  const std::vector<Chunk> chunks = make_chunks(subset, kChunk);
  std::vector<std::vector<uint32_t>> candidates(n);
  std::vector<std::atomic<int64_t>> above(n);
  std::vector<std::atomic<bool>> failed(n);
  std::vector<std::mutex> locks(n);
  for (size_t i = 0; i < n; ++i) above[i] = 0, failed[i] = false;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<uint32_t> found(kChunkCandidates);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < (int64_t)chunks.size(); ++c) {
      const size_t i = chunks[c].tensor;
      if (failed[i].load(std::memory_order_relaxed)) continue;
      int64_t count_above = 0;
      const int64_t begin = (int64_t)chunks[c].index * kChunk;
      const int64_t count = kernels.collect(subset[i].score, begin, chunk_end(subset[i], chunks[c]), bounds[i].low,
                                            bounds[i].high, found.data(), kChunkCandidates, &count_above);
      if (count < 0) {
        failed[i] = true;
        continue;
      }
      above[i] += count_above;
      std::lock_guard<std::mutex> lock(locks[i]);
      candidates[i].insert(candidates[i].end(), found.begin(), found.begin() + count);
    }
  }
  std::vector<char> settled(n, 0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t i = 0; i < (int64_t)n; ++i) {
    std::vector<uint32_t>& found = candidates[i];
    const int64_t k = subset[i].k, over = above[i].load(), inside = (int64_t)found.size();
    if (failed[i] || !(over < k && k <= over + inside)) continue;  // the bounds missed
    const int64_t smallest = inside - (k - over);  // the (k - over)-th largest candidate
    std::nth_element(found.begin(), found.begin() + smallest, found.end());
    keys[which[i]] = found[(size_t)smallest];
    settled[i] = 1;
  }
  std::vector<size_t> unsettled;
  for (size_t i = 0; i < n; ++i)
    if (!settled[i]) unsettled.push_back(which[i]);
  return unsettled;
}

// Exact threshold keys of the tensors `which` by radix select: per pass, histogram then narrow.
void radix_select(const Kernels& kernels, const std::vector<SelectArgs>& tensors, const std::vector<size_t>& which,
                  std::vector<uint32_t>& keys, int nt) {
  std::vector<SelectArgs> subset;
  for (size_t t : which) subset.push_back(tensors[t]);
  const std::vector<Chunk> chunks = make_chunks(subset, kChunk);
  std::vector<RadixState> states;
  for (const SelectArgs& t : subset) states.push_back(radix_start(t.k));
  std::vector<std::atomic<int64_t>> hist(subset.size() * kBins);
  for (int pass = 0; pass < kPasses; ++pass) {
    for (auto& bin : hist) bin.store(0, std::memory_order_relaxed);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int64_t c = 0; c < (int64_t)chunks.size(); ++c) {
      const Chunk& chunk = chunks[c];
      const SelectArgs& t = subset[chunk.tensor];
      uint32_t local[kBins] = {0};
      kernels.histogram(t.score, (int64_t)chunk.index * kChunk, chunk_end(t, chunk), states[chunk.tensor], pass,
                        local);
      std::atomic<int64_t>* global = &hist[(size_t)chunk.tensor * kBins];
      for (int d = 0; d < kBins; ++d)
        if (local[d]) global[d].fetch_add(local[d], std::memory_order_relaxed);
    }
    for (size_t t = 0; t < subset.size(); ++t) {
      std::vector<int64_t> counts(kBins);
      for (int d = 0; d < kBins; ++d) counts[d] = hist[t * kBins + d].load(std::memory_order_relaxed);
      narrow(states[t], pass, counts.data());
    }
  }
  for (size_t i = 0; i < which.size(); ++i) keys[which[i]] = threshold_key(states[i]);
}

}  // namespace

void select(const std::vector<SelectArgs>& tensors, int num_threads) {
  const Kernels kernels = active();
  const int nt = threads(num_threads, tensors);
  std::vector<uint32_t> keys(tensors.size());
  std::vector<size_t> large, small;
  for (size_t t = 0; t < tensors.size(); ++t) (tensors[t].numel >= kSampledMin ? large : small).push_back(t);
  std::vector<size_t> unsettled = large.empty() ? large : sampled_select(kernels, tensors, large, keys, nt);
  small.insert(small.end(), unsettled.begin(), unsettled.end());
  if (!small.empty()) radix_select(kernels, tensors, small, keys, nt);
  const std::vector<Chunk> chunks = make_chunks(tensors, kChunk);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t c = 0; c < (int64_t)chunks.size(); ++c) {
    const Chunk& chunk = chunks[c];
    const SelectArgs& t = tensors[chunk.tensor];
    kernels.pack(t.score, t.mask, (int64_t)chunk.index * kChunk, chunk_end(t, chunk), keys[chunk.tensor]);
  }
}

double set_sample_sigmas(double sigmas) {
  const double old = sample_bounds_sigmas;
  sample_bounds_sigmas = sigmas;
  return old;
}

}  // namespace cpu
}  // namespace dps
