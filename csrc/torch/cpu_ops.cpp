// CPU implementations of the retro_kernels ops: each maps its tensors onto the grouped-attention
// layout (csrc/cpu/grouped_attention.h) without copying and calls the fused kernel.
// The public functions check their arguments in Python; every op here checks every tensor
// argument against the others again (arg_checks.h) before a kernel touches memory, so calling
// torch.ops.retro_kernels.* directly with inconsistent tensors raises instead of reading past
// their ends. The ops take contiguous tensors (the public functions make them so).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <initializer_list>
#include <limits>

#include "../cpu/grouped_attention.h"
#include "arg_checks.h"

namespace retro_kernels {
namespace {

using at::Tensor;
using checks::ArgChecker;
using cpu::GroupedAttentionLayout;

// The (B, G, rows, H, D) x (B, G, keys, H, D) problem on contiguous tensors.
struct Problem {
  int64_t batch, groups, rows, valid_rows, keys, heads, dim;
  int64_t q_batch_stride;   // elements between batch rows of q
  int64_t k_batch_stride, k_group_stride;
  int64_t mask_batch_stride, mask_group_stride;
  int64_t lse_rows;         // length of lse's last dimension
};

GroupedAttentionLayout to_layout(const Problem& p) {
  GroupedAttentionLayout L;
  L.batch = p.batch;
  L.groups = p.groups;
  L.heads = p.heads;
  L.head_dim = p.dim;
  L.q_rows = p.rows;
  L.q_valid_rows = p.valid_rows;
  L.keys = p.keys;
  L.q_sb = p.q_batch_stride;
  L.q_sr = p.heads * p.dim;
  L.q_sh = p.dim;
  L.k_sb = p.k_batch_stride;
  L.k_sg = p.k_group_stride;
  L.k_sr = p.heads * p.dim;
  L.k_sh = p.dim;
  L.m_sb = p.mask_batch_stride;
  L.m_sg = p.mask_group_stride;
  L.m_sr = 1;
  L.lse_sb = p.heads * p.lse_rows;
  L.lse_sh = p.lse_rows;
  return L;
}

at::ScalarType lse_dtype(const Tensor& q) { return checks::lse_dtype(q.scalar_type()); }

// The mask has been checked: bool, contiguous, the op's shape.
const bool* mask_ptr(const std::optional<Tensor>& mask) {
  return mask.has_value() ? mask->data_ptr<bool>() : nullptr;
}

// Runs the forward on q/out starting `row_offset` rows into each batch row (CCA's shift).
void forward(const Problem& p, const Tensor& q, const Tensor& k, const Tensor& v,
             const std::optional<Tensor>& mask, double scale, Tensor& out, Tensor& lse,
             int64_t row_offset) {
  const int64_t qo = row_offset * p.heads * p.dim;
  const int64_t elem = q.element_size(), lse_elem = lse.element_size();
  cpu::grouped_attention_forward(
      to_layout(p), q.scalar_type(), static_cast<const char*>(q.data_ptr()) + qo * elem,
      k.data_ptr(), v.data_ptr(), mask_ptr(mask), scale,
      static_cast<char*>(out.data_ptr()) + qo * elem,
      static_cast<char*>(lse.data_ptr()) + row_offset * lse_elem);
}

void backward(const Problem& p, const Tensor& grad_out, const Tensor& q, const Tensor& k,
              const Tensor& v, const std::optional<Tensor>& mask, const Tensor& out,
              const Tensor& lse, double scale, Tensor& dq, Tensor& dk, Tensor& dv,
              int64_t row_offset) {
  const int64_t qo = (row_offset * p.heads * p.dim) * q.element_size();
  const auto at_row = [&](const Tensor& t) { return static_cast<const char*>(t.data_ptr()) + qo; };
  cpu::grouped_attention_backward(
      to_layout(p), q.scalar_type(), at_row(grad_out), at_row(q), k.data_ptr(), v.data_ptr(),
      mask_ptr(mask), at_row(out), static_cast<const char*>(lse.data_ptr()) + row_offset * lse.element_size(),
      scale, static_cast<char*>(dq.data_ptr()) + qo, dk.data_ptr(), dv.data_ptr());
}

// ---- chunked cross-attention --------------------------------------------------------------
// q (B, N, H, D); k, v (B, L, K, R, H, D) with L >= N // chunk_size; mask (B, L, K, R).

constexpr std::initializer_list<at::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kBFloat16,
                                                           at::kHalf};

ArgChecker check_cca(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                     const std::optional<Tensor>& mask, int64_t chunk_size, double scale) {
  ArgChecker c(op, q, checks::kCcaQ, 4, c10::DeviceType::CPU, kDtypes);
  c.ndim("k", k, 6, checks::kNeighbours);
  c.at_least("chunk_size", chunk_size, 1);
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t L = k.size(1), K = k.size(2), R = k.size(3);
  c.tensor("k", k, {B, L, K, R, H, D}, checks::kNeighbours,
           checks::from("batch, heads and head_dim", q));
  TORCH_CHECK_VALUE(L >= N / chunk_size, op, ": k has ", L, " chunks (shape ",
                    checks::str(k.sizes()), "), expected at least seq_len // chunk_size = ", N,
                    " // ", chunk_size, " = ", N / chunk_size, " (seq_len from q)");
  c.tensor("v", v, k.sizes(), checks::kNeighbours, checks::from("the shape", k, "k"));
  c.mask("neighbour_mask", mask, {B, L, K, R}, checks::kNeighbourMask,
         checks::from("the first four sizes", k, "k"));
  c.finite("softmax_scale", scale);
  return c;
}

Problem cca_problem(const Tensor& q, const Tensor& k, int64_t chunk_size) {
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t L = k.size(1), K = k.size(2), R = k.size(3);
  const int64_t used = N / chunk_size;
  // Shifted row r = t - (chunk_size - 1) belongs to chunk r / chunk_size.
  return Problem{B, used, chunk_size, std::max<int64_t>(N - chunk_size + 1, 0), K * R, H, D,
                 N * H * D, L * K * R * H * D, K * R * H * D, L * K * R, K * R, N};
}

std::tuple<Tensor, Tensor> cca_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const std::optional<Tensor>& mask, int64_t chunk_size,
                                   double scale) {
  check_cca("cca_fwd", q, k, v, mask, chunk_size, scale);
  const Problem p = cca_problem(q, k, chunk_size);
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({p.batch, p.heads, p.lse_rows}, q.options().dtype(lse_dtype(q)));
  // Positions 0 .. chunk_size-2 attend to nothing: exactly 0.
  const int64_t head = std::min<int64_t>(chunk_size - 1, q.size(1));
  out.narrow(1, 0, head).zero_();
  lse.narrow(2, 0, head).fill_(std::numeric_limits<double>::infinity());
  // No complete chunk (chunk_size > seq_len): nothing else to compute, and the row offset
  // chunk_size - 1 must not be formed into a pointer.
  if (p.groups > 0) forward(p, q, k, v, mask, scale, out, lse, chunk_size - 1);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> cca_bwd(const Tensor& grad_out, const Tensor& q,
                                           const Tensor& k, const Tensor& v,
                                           const std::optional<Tensor>& mask, const Tensor& out,
                                           const Tensor& lse, int64_t chunk_size, double scale) {
  const ArgChecker c = check_cca("cca_bwd", q, k, v, mask, chunk_size, scale);
  checks::check_backward_extras(c, q, checks::kCcaQ, grad_out, out, lse, q.size(1));
  const Problem p = cca_problem(q, k, chunk_size);
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  dq.narrow(1, 0, std::min<int64_t>(chunk_size - 1, q.size(1))).zero_();
  if (k.size(1) > p.groups) {  // chunks beyond seq_len // chunk_size are unused
    dk.narrow(1, p.groups, k.size(1) - p.groups).zero_();
    dv.narrow(1, p.groups, k.size(1) - p.groups).zero_();
  }
  if (p.groups > 0)
    backward(p, grad_out, q, k, v, mask, out, lse, scale, dq, dk, dv, chunk_size - 1);
  return {dq, dk, dv};
}

// ---- neighbour self-attention ---------------------------------------------------------------
// q, k, v (B, L, K, R, H, D); mask (B, L, K, R).

ArgChecker check_self(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                      const std::optional<Tensor>& mask, double scale) {
  ArgChecker c(op, q, checks::kNeighbours, 6, c10::DeviceType::CPU, kDtypes);
  c.tensor("k", k, q.sizes(), checks::kNeighbours, checks::from("the shape", q));
  c.tensor("v", v, q.sizes(), checks::kNeighbours, checks::from("the shape", q));
  c.mask("neighbour_mask", mask, q.sizes().slice(0, 4), checks::kNeighbourMask,
         checks::from("the first four sizes", q));
  c.finite("softmax_scale", scale);
  return c;
}

Problem self_problem(const Tensor& q) {
  const int64_t B = q.size(0), L = q.size(1), K = q.size(2), R = q.size(3), H = q.size(4),
                D = q.size(5);
  return Problem{B, L * K, R, L * K * R, R, H, D, L * K * R * H * D, L * K * R * H * D,
                 R * H * D, L * K * R, R, L * K * R};
}

std::tuple<Tensor, Tensor> self_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                    const std::optional<Tensor>& mask, double scale) {
  check_self("neighbour_self_attn_fwd", q, k, v, mask, scale);
  const Problem p = self_problem(q);
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({p.batch, p.heads, p.lse_rows}, q.options().dtype(lse_dtype(q)));
  forward(p, q, k, v, mask, scale, out, lse, 0);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> self_bwd(const Tensor& grad_out, const Tensor& q,
                                            const Tensor& k, const Tensor& v,
                                            const std::optional<Tensor>& mask, const Tensor& out,
                                            const Tensor& lse, double scale) {
  const ArgChecker c = check_self("neighbour_self_attn_bwd", q, k, v, mask, scale);
  const Problem p = self_problem(q);
  checks::check_backward_extras(c, q, checks::kNeighbours, grad_out, out, lse, p.lse_rows);
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  backward(p, grad_out, q, k, v, mask, out, lse, scale, dq, dk, dv, 0);
  return {dq, dk, dv};
}

// ---- neighbour cross-attention --------------------------------------------------------------
// q (B, L, K, R, H, D); k, v (B, L, C, H, D) shared by the K neighbours of a chunk; mask (B, L, C).

ArgChecker check_cross(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                       const std::optional<Tensor>& mask, double scale) {
  ArgChecker c(op, q, checks::kNeighbours, 6, c10::DeviceType::CPU, kDtypes);
  c.ndim("k", k, 5, checks::kChunkKV);
  const int64_t B = q.size(0), L = q.size(1), H = q.size(4), D = q.size(5), C = k.size(2);
  c.tensor("k", k, {B, L, C, H, D}, checks::kChunkKV,
           checks::from("batch, num_chunks, heads and head_dim", q));
  c.tensor("v", v, k.sizes(), checks::kChunkKV, checks::from("the shape", k, "k"));
  c.mask("chunk_mask", mask, {B, L, C}, checks::kChunkMask,
         checks::from("the first three sizes", k, "k"));
  c.finite("softmax_scale", scale);
  return c;
}

Problem cross_problem(const Tensor& q, const Tensor& k) {
  const int64_t B = q.size(0), L = q.size(1), K = q.size(2), R = q.size(3), H = q.size(4),
                D = q.size(5), C = k.size(2);
  return Problem{B, L, K * R, L * K * R, C, H, D, L * K * R * H * D, L * C * H * D, C * H * D,
                 L * C, C, L * K * R};
}

std::tuple<Tensor, Tensor> cross_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                     const std::optional<Tensor>& mask, double scale) {
  check_cross("neighbour_cross_attn_fwd", q, k, v, mask, scale);
  const Problem p = cross_problem(q, k);
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({p.batch, p.heads, p.lse_rows}, q.options().dtype(lse_dtype(q)));
  forward(p, q, k, v, mask, scale, out, lse, 0);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> cross_bwd(const Tensor& grad_out, const Tensor& q,
                                             const Tensor& k, const Tensor& v,
                                             const std::optional<Tensor>& mask, const Tensor& out,
                                             const Tensor& lse, double scale) {
  const ArgChecker c = check_cross("neighbour_cross_attn_bwd", q, k, v, mask, scale);
  const Problem p = cross_problem(q, k);
  checks::check_backward_extras(c, q, checks::kNeighbours, grad_out, out, lse, p.lse_rows);
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  backward(p, grad_out, q, k, v, mask, out, lse, scale, dq, dk, dv, 0);
  return {dq, dk, dv};
}

// ---- decoding --------------------------------------------------------------------------------

Tensor cca_decode(const Tensor& q, const Tensor& k, const Tensor& v,
                  const std::optional<Tensor>& mask, double scale) {
  const ArgChecker c("cca_decode", q, checks::kDecodeQ, 3, c10::DeviceType::CPU, kDtypes);
  checks::check_cca_decode(c, q, k, v, mask, scale);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = k.size(1), R = k.size(2);
  // One group per sequence holding its single query row.
  const Problem p{B, 1, 1, 1, K * R, H, D, H * D, K * R * H * D, 0, K * R, 0, 1};
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({B, H, 1}, q.options().dtype(lse_dtype(q)));
  forward(p, q, k, v, mask, scale, out, lse, 0);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(retro_kernels, CPU, m) {
  m.impl("cca_fwd", &cca_fwd);
  m.impl("cca_bwd", &cca_bwd);
  m.impl("neighbour_self_attn_fwd", &self_fwd);
  m.impl("neighbour_self_attn_bwd", &self_bwd);
  m.impl("neighbour_cross_attn_fwd", &cross_fwd);
  m.impl("neighbour_cross_attn_bwd", &cross_bwd);
  m.impl("cca_decode", &cca_decode);
}

}  // namespace retro_kernels
