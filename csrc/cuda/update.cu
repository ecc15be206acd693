// The multi-tensor update: one launch for every tensor of a dtype, through a
// chunk table (staging.cuh), the arithmetic of dps_math.h on 4 entries per
// thread at a time. GradScaler's found_inf and inv_scale and the clip factor
// are read on the device.
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
template <typename T>
__device__ __forceinline__ void store4(T* p, const float in[4]) {
  uint2 x;
  x.x = (uint32_t)store_value<T>(in[0]).bits | ((uint32_t)store_value<T>(in[1]).bits << 16);
  x.y = (uint32_t)store_value<T>(in[2]).bits | ((uint32_t)store_value<T>(in[3]).bits << 16);
  *reinterpret_cast<uint2*>(p) = x;
}

// Entries [begin, end) of one tensor; each thread takes 4 consecutive entries
// (one vector access per array) at a time.
template <int M, bool RESET, typename P>
__device__ __forceinline__ void update_range(const TensorArgs& a, int64_t begin, int64_t end, float unscale,
                                             float coef, const Hyper& h) {
  P* __restrict__ p = (P*)a.p;
  const P* __restrict__ g = (const P*)a.g;
  float* __restrict__ m = a.m;
  float* __restrict__ v = a.v;
  float* __restrict__ s = a.s;
  for (int64_t i = begin + 4 * (int64_t)threadIdx.x; i < end; i += 4 * (int64_t)kThreads) {
    uint32_t bits = 0xfu;  // i is a multiple of 4: its 4 mask bits share a byte
    if (M == kExploitGrad || M == kExploitFreeze) bits = (uint32_t)a.mask[i >> 3] >> (i & 7);
    if (a.aligned && i + 4 <= end) {
      float pv[4], gv[4], mv[4], vv[4], sv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      load4(p + i, pv);
      load4(g + i, gv);
      load4(m + i, mv);
      load4(v + i, vv);
      if (M == kExplore && !RESET) load4(s + i, sv);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        dps_entry<M>(pv[j], gv[j], mv[j], vv[j], sv[j], (bits >> j) & 1u, RESET, unscale, coef, h, a.step);
      store4(p + i, pv);
      store4(m + i, mv);
      store4(v + i, vv);
      if (M == kExplore) store4(s + i, sv);
    } else {
      for (int j = 0; j < 4 && i + j < end; ++j) {
        const int64_t k = i + j;
        float pk = load_value(p[k]), mk = m[k], vk = v[k];
        float sk = (M == kExplore && !RESET) ? s[k] : 0.0f;
        dps_entry<M>(pk, load_value(g[k]), mk, vk, sk, (bits >> j) & 1u, RESET, unscale, coef, h, a.step);
        p[k] = store_value<P>(pk);
        m[k] = mk;
        v[k] = vk;
        if (M == kExplore) s[k] = sk;
      }
    }
  }
}

template <int M, typename P>
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
      update_range<M, true, P>(a, begin, end, unscale, coef, h);
    else
      update_range<M, false, P>(a, begin, end, unscale, coef, h);
  }
}

template <typename P>
void launch_update(int mode, int grid, cudaStream_t stream, const TensorArgs* tensors, const Chunk* chunks,
                   int nchunks, const Hyper& h, const float* grad_coef, const float* inv_scale,
                   const float* found_inf) {
#define DPS_LAUNCH(M) \
  update_kernel<M, P><<<grid, kThreads, 0, stream>>>(tensors, chunks, nchunks, h, grad_coef, inv_scale, found_inf)
  switch (mode) {
    case kPlain: DPS_LAUNCH(kPlain); break;
    case kExplore: DPS_LAUNCH(kExplore); break;
    case kExploitGrad: DPS_LAUNCH(kExploitGrad); break;
    case kExploitFreeze: DPS_LAUNCH(kExploitFreeze); break;
    default: throw std::invalid_argument("dps_fast: unknown update mode");
  }
#undef DPS_LAUNCH
}

}  // namespace

void update(int device, int64_t stream_handle, int mode, int dtype, const std::vector<TensorArgs>& tensors,
            const Hyper& hyper, int64_t grad_coef, int64_t inv_scale, int64_t found_inf) {
  ensure_ready();
  cudaStream_t stream = (cudaStream_t)stream_handle;
  with_tables(device, stream, tensors, kUpdateChunk,
              [&](const TensorArgs* table, const Chunk* chunks, int nchunks, int grid) {
                with_dtype(dtype, [&](auto type) {
                  launch_update<typename decltype(type)::type>(mode, grid, stream, table, chunks, nchunks, hyper,
                                                               (const float*)grad_coef, (const float*)inv_scale,
                                                               (const float*)found_inf);
                });
                check(cudaGetLastError(), "launching the update kernel");
              });
}

}  // namespace cuda
}  // namespace dps
