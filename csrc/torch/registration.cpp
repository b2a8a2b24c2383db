// The op schemas of retro_kernels (one TORCH_LIBRARY for the whole package) and the pybind11
// module `retro_kernels._C` that loads them. Kernels register per device in cpu_ops.cpp and
// csrc/torch_cuda/; fake (meta) implementations and autograd live in Python beside the ops'
// description (retro_kernels/ops/block_attention/native_ops.py), as in pytorch/extension-cpp.
#include <torch/extension.h>
#include <torch/library.h>

#include "../cpu/block_attention.h"

TORCH_LIBRARY(retro_kernels, m) {
  // Fake (meta) implementations and autograd are registered when the package is imported, by
  // this module: torch.library.register_fake checks that it is the one named here, and a fake
  // tensor reaching an op before it is imported gets an error that says to import it.
  // (set_python_module replaces the deprecated impl_abstract_pystub.)
  m.set_python_module("retro_kernels.ops.block_attention.native_ops");
  // Block-local attention (retro_kernels/ops/block_attention/layouts.py): row prefix_rows + g * q_rows + i of
  // q (B, rows, H, D) attends to the keys of group g of k/v (B, key_groups, keys, H, D) under
  // one softmax, masked by key_mask (B, key_groups, keys) bool (True = real key); rows before
  // prefix_rows attend to nothing (out 0, lse +inf). groups <= key_groups groups have rows.
  // Returns out like q and lse (B, H, rows); the backward returns dq, dk, dv.
  m.def("block_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_mask, int q_rows, "
        "int groups, int prefix_rows, float softmax_scale) -> (Tensor, Tensor)");
  m.def("block_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? key_mask, "
        "Tensor out, Tensor lse, int q_rows, int groups, int prefix_rows, float softmax_scale) "
        "-> (Tensor, Tensor, Tensor)");
  // One query row per key group (incremental decoding): q (B, G, H, D); k/v (B, G, keys, H, D);
  // key_mask (B, G, keys). block_attention_fwd's out for q_rows = 1, groups = G, prefix_rows = 0.
  m.def("block_attention_decode(Tensor q, Tensor k, Tensor v, Tensor? key_mask, "
        "float softmax_scale) -> Tensor");
}

namespace retro_kernels {
// setup.py defines RETRO_KERNELS_WITH_CUDA when it compiles csrc/cuda and csrc/torch_cuda in.
bool cuda_kernels_compiled() {
#ifdef RETRO_KERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace retro_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "retro_kernels compiled ops (registered under torch.ops.retro_kernels)";
  m.def("cuda_kernels_compiled", &retro_kernels::cuda_kernels_compiled,
        "Whether this build contains the CUDA kernels.");
  m.def("cpu_isa", [] { return std::string(retro_kernels::cpu::cpu_isa_name(retro_kernels::cpu::cpu_isa())); },
        "Instruction set the C++ CPU kernels run with: 'avx512', 'avx2' or 'default' (baseline: "
        "SSE2 / NEON). RETRO_KERNELS_CPU_ISA lowers it.");
}
