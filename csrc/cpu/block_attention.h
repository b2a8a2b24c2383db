// Block-local attention on the CPU: the one fused kernel behind chunked cross-attention,
// neighbour self-attention, neighbour cross-attention and single-token decoding.
//
// Every one of those ops is "row block g of the queries attends to key block g under one
// softmax" (block-local attention; not grouped-query attention: every head has its own keys):
//
//   q, out   : (batch, groups * q_rows, heads, head_dim)   rows r = g * q_rows + i, r < q_valid_rows
//   k, v     : (batch, groups, keys,   heads, head_dim)
//   key_mask : (batch, groups, keys) bool, true = real key (optional)
//   lse      : (batch, heads, q_valid_rows), log-sum-exp of the scaled scores (+inf if the group
//              has no real key; the output row is then exactly 0). float64 for float64 inputs,
//              float32 otherwise (the accumulation type).
//
//   out[b, r, h] = sum_j softmax_j(scale * q[b, r, h] . k[b, g, j, h]) v[b, g, j, h],  g = r / q_rows
//
// The layout below carries element strides. csrc/torch/cpu_ops.cpp builds it from the one
// description of a problem (q_rows, groups, prefix_rows and the tensors' sizes; see
// retro_kernels/ops/block_attention/layouts.py for how each op maps onto it).
// Raw pointers only; the torch glue lives in csrc/torch/.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

namespace retro_kernels::cpu {

struct BlockAttentionLayout {
  int64_t batch = 0, groups = 0, heads = 0, head_dim = 0;
  int64_t q_rows = 0;        // query rows per group
  int64_t q_valid_rows = 0;  // rows that exist per batch element (<= groups * q_rows)
  int64_t keys = 0;          // keys per group
  // Element strides. q/out/grad_out/grad_q share one layout, k/v/grad_k/grad_v another.
  int64_t q_sb = 0, q_sr = 0, q_sh = 0;
  int64_t k_sb = 0, k_sg = 0, k_sr = 0, k_sh = 0;
  int64_t m_sb = 0, m_sg = 0, m_sr = 0;
  int64_t lse_sb = 0, lse_sh = 0;  // lse row stride is 1
};

// The instruction set the kernels run with, chosen once per process: the best of AVX-512
// (x86-64-v4), AVX2 + FMA (x86-64-v3) and the baseline target (SSE2 on x86-64, NEON on AArch64)
// that the CPU supports, or a lower one named by RETRO_KERNELS_CPU_ISA (default, avx2, avx512).
enum class CpuIsa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);  // "default", "avx2", "avx512"

// Forward: writes out (rows of groups without any real key are 0) and lse.
void block_attention_forward(const BlockAttentionLayout& layout, c10::ScalarType dtype,
                               const void* q, const void* k, const void* v, const bool* key_mask,
                               double scale, void* out, void* lse);

// Backward: given grad_out, out and lse from the forward, writes grad_q, grad_k, grad_v
// (every element of the groups' rows and keys is written).
void block_attention_backward(const BlockAttentionLayout& layout, c10::ScalarType dtype,
                                const void* grad_out, const void* q, const void* k, const void* v,
                                const bool* key_mask, const void* out, const void* lse,
                                double scale, void* grad_q, void* grad_k, void* grad_v);

}  // namespace retro_kernels::cpu
