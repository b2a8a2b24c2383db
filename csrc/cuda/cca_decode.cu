// See cca_decode.h. Per (sequence, head) and slice of keys, each warp keeps an online softmax:
//   s_j = scale * log2(e) * q . k_j;  m' = max(m, s_j);  l = l 2^(m - m') + 2^(s_j - m');
//   acc = acc 2^(m - m') + 2^(s_j - m') v_j
// Lane `l` owns head_dim elements [l * EPL, (l + 1) * EPL). Warps of a block merge through shared
// memory; slices merge in cca_decode_combine.
#include "cca_decode.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace retro_kernels::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Loads the EPL elements this lane owns (bounds-checked against head_dim).
template <typename T, int EPL>
__device__ __forceinline__ void load_lane(const T* row, int lane, int head_dim, float (&x)[EPL]) {
#pragma unroll
  for (int e = 0; e < EPL; ++e) {
    const int d = lane * EPL + e;
    x[e] = d < head_dim ? to_float(row[d]) : 0.f;
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

struct Partial {
  float m, l;
};

// Weight of a partial with max m inside a merge whose max is m_all (0 for an empty partial).
__device__ __forceinline__ float rescale(float m, float m_all) {
  return m == -INFINITY ? 0.f : exp2f(m - m_all);
}

template <typename T, int EPL, bool kDirect>
__global__ void __launch_bounds__(kThreads) cca_decode_split(DecodeArgs a) {
  const int bh = blockIdx.y;
  const int64_t b = bh / a.heads, h = bh % a.heads;
  const int split = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t per_split = (a.keys + a.splits - 1) / a.splits;
  const int64_t begin = split * per_split;
  const int64_t end = min(a.keys, begin + per_split);

  float q[EPL];
  load_lane<T, EPL>(static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh, lane, a.head_dim, q);
  const float scale = a.scale * kLog2e;
  const T* kbase = static_cast<const T*>(a.k) + b * a.k_sb + h * a.k_sh;
  const T* vbase = static_cast<const T*>(a.v) + b * a.k_sb + h * a.k_sh;
  const bool* mask = a.mask ? a.mask + b * a.mask_sb : nullptr;

  float m = -INFINITY, l = 0.f, acc[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) acc[e] = 0.f;
  for (int64_t j = begin + warp; j < end; j += kWarps) {
    if (mask && !mask[j]) continue;  // uniform across the warp
    float kx[EPL], vx[EPL];
    load_lane<T, EPL>(kbase + j * a.k_sk, lane, a.head_dim, kx);
    load_lane<T, EPL>(vbase + j * a.k_sk, lane, a.head_dim, vx);
    float dot = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) dot += q[e] * kx[e];
    const float s = warp_sum(dot) * scale;
    const float m_new = fmaxf(m, s);
    const float alpha = rescale(m, m_new);
    const float p = exp2f(s - m_new);
    l = l * alpha + p;
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[e] = acc[e] * alpha + p * vx[e];
    m = m_new;
  }

  // Merge the warps of this block.
  __shared__ Partial part[kWarps];
  __shared__ float vals[kWarps][kMaxHeadDim];
  if (lane == 0) part[warp] = Partial{m, l};
#pragma unroll
  for (int e = 0; e < EPL; ++e) {
    const int d = lane * EPL + e;
    if (d < a.head_dim) vals[warp][d] = acc[e];
  }
  __syncthreads();
  float m_all = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, part[w].m);
  float l_all = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) l_all += part[w].l * rescale(part[w].m, m_all);
  for (int d = threadIdx.x; d < a.head_dim; d += kThreads) {
    float x = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) x += vals[w][d] * rescale(part[w].m, m_all);
    if constexpr (kDirect) {
      T* out = static_cast<T*>(a.out) + b * a.out_sb + h * a.out_sh;
      out[d] = from_float<T>(l_all > 0.f ? x / l_all : 0.f);
    } else {
      float* ws = a.workspace + (static_cast<int64_t>(bh) * a.splits + split) * (a.head_dim + 2);
      ws[2 + d] = x;
    }
  }
  if constexpr (!kDirect) {
    if (threadIdx.x == 0) {
      float* ws = a.workspace + (static_cast<int64_t>(bh) * a.splits + split) * (a.head_dim + 2);
      ws[0] = m_all;
      ws[1] = l_all;
    }
  }
}

// Merges the slices of one (sequence, head): grid batch * heads.
template <typename T>
__global__ void __launch_bounds__(kThreads) cca_decode_combine(DecodeArgs a) {
  const int bh = blockIdx.x;
  const int64_t b = bh / a.heads, h = bh % a.heads;
  const int64_t row = a.head_dim + 2;
  const float* ws = a.workspace + static_cast<int64_t>(bh) * a.splits * row;
  float m_all = -INFINITY;
  for (int s = 0; s < a.splits; ++s) m_all = fmaxf(m_all, ws[s * row]);
  float l_all = 0.f;
  for (int s = 0; s < a.splits; ++s) l_all += ws[s * row + 1] * rescale(ws[s * row], m_all);
  T* out = static_cast<T*>(a.out) + b * a.out_sb + h * a.out_sh;
  for (int d = threadIdx.x; d < a.head_dim; d += kThreads) {
    float x = 0.f;
    for (int s = 0; s < a.splits; ++s) x += ws[s * row + 2 + d] * rescale(ws[s * row], m_all);
    out[d] = from_float<T>(l_all > 0.f ? x / l_all : 0.f);
  }
}

template <typename T, int EPL>
cudaError_t launch_typed(const DecodeArgs& a, cudaStream_t stream) {
  const dim3 grid(a.splits, static_cast<unsigned>(a.batch * a.heads));
  if (a.splits == 1) {
    cca_decode_split<T, EPL, true><<<grid, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  }
  cca_decode_split<T, EPL, false><<<grid, kThreads, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  cca_decode_combine<T><<<static_cast<unsigned>(a.batch * a.heads), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_dim(const DecodeArgs& a, cudaStream_t stream) {
  switch ((a.head_dim + 31) / 32) {
    case 1: return launch_typed<T, 1>(a, stream);
    case 2: return launch_typed<T, 2>(a, stream);
    case 3: return launch_typed<T, 3>(a, stream);
    case 4: return launch_typed<T, 4>(a, stream);
    case 5: return launch_typed<T, 5>(a, stream);
    case 6: return launch_typed<T, 6>(a, stream);
    case 7: return launch_typed<T, 7>(a, stream);
    case 8: return launch_typed<T, 8>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int decode_num_splits(int64_t batch, int64_t heads, int64_t keys, int sm_count) {
  const int64_t rows = batch * heads;
  const int64_t want = (4LL * sm_count + rows - 1) / rows;  // about 4 blocks per multiprocessor
  const int64_t most = (keys + 31) / 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(want, most)));
}

size_t decode_workspace_floats(int64_t batch, int64_t heads, int64_t head_dim, int splits) {
  return splits > 1 ? static_cast<size_t>(batch * heads * splits * (head_dim + 2)) : 0;
}

cudaError_t launch_cca_decode(const DecodeArgs& a, DType dtype, cudaStream_t stream) {
  if (a.head_dim < 1 || a.head_dim > kMaxHeadDim || a.splits < 1) return cudaErrorInvalidValue;
  if (a.batch * a.heads == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_for_dim<float>(a, stream);
    case DType::kFloat16: return launch_for_dim<__half>(a, stream);
    case DType::kBFloat16: return launch_for_dim<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace retro_kernels::cuda
