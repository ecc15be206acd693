// Python module dps_fast._cpu_kernels: the multi-tensor update and the
// selection on CPU tensors, parallel (OpenMP) over chunks of all tensors.
// Arguments are raw addresses and sizes, so no torch header is needed.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <string>
#include <vector>

#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace dps {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1 << 16;  // entries per parallel work item (a multiple of 32)

bool isa_runs_here(const std::string& name) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return name == "base";
}

// Instruction sets compiled in, best first (the x86 ones only on x86).
std::vector<Kernels> compiled() {
#if defined(DPS_WITH_X86_ISAS)
  return {avx512::kernels, avx2::kernels, base::kernels};
#else
  return {base::kernels};
#endif
}

Kernels& active() {
  static Kernels kernels = [] {
    for (const Kernels& k : compiled())
      if (isa_runs_here(k.name)) return k;
    return base::kernels;
  }();
  return kernels;
}

std::vector<std::string> runnable_isas() {
  std::vector<std::string> names;
  for (const Kernels& k : compiled())
    if (isa_runs_here(k.name)) names.push_back(k.name);
  return names;
}

void set_isa(const std::string& name) {
  for (const Kernels& k : compiled()) {
    if (name == k.name) {
      if (!isa_runs_here(name)) throw std::invalid_argument("dps_fast: this CPU cannot run the " + name + " kernels");
      active() = k;
      return;
    }
  }
  throw std::invalid_argument("dps_fast: no kernels named '" + name + "' in this build");
}

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

template <typename Args>
int64_t chunk_end(const Args& tensor, const Chunk& chunk) {
  int64_t end = ((int64_t)chunk.index + 1) * kChunk;
  return end < tensor.numel ? end : tensor.numel;
}

float read_scalar(int64_t address, float absent) { return address ? *(const float*)address : absent; }

void update(int mode, int dtype, const UpdateLists& lists, double lr, double beta1, double beta2, double eps,
            double weight_decay, int64_t grad_coef, int64_t inv_scale, int64_t found_inf, int num_threads) {
  std::vector<TensorArgs> tensors = make_tensor_args(mode, lists, lr, beta1, beta2, dtype_size(dtype));
  if (read_scalar(found_inf, 0.0f) != 0.0f) return;  // a skipped GradScaler step writes nothing
  float unscale = read_scalar(inv_scale, 1.0f), coef = read_scalar(grad_coef, 1.0f);
  Hyper hyper = make_hyper(lr, beta1, beta2, eps, weight_decay);
  std::vector<Chunk> chunks = make_chunks(tensors, kChunk);
  const Kernels kernels = active();
  int64_t count = (int64_t)chunks.size();
  py::gil_scoped_release release;
  const int nt = threads(num_threads, tensors);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t c = 0; c < count; ++c) {
    const TensorArgs& tensor = tensors[chunks[c].tensor];
    kernels.update(mode, dtype, tensor, (int64_t)chunks[c].index * kChunk, chunk_end(tensor, chunks[c]),
                   unscale, coef, hyper);
  }
}

// ----- masked gradient norms ----------------------------------------------------------

// Per tensor, the squared L2 norm of grad * mask (summed in double, chunk by
// chunk in a fixed order, so the result does not depend on the thread count).
std::vector<double> masked_sq_norms(int dtype, const std::vector<int64_t>& grads, const std::vector<int64_t>& masks,
                                    const std::vector<int64_t>& numels, int num_threads) {
  dtype_size(dtype);  // rejects an unknown dtype code
  const std::vector<NormArgs> tensors = make_norm_args(grads, masks, numels);
  const size_t n = tensors.size();
  const std::vector<Chunk> chunks = make_chunks(tensors, kChunk);
  std::vector<double> partial(chunks.size());
  const Kernels kernels = active();
  {
    py::gil_scoped_release release;
    const int nt = threads(num_threads, tensors);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int64_t c = 0; c < (int64_t)chunks.size(); ++c) {
      const NormArgs& t = tensors[chunks[c].tensor];
      partial[c] = kernels.masked_sq_sum(dtype, t.g, t.mask, (int64_t)chunks[c].index * kChunk, chunk_end(t, chunks[c]));
    }
  }
  std::vector<double> sums(n, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) sums[chunks[c].tensor] += partial[c];
  return sums;
}

// ----- selection --------------------------------------------------------------------
//
// Large tensors: a sample bounds the k-th largest key to [low, high]; one
// pass counts the keys above `high` and copies the few in [low, high], and
// the k-th largest is picked among those copies (std::nth_element). When the
// bounds miss, or too many keys fall inside them (heavy ties), the tensor goes
// to the exact radix select (dps_select.h, as on the GPU), which also takes
// the small tensors. Either way the threshold is the exact k-th largest score.

constexpr int64_t kSampledMin = 1 << 18;  // smaller tensors go straight to radix select
constexpr int64_t kChunkCandidates = kChunk / 8;  // more in one chunk: heavy ties, use radix select
double g_sample_sigmas = 4.0;  // half-width of the sample bounds, in standard deviations

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
    keys[(size_t)j] = score_key(t.score[j * stride + (int64_t)((state >> 33) % (uint64_t)stride)]);
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
  for (int64_t i = 0; i < (int64_t)n; ++i) bounds[i] = sample_bounds(tensors[which[i]], g_sample_sigmas);

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

// Exact threshold keys of the tensors `which` by radix select (three histogram passes).
void radix_select(const Kernels& kernels, const std::vector<SelectArgs>& tensors, const std::vector<size_t>& which,
                  std::vector<uint32_t>& keys, int nt) {
  std::vector<SelectArgs> subset;
  for (size_t t : which) subset.push_back(tensors[t]);
  const std::vector<Chunk> chunks = make_chunks(subset, kChunk);
  std::vector<RadixState> states;
  for (const SelectArgs& t : subset) states.push_back(radix_start(t.k));
  std::vector<std::atomic<int64_t>> hist(subset.size() * kRadixBins);
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    for (auto& bin : hist) bin.store(0, std::memory_order_relaxed);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int64_t c = 0; c < (int64_t)chunks.size(); ++c) {
      const Chunk& chunk = chunks[c];
      const SelectArgs& t = subset[chunk.tensor];
      uint32_t local[kRadixBins] = {0};
      kernels.histogram(t.score, (int64_t)chunk.index * kChunk, chunk_end(t, chunk), states[chunk.tensor], pass,
                        local);
      std::atomic<int64_t>* global = &hist[(size_t)chunk.tensor * kRadixBins];
      for (int d = 0; d < kRadixBins; ++d)
        if (local[d]) global[d].fetch_add(local[d], std::memory_order_relaxed);
    }
    for (size_t t = 0; t < subset.size(); ++t) {
      std::vector<int64_t> counts(kRadixBins);
      for (int d = 0; d < kRadixBins; ++d) counts[d] = hist[t * kRadixBins + d].load(std::memory_order_relaxed);
      radix_scan(states[t], pass, counts.data());
    }
  }
  for (size_t i = 0; i < which.size(); ++i) keys[which[i]] = states[i].prefix;
}

void select(const std::vector<int64_t>& scores, const std::vector<int64_t>& masks,
            const std::vector<int64_t>& numels, const std::vector<int64_t>& ks, int num_threads) {
  const std::vector<SelectArgs> tensors = make_select_args(scores, masks, numels, ks);
  const Kernels kernels = active();
  const int nt = threads(num_threads, tensors);
  py::gil_scoped_release release;
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
    kernels.mask(t.score, t.mask, (int64_t)chunk.index * kChunk, chunk_end(t, chunk), keys[chunk.tensor]);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace dps

PYBIND11_MODULE(_cpu_kernels, m) {
  using namespace dps;
  m.doc() = "dps_fast CPU kernels (see dps_fast/backends/cpu.py)";
  m.def(
      "update",
      [](int mode, int dtype, std::vector<int64_t> p, std::vector<int64_t> g, std::vector<int64_t> m_,
         std::vector<int64_t> v, std::vector<int64_t> s, std::vector<int64_t> mask, std::vector<int64_t> numel,
         std::vector<int64_t> steps, std::vector<int64_t> reset, double lr, double beta1, double beta2, double eps,
         double weight_decay, int64_t grad_coef, int64_t inv_scale, int64_t found_inf, int num_threads) {
        UpdateLists lists{std::move(p), std::move(g), std::move(m_), std::move(v), std::move(s),
                          std::move(mask), std::move(numel), std::move(steps), std::move(reset)};
        cpu::update(mode, dtype, lists, lr, beta1, beta2, eps, weight_decay, grad_coef, inv_scale,
                    found_inf, num_threads);
      },
      "One multi-tensor DPS/AdamW update; addresses of contiguous CPU tensors, 0 for an absent scalar.");
  m.def("select", &cpu::select, "Packed top-k masks (ties kept) of fp32 score tensors.");
  m.def("masked_sq_norms", &cpu::masked_sq_norms,
        "Per tensor, the squared L2 norm of grad * mask (packed mask bits); contiguous CPU tensors of one dtype.");
  m.def("isa", [] { return std::string(cpu::active().name); }, "The instruction set the kernels run with.");
  m.def("runnable_isas", &cpu::runnable_isas, "Instruction sets compiled in that this CPU runs, best first.");
  m.def("set_isa", &cpu::set_isa, "Use the kernels built for another instruction set (for tests).");
  m.def(
      "set_sample_sigmas",
      [](double sigmas) {
        double old = cpu::g_sample_sigmas;
        cpu::g_sample_sigmas = sigmas;
        return old;
      },
      "Half-width of the sampled selection's bounds in standard deviations (for tests: 0 makes them miss); "
      "returns the previous value.");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
