// Block-local attention with one query row per key group, the form incremental decoding takes
// (one step of chunked cross-attention: retro_kernels/ops/block_attention/layouts.py), on the GPU
// in plain CUDA C++ (no torch headers, so `nvcc -c` checks it anywhere). The torch glue is
// csrc/torch_cuda/block_attention_decode_cuda.cpp; it passes each (batch element, key group) of
// the op's description as one `batch` element here.
//
//   q    (batch, heads, head_dim)                one query row per batch element
//   k, v (batch, keys, heads, head_dim)          keys = num_neighbours * neighbour_len for CCA
//   mask (batch, keys) bool, true = real key     (optional)
//   out  (batch, heads, head_dim) = softmax(scale * q . k) v over real keys; 0 if none is real.
//
// Split-K ("flash decoding"): grid (splits, batch * heads); each block reduces its slice of keys
// to a partial (max, sum, weighted values) with online softmaxes (several keys per warp, 16-byte
// loads), and one combine kernel merges the slices. With a single split the block writes the
// output directly.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace retro_kernels::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct DecodeArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const bool* mask = nullptr;  // nullptr: every key is real
  void* out = nullptr;
  float* workspace = nullptr;  // decode_workspace_floats(...) floats when splits > 1
  int64_t batch = 0, heads = 0, head_dim = 0, keys = 0;
  // Element strides; the last (head_dim) dimension is contiguous.
  int64_t q_sb = 0, q_sh = 0;
  int64_t k_sb = 0, k_sk = 0, k_sh = 0;  // shared by v
  int64_t mask_sb = 0;                   // mask's key stride is 1
  int64_t out_sb = 0, out_sh = 0;
  float scale = 1.f;
  int splits = 1;
};

// Largest head_dim the kernel supports.
constexpr int kMaxHeadDim = 256;

// Splits that fill `sm_count` multiprocessors without slicing keys thinner than 32.
int decode_num_splits(int64_t batch, int64_t heads, int64_t keys, int sm_count);

size_t decode_workspace_floats(int64_t batch, int64_t heads, int64_t head_dim, int splits);

// Launches on `stream`; returns the launch error (cudaSuccess when none).
cudaError_t launch_block_attention_decode(const DecodeArgs& args, DType dtype, cudaStream_t stream);

}  // namespace retro_kernels::cuda
