// The masked gradient norms of DPSAdamW.clip_grad_norm_: one pass over each
// gradient and its packed mask bits, one launch for every tensor of a dtype.
#include "staging.cuh"

namespace dps {
namespace cuda {
namespace {

// Per chunk: each thread sums (g * bit)^2 over its entries in double (each
// square exact, as in the reference), the block adds the threads' sums, and one
// atomic adds that to the tensor's total. An inf masked out gives NaN, as
// grad * mask does.
template <typename P>
__global__ void __launch_bounds__(kThreads)
    masked_norm_kernel(const NormArgs* __restrict__ tensors, const Chunk* __restrict__ chunks, int nchunks,
                       double* __restrict__ sums) {
  __shared__ double warp_sums[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const Chunk chunk = chunks[c];
    const NormArgs a = tensors[chunk.tensor];
    const P* __restrict__ g = (const P*)a.g;
    const int64_t begin = (int64_t)chunk.index * kUpdateChunk;
    const int64_t end = min64(begin + kUpdateChunk, a.numel);
    double total = 0.0;
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      const double x = (double)load_value(g[i]) * (double)((a.mask[i >> 3] >> (i & 7)) & 1u);
      total = fma(x, x, total);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_down_sync(0xffffffffu, total, offset);
    if (lane == 0) warp_sums[warp] = total;
    __syncthreads();
    if (threadIdx.x == 0) {
      double block = 0.0;
      for (int w = 0; w < kThreads / 32; ++w) block += warp_sums[w];
      atomicAdd(&sums[chunk.tensor], block);
    }
    __syncthreads();  // warp_sums is reused by the next chunk
  }
}

}  // namespace

void masked_sq_norms(int device, int64_t stream_handle, int dtype, const std::vector<NormArgs>& tensors,
                     int64_t sums) {
  ensure_ready();
  cudaStream_t stream = (cudaStream_t)stream_handle;
  with_tables(device, stream, tensors, kUpdateChunk,
              [&](const NormArgs* table, const Chunk* chunks, int nchunks, int grid) {
                with_dtype(dtype, [&](auto type) {
                  masked_norm_kernel<typename decltype(type)::type>
                      <<<grid, kThreads, 0, stream>>>(table, chunks, nchunks, (double*)sums);
                });
                check(cudaGetLastError(), "launching the masked-norm kernel");
              });
}

}  // namespace cuda
}  // namespace dps
