// CPU implementations of the retro_kernels ops: each maps its tensors onto the grouped-attention
// layout (csrc/cpu/grouped_attention.h) without copying and calls the fused kernel.
// Argument checking for users happens in Python before any op is called; the TORCH_CHECKs here
// only guard the kernels against direct misuse of torch.ops.retro_kernels.*.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "../cpu/grouped_attention.h"

namespace retro_kernels {
namespace {

using at::Tensor;
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

at::ScalarType lse_dtype(const Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

const bool* mask_ptr(const std::optional<Tensor>& mask) {
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous(), "mask must be contiguous bool");
  return mask->data_ptr<bool>();
}

std::optional<Tensor> contiguous(const std::optional<Tensor>& t) {
  if (!t.has_value()) return t;
  return t->contiguous();
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

Problem cca_problem(const Tensor& q, const Tensor& k, int64_t chunk_size) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 6, "cca: q must be 4-D and k 6-D");
  TORCH_CHECK(chunk_size >= 1, "cca: chunk_size must be >= 1");
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t L = k.size(1), K = k.size(2), R = k.size(3);
  const int64_t used = N / chunk_size;
  TORCH_CHECK(L >= used, "cca: need at least seq_len // chunk_size chunks");
  // Shifted row r = t - (chunk_size - 1) belongs to chunk r / chunk_size.
  return Problem{B, used, chunk_size, std::max<int64_t>(N - chunk_size + 1, 0), K * R, H, D,
                 N * H * D, L * K * R * H * D, K * R * H * D, L * K * R, K * R, N};
}

std::tuple<Tensor, Tensor> cca_fwd(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                   const std::optional<Tensor>& mask_, int64_t chunk_size,
                                   double scale) {
  const Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const auto mask = contiguous(mask_);
  const Problem p = cca_problem(q, k, chunk_size);
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({p.batch, p.heads, p.lse_rows}, q.options().dtype(lse_dtype(q)));
  // Positions 0 .. chunk_size-2 attend to nothing: exactly 0.
  const int64_t head = std::min<int64_t>(chunk_size - 1, q.size(1));
  out.narrow(1, 0, head).zero_();
  lse.narrow(2, 0, head).fill_(std::numeric_limits<double>::infinity());
  forward(p, q, k, v, mask, scale, out, lse, chunk_size - 1);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> cca_bwd(const Tensor& grad_out, const Tensor& q_,
                                           const Tensor& k_, const Tensor& v_,
                                           const std::optional<Tensor>& mask_, const Tensor& out,
                                           const Tensor& lse, int64_t chunk_size, double scale) {
  const Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const auto mask = contiguous(mask_);
  const Problem p = cca_problem(q, k, chunk_size);
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  dq.narrow(1, 0, std::min<int64_t>(chunk_size - 1, q.size(1))).zero_();
  if (k.size(1) > p.groups) {  // chunks beyond seq_len // chunk_size are unused
    dk.narrow(1, p.groups, k.size(1) - p.groups).zero_();
    dv.narrow(1, p.groups, k.size(1) - p.groups).zero_();
  }
  backward(p, grad_out.contiguous(), q, k, v, mask, out.contiguous(), lse.contiguous(), scale, dq,
           dk, dv, chunk_size - 1);
  return {dq, dk, dv};
}

// ---- neighbour self-attention ---------------------------------------------------------------

Problem self_problem(const Tensor& q) {
  TORCH_CHECK(q.dim() == 6, "neighbour_self_attn: q must be 6-D");
  const int64_t B = q.size(0), L = q.size(1), K = q.size(2), R = q.size(3), H = q.size(4),
                D = q.size(5);
  return Problem{B, L * K, R, L * K * R, R, H, D, L * K * R * H * D, L * K * R * H * D,
                 R * H * D, L * K * R, R, L * K * R};
}

std::tuple<Tensor, Tensor> self_fwd(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                    const std::optional<Tensor>& mask_, double scale) {
  const Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const auto mask = contiguous(mask_);
  const Problem p = self_problem(q);
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({p.batch, p.heads, p.lse_rows}, q.options().dtype(lse_dtype(q)));
  forward(p, q, k, v, mask, scale, out, lse, 0);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> self_bwd(const Tensor& grad_out, const Tensor& q_,
                                            const Tensor& k_, const Tensor& v_,
                                            const std::optional<Tensor>& mask_, const Tensor& out,
                                            const Tensor& lse, double scale) {
  const Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const Problem p = self_problem(q);
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  backward(p, grad_out.contiguous(), q, k, v, contiguous(mask_), out.contiguous(),
           lse.contiguous(), scale, dq, dk, dv, 0);
  return {dq, dk, dv};
}

// ---- neighbour cross-attention --------------------------------------------------------------

Problem cross_problem(const Tensor& q, const Tensor& k) {
  TORCH_CHECK(q.dim() == 6 && k.dim() == 5, "neighbour_cross_attn: q must be 6-D and k 5-D");
  const int64_t B = q.size(0), L = q.size(1), K = q.size(2), R = q.size(3), H = q.size(4),
                D = q.size(5), C = k.size(2);
  return Problem{B, L, K * R, L * K * R, C, H, D, L * K * R * H * D, L * C * H * D, C * H * D,
                 L * C, C, L * K * R};
}

std::tuple<Tensor, Tensor> cross_fwd(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                     const std::optional<Tensor>& mask_, double scale) {
  const Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const Problem p = cross_problem(q, k);
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({p.batch, p.heads, p.lse_rows}, q.options().dtype(lse_dtype(q)));
  forward(p, q, k, v, contiguous(mask_), scale, out, lse, 0);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> cross_bwd(const Tensor& grad_out, const Tensor& q_,
                                             const Tensor& k_, const Tensor& v_,
                                             const std::optional<Tensor>& mask_, const Tensor& out,
                                             const Tensor& lse, double scale) {
  const Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const Problem p = cross_problem(q, k);
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  backward(p, grad_out.contiguous(), q, k, v, contiguous(mask_), out.contiguous(),
           lse.contiguous(), scale, dq, dk, dv, 0);
  return {dq, dk, dv};
}

// ---- decoding --------------------------------------------------------------------------------

Tensor cca_decode(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                  const std::optional<Tensor>& mask_, double scale) {
  const Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  TORCH_CHECK(q.dim() == 3 && k.dim() == 5, "cca_decode: q must be 3-D and k 5-D");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = k.size(1), R = k.size(2);
  // One group per sequence holding its single query row.
  const Problem p{B, 1, 1, 1, K * R, H, D, H * D, K * R * H * D, 0, K * R, 0, 1};
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({B, H, 1}, q.options().dtype(lse_dtype(q)));
  forward(p, q, k, v, contiguous(mask_), scale, out, lse, 0);
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
