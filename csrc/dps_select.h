// Exact per-tensor selection by radix select over the fp32 bit patterns of the
// scores, shared by the CPU and CUDA kernels.
//
// key(x) is a uint32 that orders like the float x (for x >= 0 it is just the
// bits with the top bit set). The k-th largest key is found digit by digit,
// most significant first: a histogram of the digit over the entries whose
// higher digits equal the prefix found so far, then the digit whose bin holds
// the k-th largest. Three passes (11 + 11 + 10 bits) find it exactly; the mask
// is then key >= the threshold's key, as in dps_fast.selection.
#pragma once
#include <stdint.h>

#include "dps_math.h"

namespace dps {

constexpr int kRadixPasses = 3;
constexpr int kRadixBins = 2048;  // bins of the widest digit (11 bits)

DPS_HD int radix_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
DPS_HD uint32_t radix_digit_mask(int pass) { return pass == 2 ? 0x3ffu : 0x7ffu; }

// The order key of dps_fast/selection.py (order_keys): a NaN ranks as -inf
// and -0.0 as +0.0; negative floats flip all bits, the others set the top bit.
DPS_HD uint32_t score_key(float x) {  // branch-free: selects, so the loops vectorise
  uint32_t u = float_to_bits(x);
  u = (x == 0.0f) ? 0u : u;
  u = (x != x) ? 0xff800000u : u;  // -inf
  return u ^ ((uint32_t)((int32_t)u >> 31) | 0x80000000u);
}

// The search state of one tensor between passes.
struct RadixState {
  uint32_t prefix;       // digits found so far, in place
  uint32_t prefix_mask;  // which bits of the key they cover
  int64_t rank;          // the wanted entry is the rank-th largest (1-based) among the matching keys
};

DPS_HD RadixState radix_start(int64_t k) {
  RadixState s;
  s.prefix = 0;
  s.prefix_mask = 0;
  s.rank = k;
  return s;
}

// Whether `key` is still a candidate in pass `pass`, and its digit there.
DPS_HD bool radix_candidate(const RadixState& s, uint32_t key) { return (key & s.prefix_mask) == s.prefix; }
DPS_HD uint32_t radix_digit(uint32_t key, int pass) { return (key >> radix_shift(pass)) & radix_digit_mask(pass); }

// Fix the digit of pass `pass` given that `above` candidates have a larger
// digit than `digit`, which holds the wanted entry.
DPS_HD void radix_take(RadixState& s, int pass, uint32_t digit, int64_t above) {
  s.prefix |= digit << radix_shift(pass);
  s.prefix_mask |= radix_digit_mask(pass) << radix_shift(pass);
  s.rank -= above;
}

// Serial scan of a whole histogram from the top (the CPU path; the GPU splits it).
template <typename Count>
DPS_HD void radix_scan(RadixState& s, int pass, const Count* hist) {
  int64_t above = 0;
  for (int d = (int)radix_digit_mask(pass); d >= 0; --d) {
    int64_t count = (int64_t)hist[d];
    if (above + count >= s.rank) {
      radix_take(s, pass, (uint32_t)d, above);
      return;
    }
    above += count;
  }
}

// After the last pass the prefix is the whole key of the k-th largest score;
// the mask keeps score_key(score) >= it (ties kept).
DPS_HD uint32_t radix_threshold_key(const RadixState& s) { return s.prefix; }

}  // namespace dps
