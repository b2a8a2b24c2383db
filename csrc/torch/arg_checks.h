// Argument checks of the compiled ops (CPU and CUDA glue): every tensor argument is checked
// against the others -- number of dimensions, every size, dtype, device and the contiguous layout
// the kernels assume -- and every integer argument against its range, before any kernel touches
// memory. The kernels take raw pointers and compute every offset from the sizes of the first
// argument, so one inconsistent argument would otherwise make them read or write past its end.
//
// Failures raise through TORCH_CHECK_VALUE / TORCH_CHECK_TYPE (Python ValueError / TypeError),
// with messages of the form
//   "<op>: <argument> has shape [..], expected [..] <layout> (<where the sizes come from>)".
// retro_kernels/ops/block_attention/arg_checks.py holds the same checks for the Triton ops and
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

// ---- the block-attention problem ---------------------------------------------------------------
// The one description every op takes (retro_kernels/ops/block_attention/layouts.py maps each
// public op onto it):
//   q          (batch, rows, heads, head_dim); rows = prefix_rows + q_valid
//   k, v       (batch, key_groups, keys, heads, head_dim), key_groups >= groups
//   key_mask   (batch, key_groups, keys) bool, optional
//   q_rows     query rows per group: row prefix_rows + g * q_rows + i attends to key group g
//   groups     key groups that have query rows, ceil(q_valid / q_rows) <= groups <= key_groups
//   prefix_rows  rows before group 0's first row; they attend to nothing

inline constexpr const char* kRowsQ = "(batch, rows, heads, head_dim)";
inline constexpr const char* kGroupsKV = "(batch, key_groups, keys, heads, head_dim)";
inline constexpr const char* kGroupsMask = "(batch, key_groups, keys)";
inline constexpr const char* kLse = "(batch, heads, rows)";

inline std::string from(const char* what, const at::Tensor& t, const char* name = "q") {
  return std::string(what) + " from " + name + " of shape " + str(t.sizes());
}

// The checked sizes of one problem.
struct BlockProblem {
  int64_t batch = 0, rows = 0, heads = 0, head_dim = 0;
  int64_t key_groups = 0, keys = 0;
  int64_t q_rows = 0, groups = 0, prefix_rows = 0;
  int64_t q_valid = 0;  // rows - prefix_rows
};

// k, v and key_mask against q (whose dimensions, dtype and device the checker has checked).
inline void check_keys(const ArgChecker& c, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const std::optional<at::Tensor>& key_mask) {
  c.ndim("k", k, 5, kGroupsKV);
  c.tensor("k", k, {q.size(0), k.size(1), k.size(2), q.size(2), q.size(3)}, kGroupsKV,
           from("batch, heads and head_dim", q));
  c.tensor("v", v, k.sizes(), kGroupsKV, from("the shape", k, "k"));
  c.mask("key_mask", key_mask, k.sizes().slice(0, 3), kGroupsMask,
         from("the first three sizes", k, "k"));
}

// Every argument of block_attention_fwd (and of _bwd, with grad_out, out and lse) against the
// others, before any kernel touches memory.
inline BlockProblem check_block_problem(const ArgChecker& c, const at::Tensor& q,
                                        const at::Tensor& k, const at::Tensor& v,
                                        const std::optional<at::Tensor>& key_mask, int64_t q_rows,
                                        int64_t groups, int64_t prefix_rows, double scale) {
  check_keys(c, q, k, v, key_mask);
  BlockProblem p;
  p.batch = q.size(0);
  p.rows = q.size(1);
  p.heads = q.size(2);
  p.head_dim = q.size(3);
  p.key_groups = k.size(1);
  p.keys = k.size(2);
  c.at_least("q_rows", q_rows, 1);
  c.at_most("groups", groups, p.key_groups, from("key_groups", k, "k").c_str());
  c.at_least("prefix_rows", prefix_rows, 0);
  c.at_most("prefix_rows", prefix_rows, p.rows, from("rows", q).c_str());
  p.q_rows = q_rows;
  p.groups = groups;
  p.prefix_rows = prefix_rows;
  p.q_valid = p.rows - prefix_rows;
  // ceil(q_valid / q_rows), without forming q_valid + q_rows (q_rows may be huge); >= 0, so this
  // also refuses a negative groups.
  const int64_t needed = p.q_valid / q_rows + (p.q_valid % q_rows != 0);
  TORCH_CHECK_VALUE(groups >= needed, c.op(), ": groups is ", groups, ", expected >= ", needed,
                    " = ceil((rows - prefix_rows) / q_rows) = ceil((", p.rows, " - ", prefix_rows,
                    ") / ", q_rows, ") (", from("rows", q), ")");
  c.finite("softmax_scale", scale);
  return p;
}

// The backward's extra arguments: grad_out and out like q, lse (batch, heads, rows) in the
// accumulation dtype.
inline void check_backward_extras(const ArgChecker& c, const at::Tensor& q,
                                  const at::Tensor& grad_out, const at::Tensor& out,
                                  const at::Tensor& lse) {
  c.tensor("grad_out", grad_out, q.sizes(), kRowsQ, from("the shape", q));
  c.tensor("out", out, q.sizes(), kRowsQ, from("the shape", q));
  c.tensor("lse", lse, {q.size(0), q.size(2), q.size(1)}, kLse,
           from("batch, heads and rows", q), lse_dtype(c.dtype()),
           "the accumulation dtype of q's dtype");
}

// block_attention_decode (the CPU and the CUDA glue share it): one query row per key group,
// q (batch, key_groups, heads, head_dim); k, v (batch, key_groups, keys, heads, head_dim);
// key_mask (batch, key_groups, keys).
inline constexpr const char* kDecodeQ = "(batch, key_groups, heads, head_dim)";

inline void check_decode(const ArgChecker& c, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const std::optional<at::Tensor>& key_mask,
                         double scale) {
  c.ndim("k", k, 5, kGroupsKV);
  c.tensor("k", k, {q.size(0), q.size(1), k.size(2), q.size(2), q.size(3)}, kGroupsKV,
           from("batch, key_groups, heads and head_dim", q));
  c.tensor("v", v, k.sizes(), kGroupsKV, from("the shape", k, "k"));
  c.mask("key_mask", key_mask, k.sizes().slice(0, 3), kGroupsMask,
         from("the first three sizes", k, "k"));
  c.finite("softmax_scale", scale);
}

}  // namespace retro_kernels::checks
