// What the CUDA kernels (the .cu files, built by nvcc) offer the Python module
// (module.cpp, built by the host compiler): plain C++ with no CUDA types.
#pragma once
#include <stdint.h>

#include <string>
#include <vector>

#include "../dps_table.h"

namespace dps {
namespace cuda {

// Entries per work item (one block at a time) of each kernel family.
constexpr int64_t kUpdateChunk = 16384;  // the update and the masked norms
constexpr int64_t kSelectChunk = 65536;  // the selection

// "" if the runtime reaches a CUDA device, else why not.
std::string unavailable_reason();
// The CUDA runtime version the module was built with, e.g. 13000.
int runtime_version();
// Throws std::runtime_error saying why when no CUDA device is usable.
int device_count();
// How often the staging code allocated or freed a table buffer or waited on
// an event so far: the only places where a call may wait for the GPU.
uint64_t host_waits();

// One launch for every tensor (all of dtype `dtype` on `device`), queued on
// `stream` (a cudaStream_t as an integer). grad_coef, inv_scale and found_inf
// are device addresses of fp32 scalars, or 0 when absent; a nonzero
// *found_inf makes the kernel write nothing.
void update(int device, int64_t stream, int mode, int dtype, int state_format, bool stochastic_params,
            const std::vector<TensorArgs>& tensors,
            const Hyper& hyper, int64_t grad_coef, int64_t inv_scale, int64_t found_inf);

// Adds the squared L2 norm of each grad * mask (of dtype `dtype`) to the
// fp64 device array at `sums` (one entry per tensor, zeroed by the caller),
// queued on `stream`.
void masked_sq_norms(int device, int64_t stream, int dtype, const std::vector<NormArgs>& tensors, int64_t sums);

// Packed masks of the k largest scores of each tensor (ties kept), queued on `stream`.
void select(int device, int64_t stream, const std::vector<SelectArgs>& tensors);

}  // namespace cuda
}  // namespace dps
