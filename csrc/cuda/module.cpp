// Python module dps_fast._cuda_kernels: the CUDA update, masked norms and
// selection (update.cu, norms.cu, select.cu; staging.cu: the host side of a
// call and the device queries). Arguments are raw addresses, sizes and the stream as
// integers, so no torch header is needed; built with the host compiler.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "../dps_bindings.h"
#include "launch.h"

namespace py = pybind11;

#ifndef DPS_CUDA_ARCHS
#define DPS_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_cuda_kernels, m) {
  using namespace dps;
  m.doc() = "dps_fast CUDA kernels (see dps_fast/backends/cuda.py)";
  m.def(
      "update",
      [](int device, int64_t stream, int mode, int dtype, int state_format, bool stochastic_params,
         std::vector<int64_t> p, std::vector<int64_t> g, std::vector<int64_t> m_, std::vector<int64_t> v,
         std::vector<int64_t> s, std::vector<int64_t> mask, std::vector<int64_t> numel, std::vector<int64_t> steps,
         std::vector<int64_t> reset, std::vector<int64_t> key_a, std::vector<int64_t> key_b,
         std::vector<int64_t> offsets, double lr, double beta1, double beta2, double eps, double weight_decay,
         int64_t grad_coef, int64_t inv_scale, int64_t found_inf) {
        UpdateLists lists{std::move(p),     std::move(g),     std::move(m_),    std::move(v),
                          std::move(s),     std::move(mask),  std::move(numel), std::move(steps),
                          std::move(reset), std::move(key_a), std::move(key_b), std::move(offsets)};
        const bool random = state_format == kStateBf16 || (stochastic_params && dtype != kFloat32);
        std::vector<TensorArgs> tensors = make_tensor_args(mode, lists, lr, beta1, beta2, dtype_size(dtype),
                                                           state_size(state_format), random);
        Hyper hyper = make_hyper(lr, beta1, beta2, eps, weight_decay);
        py::gil_scoped_release release;
        cuda::update(device, stream, mode, dtype, state_format, stochastic_params, tensors, hyper, grad_coef,
                     inv_scale, found_inf);
      },
      "One launch updating every tensor (addresses of contiguous tensors on `device`), queued on `stream`.");
  m.def(
      "select",
      [](int device, int64_t stream, const std::vector<int64_t>& scores, const std::vector<int64_t>& masks,
         const std::vector<int64_t>& numels, const std::vector<int64_t>& ks) {
        std::vector<SelectArgs> tensors = make_select_args(scores, masks, numels, ks);
        py::gil_scoped_release release;
        cuda::select(device, stream, tensors);
      },
      "Packed top-k masks (ties kept) of fp32 score tensors, queued on `stream`.");
  m.def(
      "masked_sq_norms",
      [](int device, int64_t stream, int dtype, const std::vector<int64_t>& grads, const std::vector<int64_t>& masks,
         const std::vector<int64_t>& numels, int64_t sums) {
        dtype_size(dtype);  // rejects an unknown dtype code
        std::vector<NormArgs> tensors = make_norm_args(grads, masks, numels);
        py::gil_scoped_release release;
        cuda::masked_sq_norms(device, stream, dtype, tensors, sums);
      },
      "Adds each grad * mask's squared L2 norm to the fp64 device array at `sums`, queued on `stream`.");
  m.def(
      "unavailable_reason",
      []() -> py::object {
        std::string reason = cuda::unavailable_reason();
        if (reason.empty()) return py::none();
        return py::str(reason);
      },
      "None if the CUDA runtime reaches a GPU, else why not.");
  m.def("device_count", &cuda::device_count, "GPUs the runtime sees; RuntimeError saying why if none is usable.");
  m.def("host_waits", &cuda::host_waits,
        "Staging-buffer allocations, frees and event waits so far (where a call may wait for the GPU).");
  export_codes(m);
  m.attr("update_chunk_entries") = cuda::kUpdateChunk;
  m.attr("select_chunk_entries") = cuda::kSelectChunk;
  m.attr("archs") = DPS_CUDA_ARCHS;
  m.attr("runtime_version") = cuda::runtime_version();
}
