// CPU kernels of one chunk. This file is compiled once per instruction set
// with -DDPS_ISA=<name> and matching -m flags; keep every helper static (see
// dps_math.h) so that the copies cannot mix at link time.
#include "kernels.h"

#include <string.h>

#include <type_traits>

#ifndef DPS_ISA
#error "compile with -DDPS_ISA=avx512|avx2|base"
#endif

namespace dps {
namespace cpu {
namespace DPS_ISA {
namespace {

// What a call stores how: S is the state's storage type (float or bf16_t, stored
// stochastically), SR_PARAM whether a bf16/fp16 parameter is stored stochastically.
template <typename S, bool SR_PARAM>
struct Storage {
  static constexpr bool kStateStochastic = !std::is_same<S, float>::value;
  static constexpr bool kRandom = kStateStochastic || SR_PARAM;
};

// `frozen ? stored : computed` on the bits: as a select of floats or 16-bit structs GCC turns
// it into a conditional store, which AVX2 has no instruction for, and the loop stayed scalar.
template <typename T>
inline __attribute__((always_inline)) T stored_if(bool frozen, T stored, T computed) {
  using Bits = typename std::conditional<sizeof(T) == 4, uint32_t, uint16_t>::type;
  static_assert(sizeof(T) == sizeof(Bits), "a 16- or 32-bit storage type");
  Bits a, b;
  memcpy(&a, &stored, sizeof(T));
  memcpy(&b, &computed, sizeof(T));
  const Bits keep_stored = (Bits)(0 - (Bits)frozen);
  const Bits bits = (Bits)((a & keep_stored) | (b & (Bits)~keep_stored));
  T out;
  memcpy(&out, &bits, sizeof(T));
  return out;
}

// One entry; __restrict on the arrays lets the loops below vectorise without alias checks.
// `low` is the low 32 bits of the entry's index in the whole tensor (offset + i), hi_a/hi_b
// its streams' high-word keys (dps_math.h, entry_bits).
template <int M, bool RESET, typename P, typename S, bool SR_PARAM>
inline __attribute__((always_inline)) void entry(P* __restrict p, const P* __restrict g, S* __restrict m,
                                                 S* __restrict v, S* __restrict s, int64_t i, bool keep,
                                                 float inv_scale, float grad_coef, const Hyper& h,
                                                 const StepConsts& t, uint32_t hi_a, uint32_t hi_b, uint32_t low) {
  using Store = Storage<S, SR_PARAM>;
  const P p_stored = p[i];
  const S m_stored = m[i], v_stored = v[i];
  float pf = load_value(p_stored);
  float mf = load_value(m_stored), vf = load_value(v_stored);
  float sf = (M == kExplore && !RESET) ? load_value(s[i]) : 0.0f;
  dps_entry<M>(pf, load_value(g[i]), mf, vf, sf, keep, RESET, inv_scale, grad_coef, h, t);
  const EntryBits w = Store::kRandom ? entry_bits(hi_a, hi_b, low) : EntryBits{0u, 0u};
  // freeze: a masked-out entry keeps its stored bits (a NaN's payload too), as the reference's where()
  const bool frozen = M == kExploitFreeze && !keep;
  p[i] = stored_if(frozen, p_stored, store_rounded<P, SR_PARAM>(pf, param_bits(w)));
  m[i] = stored_if(frozen, m_stored, store_rounded<S, Store::kStateStochastic>(mf, exp_avg_bits(w)));
  v[i] = stored_if(frozen, v_stored, store_rounded<S, Store::kStateStochastic>(vf, exp_avg_sq_bits(w)));
  if (M == kExplore) s[i] = store_rounded<S, Store::kStateStochastic>(sf, score_bits(w));
}

// Entries [begin, end) of one tensor, whose global indices (a.offset + i) share their high
// 32 bits (update_typed splits a range where they do not).
template <int M, bool RESET, typename P, typename S, bool SR_PARAM>
void update_range(const TensorArgs& a, int64_t begin, int64_t end, float inv_scale, float grad_coef,
                  const Hyper& h) {
  P* __restrict p = (P*)a.p;
  const P* __restrict g = (const P*)a.g;
  S* __restrict m = (S*)a.m;
  S* __restrict v = (S*)a.v;
  S* __restrict s = (S*)a.s;
  const uint8_t* __restrict mask = a.mask;
  const StepConsts t = a.step;
  const uint64_t base = (uint64_t)a.offset;
  const uint32_t high = (uint32_t)((base + (uint64_t)begin) >> 32);
  const uint32_t hi_a = mix32(a.key_a ^ high), hi_b = mix32(a.key_b ^ high);
  const uint32_t low = (uint32_t)base;  // + i, mod 2^32: the range shares its high word
  if (M == kExploitGrad || M == kExploitFreeze) {
    // 32 entries share one 32-bit word of the mask: one vector AND per lane group. A range
    // split where the global index crosses 2^32 can start anywhere: single entries up to a word.
    int64_t i = begin;
    for (; i < end && (i & 31); ++i)
      entry<M, RESET, P, S, SR_PARAM>(p, g, m, v, s, i, (mask[i >> 3] >> (i & 7)) & 1u, inv_scale, grad_coef, h, t,
                                      hi_a, hi_b, low + (uint32_t)i);
    for (; i + 32 <= end; i += 32) {
      uint32_t word;
      memcpy(&word, mask + (i >> 3), 4);
      for (int j = 0; j < 32; ++j)
        entry<M, RESET, P, S, SR_PARAM>(p, g, m, v, s, i + j, (word & (1u << j)) != 0, inv_scale, grad_coef, h, t,
                                        hi_a, hi_b, low + (uint32_t)(i + j));
    }
    for (; i < end; ++i)
      entry<M, RESET, P, S, SR_PARAM>(p, g, m, v, s, i, (mask[i >> 3] >> (i & 7)) & 1u, inv_scale, grad_coef, h, t,
                                      hi_a, hi_b, low + (uint32_t)i);
  } else {
    for (int64_t i = begin; i < end; ++i)
      entry<M, RESET, P, S, SR_PARAM>(p, g, m, v, s, i, true, inv_scale, grad_coef, h, t, hi_a, hi_b,
                                      low + (uint32_t)i);
  }
}

template <int M, bool RESET, typename P, typename S, bool SR_PARAM>
void update_typed(const TensorArgs& a, int64_t begin, int64_t end, float inv_scale, float grad_coef,
                  const Hyper& h) {
  // where the global index crosses a multiple of 2^32 the high word of the random bits changes
  int64_t split = end;
  if (Storage<S, SR_PARAM>::kRandom) {
    const uint64_t first = (uint64_t)a.offset + (uint64_t)begin;
    const uint64_t next_high = ((first >> 32) + 1) << 32;
    if (next_high < (uint64_t)a.offset + (uint64_t)end) split = (int64_t)(next_high - (uint64_t)a.offset);
  }
  update_range<M, RESET, P, S, SR_PARAM>(a, begin, split, inv_scale, grad_coef, h);
  if (split < end) update_range<M, RESET, P, S, SR_PARAM>(a, split, end, inv_scale, grad_coef, h);
}

template <typename P, typename S, bool SR_PARAM>
void update_mode(int mode, const TensorArgs& a, int64_t begin, int64_t end, float inv_scale, float grad_coef,
                 const Hyper& h) {
  switch (mode) {
    case kPlain: return update_typed<kPlain, false, P, S, SR_PARAM>(a, begin, end, inv_scale, grad_coef, h);
    case kExplore:
      if (a.reset) return update_typed<kExplore, true, P, S, SR_PARAM>(a, begin, end, inv_scale, grad_coef, h);
      return update_typed<kExplore, false, P, S, SR_PARAM>(a, begin, end, inv_scale, grad_coef, h);
    case kExploitGrad:
      return update_typed<kExploitGrad, false, P, S, SR_PARAM>(a, begin, end, inv_scale, grad_coef, h);
    case kExploitFreeze:
      return update_typed<kExploitFreeze, false, P, S, SR_PARAM>(a, begin, end, inv_scale, grad_coef, h);
  }
}

template <typename P, bool SR_PARAM>
void update_state(int state_format, int mode, const TensorArgs& a, int64_t begin, int64_t end, float inv_scale,
                  float grad_coef, const Hyper& h) {
  if (state_format == kStateBf16) return update_mode<P, bf16_t, SR_PARAM>(mode, a, begin, end, inv_scale, grad_coef, h);
  return update_mode<P, float, SR_PARAM>(mode, a, begin, end, inv_scale, grad_coef, h);
}

// Parameters and gradients share a dtype (autograd guarantees it); an fp32 parameter
// has no stochastic store.
void update(int mode, int dtype, int state_format, bool stochastic_params, const TensorArgs& a, int64_t begin,
            int64_t end, float inv_scale, float grad_coef, const Hyper& h) {
  switch (dtype) {
    case kFloat32: return update_state<float, false>(state_format, mode, a, begin, end, inv_scale, grad_coef, h);
    case kBFloat16:
      if (stochastic_params)
        return update_state<bf16_t, true>(state_format, mode, a, begin, end, inv_scale, grad_coef, h);
      return update_state<bf16_t, false>(state_format, mode, a, begin, end, inv_scale, grad_coef, h);
    case kFloat16:
      if (stochastic_params)
        return update_state<f16_t, true>(state_format, mode, a, begin, end, inv_scale, grad_coef, h);
      return update_state<f16_t, false>(state_format, mode, a, begin, end, inv_scale, grad_coef, h);
  }
}

void histogram(const float* __restrict score, int64_t begin, int64_t end, const RadixState& state, int pass,
               uint32_t* __restrict hist) {
  // Scores crowd into few bins, so consecutive increments often hit the same
  // counter: four interleaved sub-histograms break that dependency chain.
  uint32_t sub[4][kBins];
  memset(sub, 0, sizeof(sub));
  int64_t i = begin;
  for (; i + 4 <= end; i += 4) {
    for (int j = 0; j < 4; ++j) {
      uint32_t key = order_key(score[i + j]);
      if (is_candidate(state, key)) sub[j][digit_of(key, pass)]++;
    }
  }
  for (; i < end; ++i) {
    uint32_t key = order_key(score[i]);
    if (is_candidate(state, key)) sub[0][digit_of(key, pass)]++;
  }
  for (int d = 0; d < kBins; ++d) hist[d] += sub[0][d] + sub[1][d] + sub[2][d] + sub[3][d];
}

int64_t collect(const float* __restrict score, int64_t begin, int64_t end, uint32_t low, uint32_t high,
                uint32_t* __restrict out, int64_t cap, int64_t* above) {
  // Branch-free vector passes over 32 entries (bit masks, like pack() below);
  // the rare ones in [low, high] are then picked out of their mask.
  // Keys compare as their floats (kMinusInfKey in dps_select.h) when both bounds are keys of
  // numbers above -inf (a NaN has -inf's key); else (e.g. the open bounds 0 and ~0) as keys.
  const bool by_key = !(low > kMinusInfKey && high <= kPlusInfKey);
  const float low_score = key_to_score(low), high_score = key_to_score(high);
  int64_t count = 0, found = 0;
  int64_t i = begin;
  for (; i + 32 <= end; i += 32) {
    uint32_t over = 0, inside = 0;
    if (by_key) {
      for (int j = 0; j < 32; ++j) over |= (uint32_t)(order_key(score[i + j]) > high) << j;
      for (int j = 0; j < 32; ++j) inside |= (uint32_t)(order_key(score[i + j]) - low <= high - low) << j;
    } else {
      for (int j = 0; j < 32; ++j) over |= (uint32_t)(score[i + j] > high_score) << j;
      for (int j = 0; j < 32; ++j)
        inside |= (uint32_t)(score[i + j] >= low_score && score[i + j] <= high_score) << j;
    }
    count += __builtin_popcount(over);
    while (inside) {
      if (found == cap) return -1;
      out[found++] = order_key(score[i + __builtin_ctz(inside)]);
      inside &= inside - 1;
    }
  }
  for (; i < end; ++i) {
    uint32_t key = order_key(score[i]);
    count += key > high;
    if (key >= low && key <= high) {
      if (found == cap) return -1;
      out[found++] = key;
    }
  }
  *above = count;
  return found;
}

constexpr uint32_t kAllKept = 0xffffffffu;

void pack(const float* __restrict score, uint8_t* __restrict mask, int64_t begin, int64_t end, uint32_t threshold) {
  // order_key(score) >= threshold, as a float comparison (see kMinusInfKey in dps_select.h)
  const bool all = threshold == kMinusInfKey;
  const float t = key_to_score(threshold);
  int64_t i = begin;
  for (; i + 32 <= end; i += 32) {
    uint32_t word = 0;
    for (int j = 0; j < 32; ++j) word |= (uint32_t)(score[i + j] >= t) << j;
    memcpy(mask + (i >> 3), all ? &kAllKept : &word, 4);
  }
  for (; i < end; i += 8) {  // the last partial word, byte by byte; bits past `end` stay 0
    uint32_t byte = 0;
    for (int j = 0; j < 8 && i + j < end; ++j) byte |= (uint32_t)(all || score[i + j] >= t) << j;
    mask[i >> 3] = (uint8_t)byte;
  }
}

template <typename P>
double masked_sq_sum_typed(const P* __restrict g, const uint8_t* __restrict mask, int64_t begin, int64_t end) {
  // 16 independent double sums, so that the loop vectorises without reordering
  // any one sum. Each square is exact in double (as in the reference), so the
  // total is within about 1e-15 of exact and its root rounds as the reference's.
  // (g * bit in float is exact: g, 0, or NaN for an inf masked out, as grad * mask.)
  constexpr int kLanes = 16;
  double lanes[kLanes] = {0};
  int64_t i = begin;
  for (; i + 32 <= end; i += 32) {
    uint32_t word;
    memcpy(&word, mask + (i >> 3), 4);
    for (int l = 0; l < kLanes; ++l) {
      const double a = load_value(g[i + l]) * (float)((word >> l) & 1u);
      const double b = load_value(g[i + kLanes + l]) * (float)((word >> (kLanes + l)) & 1u);
      lanes[l] += a * a + b * b;
    }
  }
  for (; i < end; ++i) {
    const double x = load_value(g[i]) * (float)((mask[i >> 3] >> (i & 7)) & 1u);
    lanes[0] += x * x;
  }
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

double masked_sq_sum(int dtype, const void* g, const uint8_t* mask, int64_t begin, int64_t end) {
  switch (dtype) {
    case kBFloat16: return masked_sq_sum_typed((const bf16_t*)g, mask, begin, end);
    case kFloat16: return masked_sq_sum_typed((const f16_t*)g, mask, begin, end);
    default: return masked_sq_sum_typed((const float*)g, mask, begin, end);
  }
}

}  // namespace

// Constant data, not a function: no code built for this instruction set
// runs before the CPU is known to support it.
#define DPS_STR2(x) #x
#define DPS_STR(x) DPS_STR2(x)
extern const Kernels kernels = {DPS_STR(DPS_ISA), update, histogram, collect, pack, masked_sq_sum};

}  // namespace DPS_ISA
}  // namespace cpu
}  // namespace dps
