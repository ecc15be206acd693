// The multi-tensor update: one launch for every tensor of a dtype, through a
// chunk table (staging.cuh), the arithmetic of dps_math.h on 4 entries per
// thread at a time. GradScaler's found_inf and inv_scale and the clip factor
// are read on the device.
#include <type_traits>

#include "staging.cuh"

namespace dps {
namespace cuda {
namespace {

static_assert(kUpdateChunk % (4 * kThreads) == 0, "each thread takes 4 entries at a time");

// ----- 4-entry vector access (16 bytes of fp32, 8 bytes of a 16-bit dtype) ----------

__device__ __forceinline__ void load4(const float* p, float out[4]) {
  float4 x = *reinterpret_cast<const float4*>(p);
  out[0] = x.x, out[1] = x.y, out[2] = x.z, out[3] = x.w;
}
__device__ __forceinline__ void store4(float* p, const float in[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
}

template <typename T>  // bf16_t or f16_t: two entries per 32-bit word, the first in the low half
__device__ __forceinline__ void load4(const T* p, float out[4]) {
  uint2 x = *reinterpret_cast<const uint2*>(p);
  T e;
  e.bits = (uint16_t)(x.x & 0xffffu), out[0] = load_value(e);
  e.bits = (uint16_t)(x.x >> 16), out[1] = load_value(e);
  e.bits = (uint16_t)(x.y & 0xffffu), out[2] = load_value(e);
  e.bits = (uint16_t)(x.y >> 16), out[3] = load_value(e);
}
// 4 entries stored as T: to nearest, or stochastically with 16 random bits each.
template <typename T, bool STOCHASTIC>
struct Store4 {
  static __device__ __forceinline__ void store(T* p, const float in[4], const uint32_t r16[4]) {
    uint2 x;
    x.x = (uint32_t)store_rounded<T, STOCHASTIC>(in[0], r16[0]).bits |
          ((uint32_t)store_rounded<T, STOCHASTIC>(in[1], r16[1]).bits << 16);
    x.y = (uint32_t)store_rounded<T, STOCHASTIC>(in[2], r16[2]).bits |
          ((uint32_t)store_rounded<T, STOCHASTIC>(in[3], r16[3]).bits << 16);
    *reinterpret_cast<uint2*>(p) = x;
  }
};
template <bool STOCHASTIC>
struct Store4<float, STOCHASTIC> {  // fp32 is stored as computed
  static __device__ __forceinline__ void store(float* p, const float in[4], const uint32_t*) { store4(p, in); }
};

// S: the state's storage (float, or bf16_t stored stochastically); SR_PARAM: a bf16/fp16
// parameter stored stochastically. The random bits are those of dps_math.h (entry_bits).
template <typename S, bool SR_PARAM>
struct Storage {
  static constexpr bool kStateStochastic = !std::is_same<S, float>::value;
  static constexpr bool kRandom = kStateStochastic || SR_PARAM;
};

// Entries [begin, end) of one tensor, whose global indices (a.offset + i) share their high
// 32 bits; each thread takes 4 consecutive entries (one vector access per array) at a time,
// from the multiple of 4 at or below `begin` (a range split at 2^32 can start anywhere: the
// entries of a group of 4 outside [begin, end) are left to the neighbouring range).
template <int M, bool RESET, typename P, typename S, bool SR_PARAM>
__device__ __forceinline__ void update_range(const TensorArgs& a, int64_t begin, int64_t end, float unscale,
                                             float coef, const Hyper& h) {
  using Store = Storage<S, SR_PARAM>;
  P* __restrict__ p = (P*)a.p;
  const P* __restrict__ g = (const P*)a.g;
  S* __restrict__ m = (S*)a.m;
  S* __restrict__ v = (S*)a.v;
  S* __restrict__ s = (S*)a.s;
  const uint64_t base = (uint64_t)a.offset;
  const uint32_t high = (uint32_t)((base + (uint64_t)begin) >> 32);
  const uint32_t hi_a = Store::kRandom ? mix32(a.key_a ^ high) : 0u;
  const uint32_t hi_b = Store::kRandom ? mix32(a.key_b ^ high) : 0u;
  const uint32_t low = (uint32_t)base;  // + i, mod 2^32: the range shares its high word
  const int64_t first = begin & ~(int64_t)3;
  for (int64_t i = first + 4 * (int64_t)threadIdx.x; i < end; i += 4 * (int64_t)kThreads) {
    uint32_t bits = 0xfu;  // i is a multiple of 4: its 4 mask bits share a byte
    if (M == kExploitGrad || M == kExploitFreeze) bits = (uint32_t)a.mask[i >> 3] >> (i & 7);
    if (a.aligned && i >= begin && i + 4 <= end) {
      float pv[4], gv[4], mv[4], vv[4], sv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      uint32_t rp[4], rm[4], rv[4], rs[4];
      load4(p + i, pv);
      load4(g + i, gv);
      load4(m + i, mv);
      load4(v + i, vv);
      if (M == kExplore && !RESET) load4(s + i, sv);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        dps_entry<M>(pv[j], gv[j], mv[j], vv[j], sv[j], (bits >> j) & 1u, RESET, unscale, coef, h, a.step);
        const EntryBits w = Store::kRandom ? entry_bits(hi_a, hi_b, low + (uint32_t)(i + j)) : EntryBits{0u, 0u};
        rp[j] = param_bits(w), rm[j] = exp_avg_bits(w), rv[j] = exp_avg_sq_bits(w), rs[j] = score_bits(w);
      }
      // freeze: a masked-out entry's value is the one loaded, which stores back to the same bits
      // unless it is a NaN (its payload is canonicalised): then the kept entries are stored alone
      bool frozen_nan = false;
      if (M == kExploitFreeze)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          frozen_nan |= !((bits >> j) & 1u) && (pv[j] != pv[j] || mv[j] != mv[j] || vv[j] != vv[j]);
      if (frozen_nan) {
        for (int j = 0; j < 4; ++j)
          if ((bits >> j) & 1u) {
            p[i + j] = store_rounded<P, SR_PARAM>(pv[j], rp[j]);
            m[i + j] = store_rounded<S, Store::kStateStochastic>(mv[j], rm[j]);
            v[i + j] = store_rounded<S, Store::kStateStochastic>(vv[j], rv[j]);
          }
      } else {
        Store4<P, SR_PARAM>::store(p + i, pv, rp);
        Store4<S, Store::kStateStochastic>::store(m + i, mv, rm);
        Store4<S, Store::kStateStochastic>::store(v + i, vv, rv);
        if (M == kExplore) Store4<S, Store::kStateStochastic>::store(s + i, sv, rs);
      }
    } else {
      for (int j = 0; j < 4 && i + j < end; ++j) {
        const int64_t k = i + j;
        if (k < begin) continue;
        const bool keep = (bits >> j) & 1u;
        float pk = load_value(p[k]), mk = load_value(m[k]), vk = load_value(v[k]);
        float sk = (M == kExplore && !RESET) ? load_value(s[k]) : 0.0f;
        dps_entry<M>(pk, load_value(g[k]), mk, vk, sk, keep, RESET, unscale, coef, h, a.step);
        const EntryBits w = Store::kRandom ? entry_bits(hi_a, hi_b, low + (uint32_t)k) : EntryBits{0u, 0u};
        if (M == kExploitFreeze && !keep) continue;  // its stored bits stay (a NaN's payload too)
        p[k] = store_rounded<P, SR_PARAM>(pk, param_bits(w));
        m[k] = store_rounded<S, Store::kStateStochastic>(mk, exp_avg_bits(w));
        v[k] = store_rounded<S, Store::kStateStochastic>(vk, exp_avg_sq_bits(w));
        if (M == kExplore) s[k] = store_rounded<S, Store::kStateStochastic>(sk, score_bits(w));
      }
    }
  }
}

// A chunk's entries, split where their global index crosses a multiple of 2^32.
template <int M, bool RESET, typename P, typename S, bool SR_PARAM>
__device__ __forceinline__ void update_chunk(const TensorArgs& a, int64_t begin, int64_t end, float unscale,
                                             float coef, const Hyper& h) {
  int64_t split = end;
  if (Storage<S, SR_PARAM>::kRandom) {
    const uint64_t next_high = ((((uint64_t)a.offset + (uint64_t)begin) >> 32) + 1) << 32;
    if (next_high < (uint64_t)a.offset + (uint64_t)end) split = (int64_t)(next_high - (uint64_t)a.offset);
  }
  update_range<M, RESET, P, S, SR_PARAM>(a, begin, split, unscale, coef, h);
  if (split < end) update_range<M, RESET, P, S, SR_PARAM>(a, split, end, unscale, coef, h);
}

template <int M, typename P, typename S, bool SR_PARAM>
__global__ void __launch_bounds__(kThreads)
    update_kernel(const TensorArgs* __restrict__ tensors, const Chunk* __restrict__ chunks, int nchunks, Hyper h,
                  const float* grad_coef, const float* inv_scale, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // a skipped GradScaler step writes nothing
  const float unscale = inv_scale != nullptr ? *inv_scale : 1.0f;
  const float coef = grad_coef != nullptr ? *grad_coef : 1.0f;
  for (int c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const Chunk chunk = chunks[c];
    const TensorArgs a = tensors[chunk.tensor];
    const int64_t begin = (int64_t)chunk.index * kUpdateChunk;
    const int64_t end = min64(begin + kUpdateChunk, a.numel);
    if (M == kExplore && a.reset)
      update_chunk<M, true, P, S, SR_PARAM>(a, begin, end, unscale, coef, h);
    else
      update_chunk<M, false, P, S, SR_PARAM>(a, begin, end, unscale, coef, h);
  }
}

template <typename P, typename S, bool SR_PARAM>
void launch_update(int mode, int grid, cudaStream_t stream, const TensorArgs* tensors, const Chunk* chunks,
                   int nchunks, const Hyper& h, const float* grad_coef, const float* inv_scale,
                   const float* found_inf) {
#define DPS_LAUNCH(M)                                                                                        \
  update_kernel<M, P, S, SR_PARAM><<<grid, kThreads, 0, stream>>>(tensors, chunks, nchunks, h, grad_coef, \
                                                                  inv_scale, found_inf)
  switch (mode) {
    case kPlain: DPS_LAUNCH(kPlain); break;
    case kExplore: DPS_LAUNCH(kExplore); break;
    case kExploitGrad: DPS_LAUNCH(kExploitGrad); break;
    case kExploitFreeze: DPS_LAUNCH(kExploitFreeze); break;
    default: throw std::invalid_argument("dps_fast: unknown update mode");
  }
#undef DPS_LAUNCH
}

// The launch for the parameter type P, the state format and the parameter rounding
// (an fp32 parameter has no stochastic store).
template <typename P>
void launch_storage(int state_format, bool stochastic_params, int mode, int grid, cudaStream_t stream,
                    const TensorArgs* tensors, const Chunk* chunks, int nchunks, const Hyper& h,
                    const float* grad_coef, const float* inv_scale, const float* found_inf) {
  const bool sr = stochastic_params && !std::is_same<P, float>::value;
  if (state_format == kStateBf16) {
    if (sr) return launch_update<P, bf16_t, true>(mode, grid, stream, tensors, chunks, nchunks, h, grad_coef,
                                                  inv_scale, found_inf);
    return launch_update<P, bf16_t, false>(mode, grid, stream, tensors, chunks, nchunks, h, grad_coef, inv_scale,
                                           found_inf);
  }
  if (sr) return launch_update<P, float, true>(mode, grid, stream, tensors, chunks, nchunks, h, grad_coef,
                                               inv_scale, found_inf);
  launch_update<P, float, false>(mode, grid, stream, tensors, chunks, nchunks, h, grad_coef, inv_scale, found_inf);
}

}  // namespace

void update(int device, int64_t stream_handle, int mode, int dtype, int state_format, bool stochastic_params,
            const std::vector<TensorArgs>& tensors, const Hyper& hyper, int64_t grad_coef, int64_t inv_scale,
            int64_t found_inf) {
  ensure_ready();
  cudaStream_t stream = (cudaStream_t)stream_handle;
  with_tables(device, stream, tensors, kUpdateChunk,
              [&](const TensorArgs* table, const Chunk* chunks, int nchunks, int grid) {
                with_dtype(dtype, [&](auto type) {
                  launch_storage<typename decltype(type)::type>(
                      state_format, stochastic_params, mode, grid, stream, table, chunks, nchunks, hyper,
                      (const float*)grad_coef, (const float*)inv_scale, (const float*)found_inf);
                });
                check(cudaGetLastError(), "launching the update kernel");
              });
}

}  // namespace cuda
}  // namespace dps
