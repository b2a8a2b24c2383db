"""Helpers shared by the tests: the error-ratio rule, random problems, the SPEC loop."""
from __future__ import annotations

from dataclasses import dataclass

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def max_err(x: torch.Tensor, ref64: torch.Tensor) -> float:
    return (x.double() - ref64).abs().max().item() if x.numel() else 0.0


def assert_error_ratio(name: str, out: torch.Tensor, same_dtype_ref: torch.Tensor, ref64: torch.Tensor,
                       factor: float = 2.0) -> None:
    """The kernel's error against the float64 reference must be at most `factor` times the error
    of the same computation done by PyTorch in the kernel's dtype (flash-attention's rule), plus
    a floor of a few ulps of the result's scale for when PyTorch's own error is ~0."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = max_err(out, ref64)
    ref_err = max_err(same_dtype_ref, ref64)
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    floor = 32 * torch.finfo(out.dtype).eps * scale
    assert err <= factor * ref_err + floor, (
        f"{name}: error {err:.3e} > {factor} x PyTorch {out.dtype} error {ref_err:.3e} + {floor:.1e}")


@dataclass(frozen=True)
class CCACase:
    """One chunked cross-attention problem: q (B, N, H, D); k/v (B, L, K, R, H, D)."""
    batch: int
    seq_len: int
    heads: int
    head_dim: int
    chunks: int
    neighbours: int
    neighbour_len: int
    chunk_size: int

    def __str__(self) -> str:
        return (f"B{self.batch}-N{self.seq_len}-H{self.heads}-D{self.head_dim}-L{self.chunks}"
                f"-K{self.neighbours}-R{self.neighbour_len}-m{self.chunk_size}")


def random_cca(case: CCACase, dtype=torch.float64, device="cpu", mask: str | None = "random"):
    """Random q, k, v (float64 master copies in `dtype`) and a mask: None, "random" (about a third
    of the tokens masked, plus one fully masked chunk when there are two or more) or "none_real"."""
    B, N, H, D = case.batch, case.seq_len, case.heads, case.head_dim
    L, K, R = case.chunks, case.neighbours, case.neighbour_len
    q = torch.randn(B, N, H, D, dtype=torch.float64)
    k = torch.randn(B, L, K, R, H, D, dtype=torch.float64)
    v = torch.randn(B, L, K, R, H, D, dtype=torch.float64)
    neighbour_mask = None
    if mask == "random":
        neighbour_mask = torch.rand(B, L, K, R) > 0.33
        if L >= 2:
            neighbour_mask[0, 1] = False
    elif mask == "none_real":
        neighbour_mask = torch.zeros(B, L, K, R, dtype=torch.bool)
    to = dict(dtype=dtype, device=device)
    m = None if neighbour_mask is None else neighbour_mask.to(device)
    return q.to(**to), k.to(**to), v.to(**to), m


def cca_spec_loop(q, k, v, chunk_size, neighbour_mask=None, softmax_scale=None):
    """Chunked cross-attention one position at a time, straight from ../shared/SPEC.md:
    position t attends to all neighbour tokens of chunk u(t) = floor((t+1)/m) - 1 under one
    softmax; u(t) < 0 or no real neighbour token gives 0."""
    B, N, H, D = q.shape
    K, R = k.shape[2], k.shape[3]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros_like(q)
    for b in range(B):
        for t in range(N):
            u = (t + 1) // chunk_size - 1
            if u < 0:
                continue
            for h in range(H):
                keys = k[b, u, :, :, h].reshape(K * R, D)
                values = v[b, u, :, :, h].reshape(K * R, D)
                real = torch.ones(K * R, dtype=torch.bool) if neighbour_mask is None \
                    else neighbour_mask[b, u].reshape(K * R)
                if not real.any():
                    continue
                p = torch.softmax(keys[real] @ q[b, t, h] * scale, dim=0)
                out[b, t, h] = p @ values[real]
    return out


def with_grads(fn, inputs, grad_out):
    """Runs fn(*inputs) on fresh leaf copies and returns [out, *input grads] (detached)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
    return [out.detach()] + grads


def check_backend(make, inputs, grad, dtype, backend: str, device="cpu", label: str = ""):
    """make(backend) -> fn(*inputs). Runs `backend` in `dtype` on `device` and checks the output and
    every input gradient against the float64 reference with the error-ratio rule (the same-dtype
    reference being PyTorch's own error). Returns the backend's [out, *grads]."""
    ref64 = with_grads(make("reference"), inputs, grad)
    low = [x.to(dtype) for x in inputs]
    ref = with_grads(make("reference"), low, grad.to(dtype))
    got = with_grads(make(backend), [x.to(device) for x in low], grad.to(dtype).to(device))
    names = ("out",) + tuple(f"d{i}" for i in range(len(inputs)))
    for name, g, r, r64 in zip(names, got, ref, ref64):
        assert_error_ratio(f"{label} {backend} {dtype} {name}", g.to(r.device), r, r64)
    return got


def random_decode_step(B=3, H=2, D=32, K=2, R=7, device="cpu", mask=True):
    """q (B, H, D), k/v (B, K, R, H, D) float64 and a mask (sequence 0 has no real token)."""
    f = dict(dtype=torch.float64, device=device)
    q, k, v = torch.randn(B, H, D, **f), torch.randn(B, K, R, H, D, **f), torch.randn(B, K, R, H, D, **f)
    m = None
    if mask:
        m = torch.rand(B, K, R, device=device) > 0.3
        m[0] = False
    return q, k, v, m


def check_decode(q, k, v, mask, dtype, backend: str, label: str = ""):
    """chunked_cross_attention_decode on `backend` in `dtype` against the float64 reference
    (error-ratio rule); sequences without a real neighbour token must give exactly 0."""
    from retro_kernels import chunked_cross_attention_decode as decode

    ref64 = decode(q, k, v, mask, backend="reference")
    low = [x.to(dtype) for x in (q, k, v)]
    got = decode(*low, mask, backend=backend)
    assert_error_ratio(f"decode {label} {backend} {dtype}", got, decode(*low, mask, backend="reference"), ref64)
    if mask is not None:
        assert (got[~mask.flatten(1).any(1)] == 0).all()
    return got
