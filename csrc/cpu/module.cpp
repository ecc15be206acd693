// Python module dps_fast._cpu_kernels: the multi-tensor update, the masked
// gradient norms and the selection (select.cpp) on CPU tensors, parallel
// (OpenMP) over chunks of all tensors, with the kernels of the best
// instruction set this CPU runs. Arguments are raw addresses and sizes, so no
// torch header is needed.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "../dps_bindings.h"
#include "parallel.h"

namespace py = pybind11;

namespace dps {
namespace cpu {
namespace {

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

}  // namespace

Kernels& active() {
  static Kernels kernels = [] {
    for (const Kernels& k : compiled())
      if (isa_runs_here(k.name)) return k;
    return base::kernels;
  }();
  return kernels;
}

namespace {

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

float read_scalar(int64_t address, float absent) { return address ? *(const float*)address : absent; }

void update(int mode, int dtype, int state_format, bool stochastic_params, const UpdateLists& lists, double lr,
            double beta1, double beta2, double eps, double weight_decay, int64_t grad_coef, int64_t inv_scale,
            int64_t found_inf, int num_threads) {
  const bool random = state_format == kStateBf16 || (stochastic_params && dtype != kFloat32);
  std::vector<TensorArgs> tensors =
      make_tensor_args(mode, lists, lr, beta1, beta2, dtype_size(dtype), state_size(state_format), random);
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
    kernels.update(mode, dtype, state_format, stochastic_params, tensor, (int64_t)chunks[c].index * kChunk,
                   chunk_end(tensor, chunks[c]), unscale, coef, hyper);
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

}  // namespace
}  // namespace cpu
}  // namespace dps

PYBIND11_MODULE(_cpu_kernels, m) {
  using namespace dps;
  m.doc() = "dps_fast CPU kernels (see dps_fast/backends/cpu.py)";
  m.def(
      "update",
      [](int mode, int dtype, int state_format, bool stochastic_params, std::vector<int64_t> p,
         std::vector<int64_t> g, std::vector<int64_t> m_, std::vector<int64_t> v, std::vector<int64_t> s,
         std::vector<int64_t> mask, std::vector<int64_t> numel, std::vector<int64_t> steps,
         std::vector<int64_t> reset, std::vector<int64_t> key_a, std::vector<int64_t> key_b,
         std::vector<int64_t> offsets, double lr, double beta1, double beta2, double eps, double weight_decay,
         int64_t grad_coef, int64_t inv_scale, int64_t found_inf, int num_threads) {
        UpdateLists lists{std::move(p),     std::move(g),     std::move(m_),    std::move(v),
                          std::move(s),     std::move(mask),  std::move(numel), std::move(steps),
                          std::move(reset), std::move(key_a), std::move(key_b), std::move(offsets)};
        cpu::update(mode, dtype, state_format, stochastic_params, lists, lr, beta1, beta2, eps, weight_decay,
                    grad_coef, inv_scale, found_inf, num_threads);
      },
      "One multi-tensor DPS/AdamW update; addresses of contiguous CPU tensors, 0 for an absent scalar.");
  m.def(
      "select",
      [](const std::vector<int64_t>& scores, const std::vector<int64_t>& masks, const std::vector<int64_t>& numels,
         const std::vector<int64_t>& ks, int num_threads) {
        std::vector<SelectArgs> tensors = make_select_args(scores, masks, numels, ks);
        py::gil_scoped_release release;
        cpu::select(tensors, num_threads);
      },
      "Packed top-k masks (ties kept) of fp32 score tensors.");
  m.def("masked_sq_norms", &cpu::masked_sq_norms,
        "Per tensor, the squared L2 norm of grad * mask (packed mask bits); contiguous CPU tensors of one dtype.");
  m.def("isa", [] { return std::string(cpu::active().name); }, "The instruction set the kernels run with.");
  m.def("runnable_isas", &cpu::runnable_isas, "Instruction sets compiled in that this CPU runs, best first.");
  m.def("set_isa", &cpu::set_isa, "Use the kernels built for another instruction set (for tests).");
  m.def("set_sample_sigmas", &cpu::set_sample_sigmas,
      "Half-width of the sampled selection's bounds in standard deviations (for tests: 0 makes them miss); "
      "returns the previous value.");
  export_codes(m);
  m.attr("chunk_entries") = cpu::kChunk;
  m.attr("sampled_min_entries") = cpu::kSampledMin;
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
