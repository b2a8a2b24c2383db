// Fused block-local attention on the CPU (see block_attention.h for the problem it solves).
//
// One task per (batch, group, head), spread over threads with at::parallel_for (OpenMP in
// PyTorch's builds). A task walks its query rows in blocks of kBlockM and its keys in blocks of
// kBlockN; only a kBlockM x kBlockN score tile ever exists. Inputs are read in place through
// their strides (no shifted or padded copies): key and value tiles are matrix operands as they
// lie in memory for float32/float64, and converted tile by tile to the accumulation type A
// (float) for bfloat16/float16; query tiles are copied once per block, scaled and transposed.
//
// Forward, per query row i, online softmax over key tiles (s = scale * q.k, masked keys skipped):
//   m_new = max(m, max_j s_ij);  alpha = exp(m - m_new);  p_ij = exp(s_ij - m_new)
//   l = alpha * l + sum_j p_ij;  o = alpha * o + sum_j p_ij v_j;  m = m_new
//   out_i = o / l  (0 if the group has no real key),  lse_i = m + log l  (+inf then)
//
// Backward, recomputing p_ij = exp(s_ij - lse_i):
//   dv_j += sum_i p_ij do_i          dp_ij = do_i . v_j        D_i = do_i . out_i
//   ds_ij = p_ij (dp_ij - D_i)       dq_i = scale sum_j ds_ij k_j     dk_j = scale sum_i ds_ij q_i
// Every query row and key belongs to exactly one group, so tasks never share an output: the
// backward is deterministic and needs no atomics.
//
// Instruction sets: the task loops are templates over an ISA description from tile_math.h
// (vector width and register blocking of the matrix products). RK_DEFINE_ENTRIES instantiates
// them per dtype in one entry function per ISA, each compiled for its ISA with a target
// attribute: AVX-512 (x86-64-v4, 64-byte vectors), AVX2 + FMA (x86-64-v3, 32-byte vectors) and
// the baseline target (16-byte vectors: SSE2, NEON). cpu_isa() picks one once per process from
// __builtin_cpu_supports (RETRO_KERNELS_CPU_ISA can lower it, e.g. to test the baseline path),
// and every call goes to that ISA's entry (RK_CALL_ISA).
#include "block_attention.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "tile_math.h"

namespace retro_kernels::cpu {
namespace {

constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 128;

template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Where the tiles of one (batch, group, head) task live.
template <typename T>
struct TaskView {
  int64_t rows;  // valid query rows of this group
  int64_t row_stride, key_stride;
  int64_t q_offset, k_offset, lse_offset;
  const bool* mask;  // nullptr = every key real
  int64_t mask_stride;
};

template <typename T>
RK_INLINE TaskView<T> task_view(const BlockAttentionLayout& L, const bool* key_mask, int64_t task) {
  const int64_t h = task % L.heads;
  const int64_t g = (task / L.heads) % L.groups;
  const int64_t b = task / (L.heads * L.groups);
  TaskView<T> t;
  t.rows = std::min(L.q_rows, L.q_valid_rows - g * L.q_rows);
  t.row_stride = L.q_sr;
  t.key_stride = L.k_sr;
  t.q_offset = b * L.q_sb + g * L.q_rows * L.q_sr + h * L.q_sh;
  t.k_offset = b * L.k_sb + g * L.k_sg + h * L.k_sh;
  t.lse_offset = b * L.lse_sb + h * L.lse_sh + g * L.q_rows;
  t.mask = key_mask ? key_mask + b * L.m_sb + g * L.m_sg : nullptr;
  t.mask_stride = L.m_sr;
  return t;
}

// Loads rows [0, n) of a (rows, head_dim) tile at src (row stride `stride`) into dst, times `mul`.
template <typename T, typename A>
RK_INLINE void load_rows(const T* src, int64_t n, int64_t d, int64_t stride, A mul, A* dst) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < d; ++c) dst[r * d + c] = static_cast<A>(src[r * stride + c]) * mul;
}

// Loads the same tile transposed, times `mul`: dst is (d, n) with leading dimension n.
template <typename T, typename A>
RK_INLINE void load_rows_transposed(const T* src, int64_t n, int64_t d, int64_t stride, A mul, A* dst) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < d; ++c) dst[c * n + r] = static_cast<A>(src[r * stride + c]) * mul;
}

template <typename T, typename A>
RK_INLINE void store_rows(const A* src, int64_t n, int64_t d, int64_t stride, A mul, T* dst) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < d; ++c) dst[r * stride + c] = static_cast<T>(src[r * d + c] * mul);
}

// A key tile as a matrix operand: read in place when T is the accumulation type, otherwise
// converted into buf. Returns the rows; *ld receives their leading dimension.
template <typename T, typename A>
RK_INLINE const A* key_tile(const T* src, int64_t n, int64_t d, int64_t stride, A* buf, int64_t* ld) {
  if constexpr (std::is_same_v<T, A>) {
    *ld = stride;
    return src;
  } else {
    load_rows(src, n, d, stride, A(1), buf);
    *ld = d;
    return buf;
  }
}

// keep[j] = 1 for real keys of the tile starting at key j0, 0 for masked ones; returns the count.
template <typename A>
RK_INLINE int64_t key_tile_keep(const bool* mask, int64_t stride, int64_t j0, int64_t n, A* keep) {
  int64_t real = 0;
  for (int64_t j = 0; j < n; ++j) {
    const bool on = mask == nullptr || mask[(j0 + j) * stride];
    keep[j] = on ? A(1) : A(0);
    real += on;
  }
  return real;
}

// Scores are kept transposed, st[j * bm + i] = s_ij (keys x rows): the key tile is then the left
// operand read in place, and the softmax statistics of the rows vectorise across i.
template <typename T>
struct ForwardScratch {
  using A = acc_type_t<T>;
  std::vector<A> qt, k, v, st, o, keep, m, l, mx, alpha;
  explicit ForwardScratch(int64_t d)
      : qt(d * kBlockM), k(kBlockN * d), v(kBlockN * d), st(kBlockN * kBlockM), o(kBlockM * d),
        keep(kBlockN), m(kBlockM), l(kBlockM), mx(kBlockM), alpha(kBlockM) {}
};

template <typename Isa, typename T>
RK_INLINE void forward_task(const BlockAttentionLayout& L, const TaskView<T>& t, const T* q,
                            const T* k, const T* v, acc_type_t<T> scale, T* out,
                            acc_type_t<T>* lse, ForwardScratch<T>& w) {
  using A = acc_type_t<T>;
  const int64_t d = L.head_dim;
  const A inf = std::numeric_limits<A>::infinity();
  A *m = w.m.data(), *l = w.l.data(), *mx = w.mx.data(), *alpha = w.alpha.data(), *o = w.o.data();
  for (int64_t i0 = 0; i0 < t.rows; i0 += kBlockM) {
    const int64_t bm = std::min(kBlockM, t.rows - i0);
    load_rows_transposed(q + t.q_offset + i0 * t.row_stride, bm, d, t.row_stride, scale, w.qt.data());
    std::fill(o, o + bm * d, A(0));
    std::fill(m, m + bm, -inf);
    std::fill(l, l + bm, A(0));
    for (int64_t j0 = 0; j0 < L.keys; j0 += kBlockN) {
      const int64_t bn = std::min(kBlockN, L.keys - j0);
      if (key_tile_keep(t.mask, t.mask_stride, j0, bn, w.keep.data()) == 0) continue;
      const int64_t kv_offset = t.k_offset + j0 * t.key_stride;
      int64_t ldk, ldv;
      const A* kt = key_tile(k + kv_offset, bn, d, t.key_stride, w.k.data(), &ldk);
      A* st = w.st.data();
      gemm<Isa, A, false>(bn, bm, d, kt, ldk, w.qt.data(), bm, st, bm, false);
      std::fill(mx, mx + bm, -inf);
      for (int64_t j = 0; j < bn; ++j) {
        if (w.keep[j] == 0) continue;
        const A* sj = st + j * bm;
#pragma omp simd
        for (int64_t i = 0; i < bm; ++i) mx[i] = std::max(mx[i], sj[i]);
      }
#pragma omp simd
      for (int64_t i = 0; i < bm; ++i) {
        const A m_new = std::max(m[i], mx[i]);
        alpha[i] = m[i] == -inf ? A(0) : exp_vec(m[i] - m_new);
        m[i] = m_new;
        l[i] *= alpha[i];
      }
      for (int64_t j = 0; j < bn; ++j) {
        A* sj = st + j * bm;
        const A keep = w.keep[j];
#pragma omp simd
        for (int64_t i = 0; i < bm; ++i) {
          sj[i] = exp_vec(sj[i] - m[i]) * keep;
          l[i] += sj[i];
        }
      }
      for (int64_t i = 0; i < bm; ++i)
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) o[i * d + c] *= alpha[i];
      const A* vt = key_tile(v + kv_offset, bn, d, t.key_stride, w.v.data(), &ldv);
      gemm<Isa, A, true>(bm, d, bn, st, bm, vt, ldv, o, d, true);
    }
    for (int64_t i = 0; i < bm; ++i) {
      const bool any = l[i] > 0;
      const A inv = any ? A(1) / l[i] : A(0);
      T* oi = out + t.q_offset + (i0 + i) * t.row_stride;
      for (int64_t c = 0; c < d; ++c) oi[c] = static_cast<T>(o[i * d + c] * inv);
      lse[t.lse_offset + i0 + i] = any ? m[i] + std::log(l[i]) : inf;
    }
  }
}

template <typename T>
struct BackwardScratch {
  using A = acc_type_t<T>;
  std::vector<A> q, qt, dout, doutt, k, v, pt, dpt, dq, dk, dv, keep, delta, shift, live;
  BackwardScratch(int64_t d, int64_t keys)
      : q(kBlockM * d), qt(d * kBlockM), dout(kBlockM * d), doutt(d * kBlockM), k(kBlockN * d),
        v(kBlockN * d), pt(kBlockN * kBlockM), dpt(kBlockN * kBlockM), dq(kBlockM * d),
        dk(keys * d), dv(keys * d), keep(kBlockN), delta(kBlockM), shift(kBlockM), live(kBlockM) {}
};

template <typename Isa, typename T>
RK_INLINE void backward_task(const BlockAttentionLayout& L, const TaskView<T>& t,
                             const T* dout, const T* q, const T* k, const T* v, const T* out,
                             const acc_type_t<T>* lse, acc_type_t<T> scale, T* dq, T* dk, T* dv,
                             BackwardScratch<T>& w) {
  using A = acc_type_t<T>;
  const int64_t d = L.head_dim;
  const A inf = std::numeric_limits<A>::infinity();
  std::fill(w.dk.begin(), w.dk.end(), A(0));
  std::fill(w.dv.begin(), w.dv.end(), A(0));
  A *delta = w.delta.data(), *shift = w.shift.data(), *live = w.live.data();
  for (int64_t i0 = 0; i0 < t.rows; i0 += kBlockM) {
    const int64_t bm = std::min(kBlockM, t.rows - i0);
    const int64_t row0 = t.q_offset + i0 * t.row_stride;
    load_rows(q + row0, bm, d, t.row_stride, scale, w.q.data());
    load_rows_transposed(q + row0, bm, d, t.row_stride, scale, w.qt.data());
    load_rows(dout + row0, bm, d, t.row_stride, A(1), w.dout.data());
    load_rows_transposed(dout + row0, bm, d, t.row_stride, A(1), w.doutt.data());
    for (int64_t i = 0; i < bm; ++i) {
      A acc = 0;
      const T* oi = out + row0 + i * t.row_stride;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < d; ++c) acc += w.dout[i * d + c] * static_cast<A>(oi[c]);
      delta[i] = acc;
      // lse = +inf marks a row without real keys: its probabilities are all 0.
      const A r = lse[t.lse_offset + i0 + i];
      live[i] = r < inf ? A(1) : A(0);
      shift[i] = r < inf ? r : A(0);
    }
    std::fill(w.dq.begin(), w.dq.begin() + bm * d, A(0));
    for (int64_t j0 = 0; j0 < L.keys; j0 += kBlockN) {
      const int64_t bn = std::min(kBlockN, L.keys - j0);
      if (key_tile_keep(t.mask, t.mask_stride, j0, bn, w.keep.data()) == 0) continue;
      const int64_t kv_offset = t.k_offset + j0 * t.key_stride;
      int64_t ldk, ldv;
      const A* kt = key_tile(k + kv_offset, bn, d, t.key_stride, w.k.data(), &ldk);
      const A* vt = key_tile(v + kv_offset, bn, d, t.key_stride, w.v.data(), &ldv);
      A *pt = w.pt.data(), *dpt = w.dpt.data();
      gemm<Isa, A, false>(bn, bm, d, kt, ldk, w.qt.data(), bm, pt, bm, false);
      for (int64_t j = 0; j < bn; ++j) {
        const A keep = w.keep[j];
        A* pj = pt + j * bm;
#pragma omp simd
        for (int64_t i = 0; i < bm; ++i) pj[i] = exp_vec(pj[i] - shift[i]) * keep * live[i];
      }
      gemm<Isa, A, false>(bn, d, bm, pt, bm, w.dout.data(), d, w.dv.data() + j0 * d, d, true);
      gemm<Isa, A, false>(bn, bm, d, vt, ldv, w.doutt.data(), bm, dpt, bm, false);
      for (int64_t j = 0; j < bn; ++j)
#pragma omp simd
        for (int64_t i = 0; i < bm; ++i) dpt[j * bm + i] = pt[j * bm + i] * (dpt[j * bm + i] - delta[i]);
      gemm<Isa, A, true>(bm, d, bn, dpt, bm, kt, ldk, w.dq.data(), d, true);
      gemm<Isa, A, false>(bn, d, bm, dpt, bm, w.q.data(), d, w.dk.data() + j0 * d, d, true);
    }
    store_rows(w.dq.data(), bm, d, t.row_stride, scale, dq + row0);
  }
  store_rows(w.dk.data(), L.keys, d, t.key_stride, A(1), dk + t.k_offset);
  store_rows(w.dv.data(), L.keys, d, t.key_stride, A(1), dv + t.k_offset);
}

// The task loops, instantiated for one instruction set by the entries below.
template <typename Isa, typename T>
RK_INLINE void forward_all(const BlockAttentionLayout& L, const T* q, const T* k, const T* v,
                           const bool* mask, double scale, T* out, acc_type_t<T>* lse,
                           int64_t begin, int64_t end) {
  ForwardScratch<T> w(L.head_dim);
  for (int64_t task = begin; task < end; ++task) {
    const auto t = task_view<T>(L, mask, task);
    if (t.rows > 0) forward_task<Isa, T>(L, t, q, k, v, static_cast<acc_type_t<T>>(scale), out, lse, w);
  }
}

template <typename Isa, typename T>
RK_INLINE void backward_all(const BlockAttentionLayout& L, const T* dout, const T* q,
                            const T* k, const T* v, const bool* mask, const T* out,
                            const acc_type_t<T>* lse, double scale, T* dq, T* dk, T* dv,
                            int64_t begin, int64_t end) {
  BackwardScratch<T> w(L.head_dim, L.keys);
  for (int64_t task = begin; task < end; ++task) {
    const auto t = task_view<T>(L, mask, task);
    backward_task<Isa, T>(L, t, dout, q, k, v, out, lse, static_cast<acc_type_t<T>>(scale), dq, dk, dv, w);
  }
}

// One entry per (instruction set, dtype), compiled for that instruction set (TARGET; empty for
// the baseline target): the force-inlined kernel and tile_math.h code inside it are generated
// for that ISA, with its vector width and register blocking (ISA).
#define RK_DEFINE_ENTRIES(TARGET, ISA, SUFFIX, T, NAME)                                         \
  TARGET void forward_##NAME##_##SUFFIX(const BlockAttentionLayout& L, const T* q, const T* k, \
                                        const T* v, const bool* mask, double scale, T* out,     \
                                        acc_type_t<T>* lse, int64_t begin, int64_t end) {       \
    forward_all<ISA, T>(L, q, k, v, mask, scale, out, lse, begin, end);                         \
  }                                                                                             \
  TARGET void backward_##NAME##_##SUFFIX(const BlockAttentionLayout& L, const T* dout,        \
                                         const T* q, const T* k, const T* v, const bool* mask,  \
                                         const T* out, const acc_type_t<T>* lse, double scale,  \
                                         T* dq, T* dk, T* dv, int64_t begin, int64_t end) {     \
    backward_all<ISA, T>(L, dout, q, k, v, mask, out, lse, scale, dq, dk, dv, begin, end);      \
  }

#if RK_X86_ISAS
#define RK_DEFINE_ALL_ISAS(T, NAME)                          \
  RK_DEFINE_ENTRIES(, IsaDefault, default, T, NAME)          \
  RK_DEFINE_ENTRIES(RK_TARGET_AVX2, IsaAvx2, avx2, T, NAME) \
  RK_DEFINE_ENTRIES(RK_TARGET_AVX512, IsaAvx512, avx512, T, NAME)
#else
#define RK_DEFINE_ALL_ISAS(T, NAME) RK_DEFINE_ENTRIES(, IsaDefault, default, T, NAME)
#endif

RK_DEFINE_ALL_ISAS(float, f32)
RK_DEFINE_ALL_ISAS(double, f64)
RK_DEFINE_ALL_ISAS(c10::BFloat16, bf16)
RK_DEFINE_ALL_ISAS(c10::Half, f16)

// The best instruction set this CPU (and OS) supports, lowered by RETRO_KERNELS_CPU_ISA
// ("default", "avx2", "avx512"; a request above what the CPU supports is ignored).
CpuIsa detect_cpu_isa() {
  CpuIsa best = CpuIsa::kDefault;
#if RK_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4"))
    best = CpuIsa::kAvx512;
  else if (__builtin_cpu_supports("x86-64-v3"))
    best = CpuIsa::kAvx2;
#endif
  const char* env = std::getenv("RETRO_KERNELS_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  CpuIsa asked = best;
  if (want == "default")
    asked = CpuIsa::kDefault;
  else if (want == "avx2")
    asked = CpuIsa::kAvx2;
  else if (want == "avx512")
    asked = CpuIsa::kAvx512;
  else
    TORCH_WARN("RETRO_KERNELS_CPU_ISA=", want, " is not one of default, avx2, avx512; ignored");
  return std::min(asked, best);
}

// Calls NAME's entry for the selected instruction set.
#if RK_X86_ISAS
#define RK_CALL_ISA(FN, NAME, ...)                     \
  switch (cpu_isa()) {                                 \
    case CpuIsa::kAvx512:                              \
      FN##_##NAME##_avx512(__VA_ARGS__);               \
      break;                                           \
    case CpuIsa::kAvx2:                                \
      FN##_##NAME##_avx2(__VA_ARGS__);                 \
      break;                                           \
    default:                                           \
      FN##_##NAME##_default(__VA_ARGS__);              \
  }
#else
#define RK_CALL_ISA(FN, NAME, ...) FN##_##NAME##_default(__VA_ARGS__)
#endif

int64_t num_tasks(const BlockAttentionLayout& L) { return L.batch * L.groups * L.heads; }

}  // namespace

#define RK_CASE(SCALAR, T, NAME, CALL) \
  case c10::ScalarType::SCALAR: {      \
    using scalar_t = T;                \
    CALL(NAME);                        \
    break;                             \
  }

#define RK_DISPATCH_FLOATING(DTYPE, CALL)                              \
  switch (DTYPE) {                                                     \
    RK_CASE(Float, float, f32, CALL)                                   \
    RK_CASE(Double, double, f64, CALL)                                 \
    RK_CASE(BFloat16, c10::BFloat16, bf16, CALL)                       \
    RK_CASE(Half, c10::Half, f16, CALL)                                \
    default:                                                           \
      TORCH_CHECK(false, "block attention: unsupported dtype ", DTYPE); \
  }

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

void block_attention_forward(const BlockAttentionLayout& L, c10::ScalarType dtype,
                               const void* q, const void* k, const void* v, const bool* key_mask,
                               double scale, void* out, void* lse) {
  if (num_tasks(L) == 0) return;
#define RK_FWD(NAME)                                                                            \
  at::parallel_for(0, num_tasks(L), 1, [&](int64_t begin, int64_t end) {                       \
    RK_CALL_ISA(forward, NAME, L, static_cast<const scalar_t*>(q),                              \
                static_cast<const scalar_t*>(k), static_cast<const scalar_t*>(v), key_mask,     \
                scale, static_cast<scalar_t*>(out), static_cast<acc_type_t<scalar_t>*>(lse),    \
                begin, end);                                                                    \
  })
  RK_DISPATCH_FLOATING(dtype, RK_FWD)
#undef RK_FWD
}

void block_attention_backward(const BlockAttentionLayout& L, c10::ScalarType dtype,
                                const void* grad_out, const void* q, const void* k, const void* v,
                                const bool* key_mask, const void* out, const void* lse,
                                double scale, void* grad_q, void* grad_k, void* grad_v) {
  if (num_tasks(L) == 0) return;
#define RK_BWD(NAME)                                                                              \
  at::parallel_for(0, num_tasks(L), 1, [&](int64_t begin, int64_t end) {                         \
    RK_CALL_ISA(backward, NAME, L, static_cast<const scalar_t*>(grad_out),                       \
                static_cast<const scalar_t*>(q), static_cast<const scalar_t*>(k),                \
                static_cast<const scalar_t*>(v), key_mask, static_cast<const scalar_t*>(out),    \
                static_cast<const acc_type_t<scalar_t>*>(lse), scale,                            \
                static_cast<scalar_t*>(grad_q), static_cast<scalar_t*>(grad_k),                  \
                static_cast<scalar_t*>(grad_v), begin, end);                                     \
  })
  RK_DISPATCH_FLOATING(dtype, RK_BWD)
#undef RK_BWD
}

}  // namespace retro_kernels::cpu
