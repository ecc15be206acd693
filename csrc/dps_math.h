// The element-wise arithmetic of one DPS step: the only C++ copy of it,
// shared by the CPU loop (csrc/cpu) and the CUDA kernel (csrc/cuda).
//
// It follows dps_fast/backends/reference.py operation by operation: fp32 math
// whatever the storage dtype, hyperparameters rounded to fp32 once, and
// torch.optim.AdamW's operations rounded as torch's kernels round them (on
// the CPU, torch 2.13's sqrt is not correctly rounded, so the parameter can
// differ from the reference in the last bits; everything else agrees).
//
// Every function here has internal linkage (static): the CPU kernels are
// compiled once per instruction set, and a shared inline symbol would let the
// linker pick, say, the AVX-512 copy for the baseline build.
#pragma once
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define DPS_HD static __host__ __device__ __forceinline__
#else
#define DPS_HD static inline __attribute__((always_inline))
#endif

namespace dps {

// The codes Python passes for these enums are dps_fast.backends.contract's Mode
// and DType; the modules export kModeNames and kDTypeNames (dps_bindings.h) and
// tests/test_backends_contract.py checks that the two sides agree.

// What one update call does to every tensor it is given.
enum Mode : int {
  kPlain = 0,          // AdamW (groups not managed by DPS)
  kExplore = 1,        // score := g*g or score += g*g, then AdamW
  kExploitGrad = 2,    // masked-out entries get a zero gradient, then AdamW
  kExploitFreeze = 3,  // masked-out entries (value and moments) are left as they are
};

// Storage dtypes of parameters and gradients.
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// How exp_avg, exp_avg_sq and scores are stored (dps_fast.state_format).
// bf16: with stochastic rounding; 8bit: block-wise 8-bit moments (dps_fast/blockwise.py), no kernel yet
enum StateFormat : int { kStateFp32 = 0, kStateBf16 = 1, kState8bit = 2 };

// The enums' values under the names Python gives them.
struct NamedCode {
  const char* name;
  int value;
};
constexpr NamedCode kModeNames[] = {
    {"PLAIN", kPlain}, {"EXPLORE", kExplore}, {"EXPLOIT_GRAD", kExploitGrad}, {"EXPLOIT_FREEZE", kExploitFreeze}};
constexpr NamedCode kDTypeNames[] = {{"FLOAT32", kFloat32}, {"BFLOAT16", kBFloat16}, {"FLOAT16", kFloat16}};
constexpr NamedCode kStateFormatNames[] = {{"FP32", kStateFp32}, {"BF16", kStateBf16}, {"EIGHT_BIT", kState8bit}};

// Hyperparameters of a call, rounded to fp32 as torch rounds a Python float
// that multiplies an fp32 tensor.
struct Hyper {
  float decay;      // 1 - lr * weight_decay
  float lerp_w;     // 1 - beta1, the weight of exp_avg.lerp(grad, 1 - beta1)
  float beta2;
  float one_minus_beta2;
  float eps;
};

// Bias corrections of one tensor at its own step.
struct StepConsts {
  float step_size;       // lr / (1 - beta1^step)
  float bias2_sqrt;      // sqrt(1 - beta2^step)
  float inv_bias2_sqrt;  // 1.0f / bias2_sqrt: how torch's CUDA kernels divide a tensor by a Python float
};

// Hyperparameters and bias corrections are computed in double and rounded once,
// like the reference's Python floats (inv_bias2_sqrt: see make_step).
static inline Hyper make_hyper(double lr, double beta1, double beta2, double eps, double weight_decay) {
  Hyper h;
  h.decay = (float)(1.0 - lr * weight_decay);
  h.lerp_w = (float)(1.0 - beta1);
  h.beta2 = (float)beta2;
  h.one_minus_beta2 = (float)(1.0 - beta2);
  h.eps = (float)eps;
  return h;
}

static inline StepConsts make_step(double lr, double beta1, double beta2, long long step) {
  StepConsts s;
  s.step_size = (float)(lr / (1.0 - pow(beta1, (double)step)));
  double bias2_sqrt = sqrt(1.0 - pow(beta2, (double)step));
  s.bias2_sqrt = (float)bias2_sqrt;
  // tensor / b on CUDA is tensor * (1.0f / (float)b) (torch's BinaryDivTrueKernel.cu): the divisor
  // is rounded to fp32 first, then inverted in fp32 (1 ulp from the double inverse at 446 of steps
  // 1-2000 at beta2 0.999).
  s.inv_bias2_sqrt = 1.0f / s.bias2_sqrt;
  return s;
}

// ----- storage conversions (bit exact, round to nearest even, as torch's copy_) -----

DPS_HD float bits_to_float(uint32_t u) {
  union { uint32_t u; float f; } x;
  x.u = u;
  return x.f;
}

DPS_HD uint32_t float_to_bits(float f) {
  union { uint32_t u; float f; } x;
  x.f = f;
  return x.u;
}

DPS_HD float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

DPS_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (uint16_t)((f != f) ? 0x7fc0u : rounded);
}

// IEEE half <-> float without branches (F. Giesen's method), so that the CPU
// loop vectorises and the GPU gives the same bits.
DPS_HD float f16_to_float(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = ((uint32_t)h & 0x7fffu) << 13;
  uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  uint32_t inf_nan = o + ((128u - 16u) << 23);
  float denormal = bits_to_float(o + (1u << 23)) - bits_to_float(113u << 23);
  o = (exp == shifted_exp) ? inf_nan : o;
  o = (exp == 0) ? float_to_bits(denormal) : o;
  return bits_to_float(o | (((uint32_t)h & 0x8000u) << 16));
}

DPS_HD uint16_t float_to_f16(float f) {
  const uint32_t f32_infty = 255u << 23;
  const uint32_t f16_max = (127u + 16u) << 23;
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t u = float_to_bits(f);
  uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t inf_nan = (u > f32_infty) ? 0x7e00u : 0x7c00u;
  // subnormal result: the fp32 addition rounds to nearest even for us
  uint32_t subnormal = float_to_bits(bits_to_float(u) + bits_to_float(denorm_magic)) - denorm_magic;
  uint32_t normal = (u + ((uint32_t)(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
  uint32_t o = (u >= f16_max) ? inf_nan : ((u < (113u << 23)) ? subnormal : normal);
  return (uint16_t)(o | (sign >> 16));
}

// Storage types as the kernels see them.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

DPS_HD float load_value(float x) { return x; }
DPS_HD float load_value(bf16_t x) { return bf16_to_float(x.bits); }
DPS_HD float load_value(f16_t x) { return f16_to_float(x.bits); }

DPS_HD void from_float(float x, float& out) { out = x; }
DPS_HD void from_float(float x, bf16_t& out) { out.bits = float_to_bf16(x); }
DPS_HD void from_float(float x, f16_t& out) { out.bits = float_to_f16(x); }

template <typename T>
DPS_HD T store_value(float x) {
  T out;
  from_float(x, out);
  return out;
}

// ----- stochastic rounding: dps_fast/rounding.py is the specification --------------

// lowbias32 (C. Wellons), the hash of the random bits.
DPS_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

// One entry's two random words (rounding.entry_words of its index in the whole tensor):
// a = stream A (exp_avg: low 16 bits, exp_avg_sq: high 16), b = stream B (score: low, param: high).
// hi_a, hi_b: mix32(key ^ (index >> 32)) of each stream, constant over 2^32 entries; `low`:
// the index's low 32 bits (32-bit lanes in the vector loops).
struct EntryBits {
  uint32_t a, b;
};

DPS_HD EntryBits entry_bits(uint32_t hi_a, uint32_t hi_b, uint32_t low) {
  return EntryBits{mix32(hi_a ^ low), mix32(hi_b ^ low)};
}

// x rounded to bf16 with 16 random bits: (bits + r16) >> 16; NaN -> 0x7fc0; a finite value
// that would carry into the inf/NaN exponent keeps the value rounded toward zero.
DPS_HD uint16_t stochastic_bf16(float x, uint32_t r16) {
  const uint32_t u = float_to_bits(x);
  const uint32_t up = (u + r16) >> 16, down = u >> 16;
  const bool finite = (u & 0x7f800000u) != 0x7f800000u;
  const uint32_t bits = ((up & 0x7f80u) == 0x7f80u && finite) ? down : up;
  return (uint16_t)((x != x) ? 0x7fc0u : bits);
}

// x rounded to fp16 with 16 random bits: a normal value drops 13 bits (r16 >> 3 is added);
// below 2^-14 the 24-bit significand is put on fp16's 2^-24 grid (drop = 126 - exponent bits,
// 14 to 40, r16 shifted to cover them). Overflow as rounding.stochastic says.
DPS_HD uint16_t stochastic_f16(float x, uint32_t r16) {
  const uint32_t u = float_to_bits(x);
  const uint32_t sign = u & 0x80000000u, magnitude = u & 0x7fffffffu;
  const uint32_t exponent = magnitude >> 23;
  const uint32_t normal_up = ((magnitude + (r16 >> 3)) >> 13) - (112u << 10);
  const uint32_t normal_down = (magnitude >> 13) - (112u << 10);
  int drop = 126 - (int)exponent;
  drop = drop < 14 ? 14 : (drop > 40 ? 40 : drop);
  const uint64_t significand = (uint64_t)((magnitude & 0x7fffffu) | (exponent > 0 ? 0x800000u : 0u));
  const uint64_t noise = drop <= 16 ? (uint64_t)(r16 >> (16 - drop)) : ((uint64_t)r16 << (drop - 16));
  const uint32_t small_up = (uint32_t)((significand + noise) >> drop);
  const uint32_t small_down = (uint32_t)(significand >> drop);
  uint32_t up = exponent < 113 ? small_up : normal_up;
  const uint32_t down = exponent < 113 ? small_down : normal_down;
  up = (up >= 0x7c00u && magnitude < 0x477ff000u) ? down : up;  // below 65520: never up to inf
  up = magnitude >= 0x477ff000u ? 0x7c00u : up;                 // 65520 and above (inf, NaN too)
  return (uint16_t)(((x != x) ? 0x7e00u : up) | (sign >> 16));
}

DPS_HD void from_float_stochastic(float x, uint32_t, float& out) { out = x; }
DPS_HD void from_float_stochastic(float x, uint32_t r16, bf16_t& out) { out.bits = stochastic_bf16(x, r16); }
DPS_HD void from_float_stochastic(float x, uint32_t r16, f16_t& out) { out.bits = stochastic_f16(x, r16); }

// x stored as T: stochastically with the 16 random bits r16 when STOCHASTIC, else to nearest.
template <typename T, bool STOCHASTIC>
DPS_HD T store_rounded(float x, uint32_t r16) {
  T out;
  if (STOCHASTIC)
    from_float_stochastic(x, r16, out);
  else
    from_float(x, out);
  return out;
}

// ----- the update of one entry -----------------------------------------------------

// a * b + c rounded once, as torch's kernels compute lerp and addcmul (the
// modules are built without contraction: every fused multiply-add is this one).
DPS_HD float fma32(float a, float b, float c) {
#if defined(__CUDA_ARCH__) || defined(__FMA__)
  return fmaf(a, b, c);
#else  // built for CPUs without FMA, where torch's own kernels round twice too
  return a * b + c;
#endif
}

// AdamW in place on fp32 values, op for op as torch.optim.AdamW (and
// reference.adamw_math) computes it with torch's own kernels, so that the
// results agree to the bit. Where torch's CPU and CUDA kernels round
// differently, each device follows its own.
DPS_HD void adamw(float& p, float g, float& m, float& v, const Hyper& h, const StepConsts& t) {
  p = p * h.decay;  // param.mul(1 - lr * weight_decay)
  const float diff = g - m;  // exp_avg.lerp(grad, w): the small-weight form when |w| < 0.5
  m = (fabsf(h.lerp_w) < 0.5f) ? fma32(h.lerp_w, diff, m) : fma32(h.lerp_w - 1.0f, diff, g);
  const float decayed = v * h.beta2;  // exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
#if defined(__CUDA_ARCH__)
  v = fma32(h.one_minus_beta2, g * g, decayed);
  const float denom = sqrtf(v) * t.inv_bias2_sqrt + h.eps;  // (sqrt / bias2_sqrt).add_(eps)
  p = fma32(-t.step_size, m / denom, p);                    // param.addcdiv_(m, denom, value=-step_size)
#else
  v = fma32(h.one_minus_beta2 * g, g, decayed);
  const float denom = sqrtf(v) / t.bias2_sqrt + h.eps;
  p = p + (-t.step_size * m) / denom;
#endif
}

// The 16 random bits of each store of an entry (reference.RANDOM_BITS).
DPS_HD uint32_t exp_avg_bits(EntryBits w) { return w.a & 0xffffu; }
DPS_HD uint32_t exp_avg_sq_bits(EntryBits w) { return w.a >> 16; }
DPS_HD uint32_t score_bits(EntryBits w) { return w.b & 0xffffu; }
DPS_HD uint32_t param_bits(EntryBits w) { return w.b >> 16; }

// One DPS entry: p, m, v (and s when exploring) in place. `g` is the stored
// gradient, `keep` its mask bit (exploit modes), `reset` whether the score
// restarts at this step. inv_scale (GradScaler) applies before scoring, the
// clip factor grad_coef after it; both are 1 when absent (x * 1 == x exactly).
template <int M>
DPS_HD void dps_entry(float& p, float g, float& m, float& v, float& s, bool keep, bool reset,
                      float inv_scale, float grad_coef, const Hyper& h, const StepConsts& t) {
  g = g * inv_scale;
  if (M == kExplore) s = reset ? g * g : fma32(g, g, s);  // copy_(g * g) or addcmul_(g, g)
  g = g * grad_coef;
  if (M == kExploitGrad) g = g * (keep ? 1.0f : 0.0f);  // grad * mask: an inf gradient masked out is NaN there too
  if (M == kExploitFreeze) {
    float p1 = p, m1 = m, v1 = v;
    adamw(p1, g, m1, v1, h, t);
    p = keep ? p1 : p;
    m = keep ? m1 : m;
    v = keep ? v1 : v;
  } else {
    adamw(p, g, m, v, h, t);
  }
}

}  // namespace dps
