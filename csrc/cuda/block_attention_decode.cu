// See block_attention_decode.h. Per (sequence, head) and slice of keys, groups of LPK lanes each own one key
// at a time: lane l of a group holds head_dim elements [l * VEC * NV, (l + 1) * VEC * NV), read
// with 16-byte loads, so a warp reads 32 / LPK keys at once, two per group per step to keep more
// loads in flight. Each group keeps an online softmax in base 2:
//   s_j = scale * log2(e) * q . k_j;  m' = max(m, s_j);  l = l 2^(m - m') + 2^(s_j - m');
//   acc = acc 2^(m - m') + 2^(s_j - m') v_j
// Groups merge by shuffles, warps through shared memory, slices in block_attention_decode_combine.
#include "block_attention_decode.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

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

// Loads the N = VEC * NV elements a lane owns, starting at element `first` of `row`: 16-byte
// vector loads when the row is aligned and whole (kVector), else element by element with bounds.
template <typename T, int VEC, int NV, bool kVector>
__device__ __forceinline__ void load_lane(const T* row, int first, int head_dim, float (&x)[VEC * NV]) {
  if constexpr (kVector) {
#pragma unroll
    for (int n = 0; n < NV; ++n) {
      const int d = first + n * VEC;
      if (d < head_dim) {
        const uint4 raw = *reinterpret_cast<const uint4*>(row + d);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < VEC; ++i) x[n * VEC + i] = to_float(e[i]);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) x[n * VEC + i] = 0.f;
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC * NV; ++i) x[i] = first + i < head_dim ? to_float(row[first + i]) : 0.f;
  }
}

// Sum over the LPK lanes of a group (lanes [g * LPK, (g + 1) * LPK)).
template <int LPK>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int o = LPK / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

struct Partial {
  float m, l;
};

// Weight of a partial with max m inside a merge whose max is m_all (0 for an empty partial).
__device__ __forceinline__ float rescale(float m, float m_all) {
  return m == -INFINITY ? 0.f : exp2f(m - m_all);
}

template <int N>
struct SoftmaxState {
  float m = -INFINITY, l = 0.f, acc[N];
  __device__ __forceinline__ SoftmaxState() {
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = 0.f;
  }
  // Adds key with score s (-inf: masked or absent) and value v.
  __device__ __forceinline__ void add(float s, const float (&v)[N]) {
    const float m_new = fmaxf(m, s);
    const float m_safe = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f(m - m_safe), p = exp2f(s - m_safe);
    l = l * alpha + p;
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = acc[i] * alpha + p * v[i];
    m = m_new;
  }
  // Merges the state of the lane `offset` lanes away (xor), the same dims of another group.
  __device__ __forceinline__ void merge_xor(int offset) {
    const float om = __shfl_xor_sync(0xffffffffu, m, offset);
    const float ol = __shfl_xor_sync(0xffffffffu, l, offset);
    const float m_all = fmaxf(m, om);
    const float a = rescale(m, m_all), b = rescale(om, m_all);
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = acc[i] * a + __shfl_xor_sync(0xffffffffu, acc[i], offset) * b;
    l = l * a + ol * b;
    m = m_all;
  }
};

template <typename T, int VEC, int LPK, int NV, bool kVector, bool kDirect>
__global__ void __launch_bounds__(kThreads) block_attention_decode_split(DecodeArgs a) {
  constexpr int N = VEC * NV;     // elements per lane
  constexpr int KPW = 32 / LPK;   // keys a warp reads at once
  const int bh = blockIdx.y;
  const int64_t b = bh / a.heads, h = bh % a.heads;
  const int split = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / LPK, first = (lane % LPK) * N;
  const int64_t per_split = (a.keys + a.splits - 1) / a.splits;
  const int64_t begin = split * per_split;
  const int64_t end = min(a.keys, begin + per_split);

  float q[N];
  load_lane<T, VEC, NV, kVector>(static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh, first, a.head_dim, q);
  const float scale = a.scale * kLog2e;
  const T* kbase = static_cast<const T*>(a.k) + b * a.k_sb + h * a.k_sh;
  const T* vbase = static_cast<const T*>(a.v) + b * a.k_sb + h * a.k_sh;
  const bool* mask = a.mask ? a.mask + b * a.mask_sb : nullptr;

  // Score of key j for this group (-inf when j is masked or past the slice); loads v_j into v.
  auto score = [&](int64_t j, float (&v)[N]) {
    float kx[N];
    const bool live = j < end;
    const int64_t jj = live ? j : begin;  // a valid row to read; its score is discarded
    load_lane<T, VEC, NV, kVector>(kbase + jj * a.k_sk, first, a.head_dim, kx);
    load_lane<T, VEC, NV, kVector>(vbase + jj * a.k_sk, first, a.head_dim, v);
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) dot += q[i] * kx[i];
    dot = group_sum<LPK>(dot) * scale;
    return live && (mask == nullptr || mask[jj]) ? dot : -INFINITY;
  };

  SoftmaxState<N> st;
  constexpr int64_t kStep = 2 * kWarps * KPW;  // two keys per group per step
  // The loop bound is uniform across the warp (the group shuffles need every lane); keys past
  // the slice score -inf.
  for (int64_t base = begin + warp * 2 * KPW; base < end; base += kStep) {
    float v0[N], v1[N];
    const float s0 = score(base + group, v0);
    const float s1 = score(base + KPW + group, v1);
    st.add(s0, v0);
    st.add(s1, v1);
  }
#pragma unroll
  for (int o = LPK; o < 32; o <<= 1) st.merge_xor(o);  // groups of the warp

  // Merge the warps of this block (lanes of group 0 hold each warp's result).
  __shared__ Partial part[kWarps];
  __shared__ float vals[kWarps][kMaxHeadDim];
  if (lane == 0) part[warp] = Partial{st.m, st.l};
  if (group == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (first + i < a.head_dim) vals[warp][first + i] = st.acc[i];
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
__global__ void __launch_bounds__(kThreads) block_attention_decode_combine(DecodeArgs a) {
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

template <typename T, int VEC, int LPK, int NV, bool kVector>
cudaError_t launch_typed(const DecodeArgs& a, cudaStream_t stream) {
  const dim3 grid(a.splits, static_cast<unsigned>(a.batch * a.heads));
  if (a.splits == 1) {
    block_attention_decode_split<T, VEC, LPK, NV, kVector, true><<<grid, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  }
  block_attention_decode_split<T, VEC, LPK, NV, kVector, false><<<grid, kThreads, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  block_attention_decode_combine<T><<<static_cast<unsigned>(a.batch * a.heads), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

// Lanes per key: enough 16-byte vectors to cover head_dim, a power of two up to a warp.
template <typename T, bool kVector>
cudaError_t launch_for_dim(const DecodeArgs& a, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const int vectors = static_cast<int>((a.head_dim + VEC - 1) / VEC);
  if (vectors <= 1) return launch_typed<T, VEC, 1, 1, kVector>(a, stream);
  if (vectors <= 2) return launch_typed<T, VEC, 2, 1, kVector>(a, stream);
  if (vectors <= 4) return launch_typed<T, VEC, 4, 1, kVector>(a, stream);
  if (vectors <= 8) return launch_typed<T, VEC, 8, 1, kVector>(a, stream);
  if (vectors <= 16) return launch_typed<T, VEC, 16, 1, kVector>(a, stream);
  if (vectors <= 32) return launch_typed<T, VEC, 32, 1, kVector>(a, stream);
  if (vectors <= 64) return launch_typed<T, VEC, 32, 2, kVector>(a, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_for_layout(const DecodeArgs& a, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vector = a.head_dim % VEC == 0 && a.q_sb % VEC == 0 && a.q_sh % VEC == 0 &&
                      a.k_sb % VEC == 0 && a.k_sk % VEC == 0 && a.k_sh % VEC == 0 && aligned(a.q) &&
                      aligned(a.k) && aligned(a.v);
  return vector ? launch_for_dim<T, true>(a, stream) : launch_for_dim<T, false>(a, stream);
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

cudaError_t launch_block_attention_decode(const DecodeArgs& a, DType dtype, cudaStream_t stream) {
  if (a.head_dim < 1 || a.head_dim > kMaxHeadDim || a.splits < 1) return cudaErrorInvalidValue;
  if (a.batch * a.heads == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_for_layout<float>(a, stream);
    case DType::kFloat16: return launch_for_layout<__half>(a, stream);
    case DType::kBFloat16: return launch_for_layout<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace retro_kernels::cuda
