// CPU implementations of the retro_kernels ops (schemas in registration.cpp): block-local
// attention, forward and backward, and its one-row-per-group decode form. Every op takes the one
// description of a problem -- q (batch, rows, heads, head_dim), k/v (batch, key_groups, keys,
// heads, head_dim), key_mask, q_rows, groups, prefix_rows -- checks every argument against the
// others (arg_checks.h) before a kernel touches memory, and builds the kernel's strided layout
// (csrc/cpu/block_attention.h) from it in one place, to_layout. How each public op maps its
// tensors onto that description lives only in retro_kernels/ops/block_attention/layouts.py.
// The ops take contiguous tensors (the public functions make them so).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "../cpu/block_attention.h"
#include "arg_checks.h"

namespace retro_kernels {
namespace {

using at::Tensor;
using checks::ArgChecker;
using checks::BlockProblem;
using cpu::BlockAttentionLayout;

constexpr std::initializer_list<at::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kBFloat16,
                                                           at::kHalf};

// The kernel layout of a checked problem on contiguous tensors, starting at row prefix_rows of q
// and lse (the callers offset their pointers by prefix_rows rows).
BlockAttentionLayout to_layout(const BlockProblem& p) {
  const int64_t H = p.heads, D = p.head_dim;
  BlockAttentionLayout L;
  L.batch = p.batch;
  L.groups = p.groups;
  L.heads = H;
  L.head_dim = D;
  // A group never has more rows than exist: q_rows beyond q_valid changes nothing but would
  // overflow g * q_rows (only group 0 can then have rows).
  L.q_rows = std::min(p.q_rows, std::max<int64_t>(p.q_valid, 1));
  L.q_valid_rows = p.q_valid;
  L.keys = p.keys;
  L.q_sb = p.rows * H * D;
  L.q_sr = H * D;
  L.q_sh = D;
  L.k_sb = p.key_groups * p.keys * H * D;
  L.k_sg = p.keys * H * D;
  L.k_sr = H * D;
  L.k_sh = D;
  L.m_sb = p.key_groups * p.keys;
  L.m_sg = p.keys;
  L.m_sr = 1;
  L.lse_sb = H * p.rows;
  L.lse_sh = p.rows;
  return L;
}

// The mask has been checked: bool, contiguous, (batch, key_groups, keys).
const bool* mask_ptr(const std::optional<Tensor>& mask) {
  return mask.has_value() ? mask->data_ptr<bool>() : nullptr;
}

// Byte address of row `row` of a contiguous q-like tensor (batch, rows, heads, head_dim).
template <typename P>
P* at_row(const Tensor& t, int64_t row) {
  using Byte = std::conditional_t<std::is_const_v<P>, const char, char>;
  return static_cast<P*>(static_cast<Byte*>(t.data_ptr()) +
                         row * t.size(2) * t.size(3) * t.element_size());
}

template <typename P>
P* at_lse_row(const Tensor& lse, int64_t row) {
  using Byte = std::conditional_t<std::is_const_v<P>, const char, char>;
  return static_cast<P*>(static_cast<Byte*>(lse.data_ptr()) + row * lse.element_size());
}

// Writes out and lse of a checked problem: prefix rows 0 and +inf, the groups' rows by the kernel.
void forward(const BlockProblem& p, const Tensor& q, const Tensor& k, const Tensor& v,
             const std::optional<Tensor>& mask, double scale, Tensor& out, Tensor& lse) {
  if (p.prefix_rows > 0) {  // (skipped when empty: four dispatches fewer in a small call)
    out.narrow(1, 0, p.prefix_rows).zero_();
    lse.narrow(2, 0, p.prefix_rows).fill_(std::numeric_limits<double>::infinity());
  }
  // No group has rows (e.g. a sequence shorter than one chunk): nothing else to compute, and
  // the row offset prefix_rows must not be formed into a pointer past the end.
  if (p.groups == 0 || p.q_valid == 0) return;
  cpu::block_attention_forward(to_layout(p), q.scalar_type(), at_row<const void>(q, p.prefix_rows),
                               k.data_ptr(), v.data_ptr(), mask_ptr(mask), scale,
                               at_row<void>(out, p.prefix_rows),
                               at_lse_row<void>(lse, p.prefix_rows));
}

std::tuple<Tensor, Tensor> block_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const std::optional<Tensor>& key_mask,
                                               int64_t q_rows, int64_t groups, int64_t prefix_rows,
                                               double scale) {
  const ArgChecker c("block_attention_fwd", q, checks::kRowsQ, 4, c10::DeviceType::CPU, kDtypes);
  const BlockProblem p =
      checks::check_block_problem(c, q, k, v, key_mask, q_rows, groups, prefix_rows, scale);
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({p.batch, p.heads, p.rows}, q.options().dtype(checks::lse_dtype(q.scalar_type())));
  forward(p, q, k, v, key_mask, scale, out, lse);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> block_attention_bwd(const Tensor& grad_out, const Tensor& q,
                                                       const Tensor& k, const Tensor& v,
                                                       const std::optional<Tensor>& key_mask,
                                                       const Tensor& out, const Tensor& lse,
                                                       int64_t q_rows, int64_t groups,
                                                       int64_t prefix_rows, double scale) {
  const ArgChecker c("block_attention_bwd", q, checks::kRowsQ, 4, c10::DeviceType::CPU, kDtypes);
  const BlockProblem p =
      checks::check_block_problem(c, q, k, v, key_mask, q_rows, groups, prefix_rows, scale);
  checks::check_backward_extras(c, q, grad_out, out, lse);
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (p.prefix_rows > 0) dq.narrow(1, 0, p.prefix_rows).zero_();
  // Key groups beyond `groups` get no gradient (the kernel writes every key of the groups).
  if (p.key_groups > p.groups) {
    dk.narrow(1, p.groups, p.key_groups - p.groups).zero_();
    dv.narrow(1, p.groups, p.key_groups - p.groups).zero_();
  }
  if (p.groups == 0 || p.q_valid == 0) {
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  cpu::block_attention_backward(
      to_layout(p), q.scalar_type(), at_row<const void>(grad_out, p.prefix_rows),
      at_row<const void>(q, p.prefix_rows), k.data_ptr(), v.data_ptr(), mask_ptr(key_mask),
      at_row<const void>(out, p.prefix_rows), at_lse_row<const void>(lse, p.prefix_rows), scale,
      at_row<void>(dq, p.prefix_rows), dk.data_ptr(), dv.data_ptr());
  return {dq, dk, dv};
}

// One query row per key group: q (B, G, H, D) is the problem q_rows = 1, groups = G,
// prefix_rows = 0 of block_attention_fwd, without lse.
Tensor block_attention_decode(const Tensor& q, const Tensor& k, const Tensor& v,
                              const std::optional<Tensor>& key_mask, double scale) {
  const ArgChecker c("block_attention_decode", q, checks::kDecodeQ, 4, c10::DeviceType::CPU, kDtypes);
  checks::check_decode(c, q, k, v, key_mask, scale);
  BlockProblem p;
  p.batch = q.size(0);
  p.rows = p.key_groups = p.groups = p.q_valid = q.size(1);
  p.heads = q.size(2);
  p.head_dim = q.size(3);
  p.keys = k.size(2);
  p.q_rows = 1;
  p.prefix_rows = 0;
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({p.batch, p.heads, p.rows}, q.options().dtype(checks::lse_dtype(q.scalar_type())));
  forward(p, q, k, v, key_mask, scale, out, lse);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(retro_kernels, CPU, m) {
  m.impl("block_attention_fwd", &block_attention_fwd);
  m.impl("block_attention_bwd", &block_attention_bwd);
  m.impl("block_attention_decode", &block_attention_decode);
}

}  // namespace retro_kernels
