// Argument checks of the compiled ops (CPU and CUDA glue): every tensor argument is checked
// against the others -- number of dimensions, every size, dtype, device and the contiguous layout
// the kernels assume -- and every integer argument against its range, before any kernel touches
// memory. The kernels take raw pointers and compute every offset from the sizes of the first
// argument, so one inconsistent argument would otherwise make them read or write past its end.
//
// Failures raise through TORCH_CHECK_VALUE / TORCH_CHECK_TYPE (Python ValueError / TypeError),
// with messages of the form
//   "<op>: <argument> has shape [..], expected [..] <layout> (<where the sizes come from>)".
// retro_kernels/ops/grouped_attention/arg_checks.py holds the same checks for the Triton ops and
// the fake implementations, with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/strides.h>

#include <cmath>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>

namespace retro_kernels::checks {

inline std::string str(c10::IntArrayRef xs) {
  std::ostringstream s;
  s << '[';
  for (size_t i = 0; i < xs.size(); ++i) s << (i ? ", " : "") << xs[i];
  s << ']';
  return s.str();
}

// A dtype as Python spells it (torch.float32), so that the messages match the Python checks.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kBool: return "torch.bool";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// The accumulation dtype of the kernels, which is lse's dtype.
inline at::ScalarType lse_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The checks of one op call. The first tensor argument (q) fixes the device and the dtype of
// every floating-point argument; the op derives the expected shapes from the sizes it reads.
class ArgChecker {
 public:
  ArgChecker(const char* op, const at::Tensor& q, const char* q_layout, int64_t q_ndim,
             c10::DeviceType device_type, std::initializer_list<at::ScalarType> dtypes)
      : op_(op), device_(q.defined() ? q.device() : at::Device(device_type)),
        dtype_(q.defined() ? q.scalar_type() : at::kFloat) {
    ndim("q", q, q_ndim, q_layout);
    TORCH_CHECK_VALUE(q.device().type() == device_type, op_, ": q is on ", q.device(),
                      ", expected a ", c10::DeviceTypeName(device_type, true), " tensor");
    bool ok = false;
    std::ostringstream names;
    for (const auto t : dtypes) {
      ok = ok || t == dtype_;
      names << (names.tellp() > 0 ? ", " : "") << dtype_name(t);
    }
    TORCH_CHECK_TYPE(ok, op_, ": q has dtype ", dtype_name(dtype_), ", expected one of ", names.str());
    tensor("q", q, q.sizes(), q_layout, "");
  }

  const char* op() const { return op_; }
  at::ScalarType dtype() const { return dtype_; }

  // t is a defined tensor with `n` dimensions (checked before any of its sizes is read).
  void ndim(const char* name, const at::Tensor& t, int64_t n, const char* layout) const {
    TORCH_CHECK_VALUE(t.defined(), op_, ": ", name, " is an undefined tensor, expected ", layout);
    TORCH_CHECK_VALUE(t.dim() == n, op_, ": ", name, " has ", t.dim(), " dimensions (shape ",
                      str(t.sizes()), "), expected ", n, ": ", layout);
  }

  // t lives on q's device, has `dtype` (q's when not given), exactly `shape` and the contiguous
  // strides the kernels assume. `origin` says where the expected sizes come from.
  void tensor(const char* name, const at::Tensor& t, c10::IntArrayRef shape, const char* layout,
              const std::string& origin, std::optional<at::ScalarType> dtype = std::nullopt,
              const char* dtype_origin = "q's dtype") const {
    ndim(name, t, static_cast<int64_t>(shape.size()), layout);
    TORCH_CHECK_VALUE(t.device() == device_, op_, ": ", name, " is on ", t.device(), ", expected ",
                      device_, " (q's device)");
    const at::ScalarType want = dtype.value_or(dtype_);
    TORCH_CHECK_TYPE(t.scalar_type() == want, op_, ": ", name, " has dtype ",
                     dtype_name(t.scalar_type()), ", expected ", dtype_name(want), " (", dtype_origin,
                     ")");
    TORCH_CHECK_VALUE(t.sizes() == shape, op_, ": ", name, " has shape ", str(t.sizes()),
                      ", expected ", str(shape), " ", layout, origin.empty() ? "" : " (",
                      origin, origin.empty() ? "" : ")");
    TORCH_CHECK_VALUE(t.is_contiguous(), op_, ": ", name, " has strides ", str(t.strides()),
                      ", expected the contiguous strides ", str(c10::contiguous_strides(t.sizes())),
                      " of shape ", str(t.sizes()), " (call .contiguous())");
  }

  // An optional bool mask of exactly `shape`.
  void mask(const char* name, const std::optional<at::Tensor>& m, c10::IntArrayRef shape,
            const char* layout, const std::string& origin) const {
    if (m.has_value()) tensor(name, *m, shape, layout, origin, at::kBool, "True = real token");
  }

  void at_least(const char* name, int64_t value, int64_t minimum) const {
    TORCH_CHECK_VALUE(value >= minimum, op_, ": ", name, " is ", value, ", expected >= ", minimum);
  }

  void at_most(const char* name, int64_t value, int64_t maximum, const char* why) const {
    TORCH_CHECK_VALUE(value <= maximum, op_, ": ", name, " is ", value, ", expected <= ", maximum,
                      " (", why, ")");
  }

  void finite(const char* name, double value) const {
    TORCH_CHECK_VALUE(std::isfinite(value), op_, ": ", name, " is ", value, ", expected a finite number");
  }

 private:
  const char* op_;
  at::Device device_;
  at::ScalarType dtype_;
};

// ---- the layouts of the ops' arguments -------------------------------------------------------

inline constexpr const char* kCcaQ = "(batch, seq_len, heads, head_dim)";
inline constexpr const char* kNeighbours = "(batch, num_chunks, num_neighbours, neighbour_len, heads, head_dim)";
inline constexpr const char* kNeighbourMask = "(batch, num_chunks, num_neighbours, neighbour_len)";
inline constexpr const char* kChunkKV = "(batch, num_chunks, chunk_len, heads, head_dim)";
inline constexpr const char* kChunkMask = "(batch, num_chunks, chunk_len)";
inline constexpr const char* kDecodeQ = "(batch, heads, head_dim)";
inline constexpr const char* kDecodeKV = "(batch, num_neighbours, neighbour_len, heads, head_dim)";
inline constexpr const char* kDecodeMask = "(batch, num_neighbours, neighbour_len)";
inline constexpr const char* kLse = "(batch, heads, rows)";

inline std::string from(const char* what, const at::Tensor& t, const char* name = "q") {
  return std::string(what) + " from " + name + " of shape " + str(t.sizes());
}

// The backward's extra arguments: grad_out and out like q, lse (batch, heads, lse_rows) in the
// accumulation dtype.
inline void check_backward_extras(const ArgChecker& c, const at::Tensor& q, const char* q_layout,
                                  const at::Tensor& grad_out, const at::Tensor& out,
                                  const at::Tensor& lse, int64_t lse_rows) {
  c.tensor("grad_out", grad_out, q.sizes(), q_layout, from("the shape", q));
  c.tensor("out", out, q.sizes(), q_layout, from("the shape", q));
  c.tensor("lse", lse, {q.size(0), q.size(-2), lse_rows}, kLse,
           from("batch, heads and rows", q), lse_dtype(c.dtype()),
           "the accumulation dtype of q's dtype");
}

// One decoding step of chunked cross-attention (the CPU and the CUDA glue share it):
// q (B, H, D); k, v (B, K, R, H, D); mask (B, K, R).
inline void check_cca_decode(const ArgChecker& c, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const std::optional<at::Tensor>& mask,
                             double scale) {
  c.ndim("k", k, 5, kDecodeKV);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = k.size(1), R = k.size(2);
  c.tensor("k", k, {B, K, R, H, D}, kDecodeKV, from("batch, heads and head_dim", q));
  c.tensor("v", v, k.sizes(), kDecodeKV, from("the shape", k, "k"));
  c.mask("neighbour_mask", mask, {B, K, R}, kDecodeMask, from("the first three sizes", k, "k"));
  c.finite("softmax_scale", scale);
}

}  // namespace retro_kernels::checks
