// The CPU kernels of one chunk, compiled once per instruction set
// (kernels.cpp with -DDPS_ISA=avx512|avx2|base); module.cpp picks one set at
// run time and runs them over the chunks of all tensors in parallel.
#pragma once
#include <stdint.h>

#include "../dps_select.h"
#include "../dps_table.h"

namespace dps {
namespace cpu {

struct Kernels {
  const char* name;
  // entries [begin, end) of one tensor; begin is a multiple of 32
  void (*update)(int mode, int dtype, int state_format, bool stochastic_params, const TensorArgs& tensor,
                 int64_t begin, int64_t end, float inv_scale, float grad_coef, const Hyper& hyper);
  // radix select's histogram (dps_select.h): add the digit counts of pass `pass` over the
  // candidates in [begin, end) to hist[kBins]
  void (*histogram)(const float* score, int64_t begin, int64_t end, const RadixState& state, int pass,
                    uint32_t* hist);
  // sampled select (select.cpp): count the keys of [begin, end) above `high` (into *above)
  // and copy those in [low, high] to out; returns how many, or -1 if more than `cap`
  int64_t (*collect)(const float* score, int64_t begin, int64_t end, uint32_t low, uint32_t high, uint32_t* out,
                     int64_t cap, int64_t* above);
  // pack the mask bits of [begin, end) (begin a multiple of 32): order_key(score) >= threshold
  void (*pack)(const float* score, uint8_t* mask, int64_t begin, int64_t end, uint32_t threshold);
  // sum over [begin, end) (begin a multiple of 32) of (g * bit)^2: the squared
  // norm of the masked gradient (an inf masked out gives NaN, as grad * mask does)
  double (*masked_sq_sum)(int dtype, const void* g, const uint8_t* mask, int64_t begin, int64_t end);
};

#define DPS_DECLARE_KERNELS(isa) \
  namespace isa {                \
  extern const Kernels kernels;  \
  }
DPS_DECLARE_KERNELS(avx512)
DPS_DECLARE_KERNELS(avx2)
DPS_DECLARE_KERNELS(base)
#undef DPS_DECLARE_KERNELS

}  // namespace cpu
}  // namespace dps
