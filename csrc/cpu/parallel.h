// What the CPU module's two files share: module.cpp (instruction sets, the
// update, the masked norms, the bindings) and select.cpp (the selection).
// Work is split into chunks of kChunk entries of all tensors (dps_table.h),
// run by OpenMP threads.
#pragma once
#include <stdint.h>

#include <vector>

#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace dps {
namespace cpu {

constexpr int64_t kChunk = 1 << 16;  // entries per parallel work item (a multiple of 32)

// The kernels of the instruction set in use (module.cpp).
Kernels& active();

// Threads for `entries` entries of work: one per kMinEntriesPerThread at
// most, since waking threads costs more than a small update.
constexpr int64_t kMinEntriesPerThread = 1 << 17;

template <typename Args>
int threads(int requested, const std::vector<Args>& tensors) {
#ifdef _OPENMP
  int64_t entries = 0;
  for (const Args& t : tensors) entries += t.numel;
  int64_t most = entries / kMinEntriesPerThread + 1;
  int wanted = requested > 0 ? requested : omp_get_max_threads();
  return (int)(wanted < most ? wanted : most);
#else
  (void)requested, (void)tensors;
  return 1;
#endif
}

// One past the last entry of `chunk` of `tensor`.
template <typename Args>
int64_t chunk_end(const Args& tensor, const Chunk& chunk) {
  int64_t end = ((int64_t)chunk.index + 1) * kChunk;
  return end < tensor.numel ? end : tensor.numel;
}

// select.cpp: writes the packed masks of the k largest scores of each tensor
// (ties kept); call without the GIL. Tensors of kSampledMin entries or more
// take the sampled selection, smaller ones the radix select.
void select(const std::vector<SelectArgs>& tensors, int num_threads);
constexpr int64_t kSampledMin = 1 << 18;

// select.cpp: sets the half-width, in standard deviations, of the sampled
// selection's bounds (for tests: 0 makes them miss); returns the previous one.
double set_sample_sigmas(double sigmas);

}  // namespace cpu
}  // namespace dps
