// The exact per-tensor selection of the CPU and CUDA kernels: the order key
// and the radix select over it. Every selection of dps_fast (this one,
// dps_fast/backends/triton_backend/select_kernels.py, dps_fast/distributed.py)
// uses these words for these steps:
//
//   order key  a uint32 per fp32 score whose unsigned order is the float
//              order (dps_fast.selection.order_keys): NaN ranks as -inf,
//              -0.0 as +0.0
//   digit      a field of the key; the digit plan (Note [digit plan]) splits
//              the key into kPasses digits (PASSES in Python), most
//              significant first; one pass per digit
//   candidate  a key whose higher digits equal the prefix found so far
//   histogram  per tensor, count the candidates' digit of this pass
//   narrow     find the digit holding the rank-th largest candidate, append
//              it to the prefix, and make rank its rank among the candidates
//              with that digit (rank starts at k)
//   pack       after the last pass the prefix is the threshold key, that of
//              the k-th largest score: write the mask bits
//              order_key(score) >= threshold (ties kept), entry i as bit
//              i % 8 of byte i / 8
//
// Note [digit plan]
// Python and Triton split the key into 4 digits of 8 bits (DIGIT_BITS in
// dps_fast.selection); the C++ kernels into 3 digits of 11, 11 and 10 bits
// (kPasses, kBins, digit_shift and digit_mask below). The reason is the GPU:
// each pass reads every score again, so 3 passes and the pack read them 4
// times, not 5 (Triton stays at 8 bits because tl.histogram's cost grows with
// the bin count). That is reasoned, not yet measured on a GPU. On the CPU the
// two plans run alike: select() on the radix path (tensors below kSampledMin,
// or those the sample misses), one thread, AVX-512, 8x4's time over
// 11/11/10's, paired in one process (medians of 15 alternating rounds; two
// runs): 1 tensor of 2^17 entries 1.01, 1.10; 1 of 2^18 - 1: 1.00, 0.95;
// 24 of 384 x 384: 0.97, 1.00; 12 of 2^12 to 2^17: 0.99, 1.01; 1 of 2^21
// forced past the sample: 0.95, 0.95; 120 of 768 or 3072 entries (one chunk
// each, where the 2048 bins' fixed cost shows): 0.80, 0.92.
#pragma once
#include <stdint.h>

#include "dps_math.h"

namespace dps {

constexpr int kPasses = 3;
constexpr int kBins = 2048;  // bins of the widest digit (11 bits)

DPS_HD int digit_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
DPS_HD uint32_t digit_mask(int pass) { return pass == 2 ? 0x3ffu : 0x7ffu; }

// The order key: negative floats flip all their bits, the others set the top bit.
DPS_HD uint32_t order_key(float x) {  // branch-free: selects, so the loops vectorise
  uint32_t u = float_to_bits(x);
  u = (x == 0.0f) ? 0u : u;
  u = (x != x) ? 0xff800000u : u;  // -inf
  return u ^ ((uint32_t)((int32_t)u >> 31) | 0x80000000u);
}

// The fp32 value whose order key is `key` (the inverse of order_key on non-NaN,
// non-negative-zero values).
DPS_HD float key_to_score(uint32_t key) {
  return bits_to_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// For every non-NaN x, order_key(x) >= key  <=>  x >= key_to_score(key) (-0.0 and +0.0
// compare equal either way); a NaN ranks as -inf. So a pack can compare floats, which
// vectorises better, unless the threshold is -inf's key, when every entry is kept.
constexpr uint32_t kMinusInfKey = 0x007fffffu;  // order_key(-inf), the smallest key
constexpr uint32_t kPlusInfKey = 0xff800000u;   // order_key(+inf), the largest

// The search state of one tensor between passes.
struct RadixState {
  uint32_t prefix;       // digits found so far, in place
  uint32_t prefix_mask;  // which bits of the key they cover
  int64_t rank;          // the wanted entry is the rank-th largest (1-based) among the candidates
};

DPS_HD RadixState radix_start(int64_t k) {
  RadixState s;
  s.prefix = 0;
  s.prefix_mask = 0;
  s.rank = k;
  return s;
}

DPS_HD bool is_candidate(const RadixState& s, uint32_t key) { return (key & s.prefix_mask) == s.prefix; }
DPS_HD uint32_t digit_of(uint32_t key, int pass) { return (key >> digit_shift(pass)) & digit_mask(pass); }

// Narrow to `digit` of pass `pass`, given that `above` candidates have a larger digit.
DPS_HD void narrow_to(RadixState& s, int pass, uint32_t digit, int64_t above) {
  s.prefix |= digit << digit_shift(pass);
  s.prefix_mask |= digit_mask(pass) << digit_shift(pass);
  s.rank -= above;
}

// Narrow by a serial scan of the pass's whole histogram from the top digit
// (the CPU; the CUDA narrow_kernel splits the scan over a block).
template <typename Count>
DPS_HD void narrow(RadixState& s, int pass, const Count* hist) {
  int64_t above = 0;
  for (int d = (int)digit_mask(pass); d >= 0; --d) {
    int64_t count = (int64_t)hist[d];
    if (above + count >= s.rank) {
      narrow_to(s, pass, (uint32_t)d, above);
      return;
    }
    above += count;
  }
}

// After the last pass: the order key of the k-th largest score.
DPS_HD uint32_t threshold_key(const RadixState& s) { return s.prefix; }

}  // namespace dps
