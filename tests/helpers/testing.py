"""Helpers shared by the tests: the error-ratio rule, random problems, the per-position loop that
defines chunked cross-attention."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def triton_device() -> str:
    """Where tests run the Triton kernels: the GPU when there is one (a CPU tensor there is refused),
    else the CPU under the interpreter (TRITON_INTERPRET=1, set by conftest.py)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def max_err(x: torch.Tensor, ref64: torch.Tensor) -> float:
    return (x.double() - ref64).abs().max().item() if x.numel() else 0.0


def rounding_error(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """The error of the exact result itself stored in `dtype`: max |round(ref64) - ref64|. No
    kernel that returns `dtype` can do better. float64 (the reference's own dtype, so the PyTorch
    error is 0 by construction): 32 ulps of the largest |ref64| instead."""
    if not ref64.numel():
        return 0.0
    if dtype == torch.float64:
        return 32 * torch.finfo(torch.float64).eps * max(1.0, ref64.abs().max().item())
    return max_err(ref64.to(dtype), ref64)


def _worst(name: str, x: torch.Tensor, same_dtype_ref: torch.Tensor, ref64: torch.Tensor, n: int = 3) -> str:
    """The n worst elements of x against ref64: index, kernel value, same-dtype PyTorch value, exact value."""
    diff = (x.double() - ref64).abs().flatten()
    lines = []
    for i in diff.topk(min(n, diff.numel())).indices.tolist():
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), ref64.shape))
        lines.append(f"  {name}{list(idx)}: kernel {x.flatten()[i].item():.6g}, PyTorch "
                     f"{same_dtype_ref.flatten()[i].item():.6g}, exact {ref64.flatten()[i].item():.6g} "
                     f"(error {diff[i].item():.3e})")
    return "\n".join(lines)


# How many times PyTorch's own error in the kernel's dtype a kernel may make. bfloat16/float16:
# flash-attention's 2 (the kernels accumulate in float32 where PyTorch rounds every intermediate to
# the low dtype). float32: the kernels accumulate in float32 like PyTorch, so the ratio measures
# summation order, and the references' reductions (einsum, pairwise sums) happen to be the most
# accurate float32 formulation: on the same inputs PyTorch's own float32 SDPA and matmul attention
# are 2-6x less accurate than the decode reference, and the fused kernels sit within 3.7x of it.
FACTOR = {torch.bfloat16: 2.0, torch.float16: 2.0, torch.float32: 4.0, torch.float64: 2.0}


def assert_error_ratio(name: str, out: torch.Tensor, same_dtype_ref: torch.Tensor, ref64: torch.Tensor,
                       factor: float | None = None) -> None:
    """The kernel's error against the float64 reference must be at most `factor` (FACTOR[dtype])
    times the error of the same computation done by PyTorch in the kernel's dtype
    (flash-attention's rule), plus the error of rounding the exact result to the kernel's dtype
    (which no kernel can avoid):

        max |out - ref64| <= factor * max |same_dtype_ref - ref64| + max |round(ref64) - ref64|

    On failure the message lists the worst elements."""
    factor = FACTOR[out.dtype] if factor is None else factor
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = max_err(out, ref64)
    ref_err = max_err(same_dtype_ref, ref64)
    floor = rounding_error(ref64, out.dtype)
    assert err <= factor * ref_err + floor, (
        f"{name}: error {err:.3e} > {factor} x PyTorch {out.dtype} error {ref_err:.3e} + rounding error of "
        f"the exact result {floor:.3e}; worst elements:\n{_worst(name, out.cpu(), same_dtype_ref.cpu(), ref64.cpu())}")


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
    """Chunked cross-attention one position at a time, from its definition: position t (0-based)
    attends, under one softmax, to all k*r neighbour tokens of chunk u(t) = floor((t+1)/m) - 1, the
    last chunk completed at or before t; u(t) < 0 (positions 0 .. m-2) or a chunk without any real
    neighbour token gives 0."""
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


def _attend(q_row, keys, values, real, scale):
    """softmax(scale * keys . q_row) values over the real keys; 0 when none is real."""
    if not real.any():
        return torch.zeros_like(q_row)
    return torch.softmax(keys[real] @ q_row * scale, dim=0) @ values[real]


def self_spec_loop(q, k, v, neighbour_mask=None, softmax_scale=None):
    """Neighbour self-attention one token at a time: token i of neighbour n of chunk l attends,
    bidirectionally, to the real tokens of the same neighbour (padding queries still attend);
    a neighbour without a real token gives 0. q, k, v (B, L, K, R, H, D)."""
    B, L, K, R, H, D = q.shape
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros_like(q)
    for b, l, n, i, h in itertools.product(range(B), range(L), range(K), range(R), range(H)):
        real = torch.ones(R, dtype=torch.bool) if neighbour_mask is None else neighbour_mask[b, l, n]
        out[b, l, n, i, h] = _attend(q[b, l, n, i, h], k[b, l, n, :, h], v[b, l, n, :, h], real, scale)
    return out


def cross_spec_loop(q, k, v, chunk_mask=None, softmax_scale=None):
    """Neighbour cross-attention one token at a time: every token of every neighbour of chunk l
    attends to the real decoder states of chunk l (the same keys for all its neighbours); no real
    state gives 0. q (B, L, K, R, H, D); k, v (B, L, C, H, D)."""
    B, L, K, R, H, D = q.shape
    C = k.shape[2]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros_like(q)
    for b, l, n, i, h in itertools.product(range(B), range(L), range(K), range(R), range(H)):
        real = torch.ones(C, dtype=torch.bool) if chunk_mask is None else chunk_mask[b, l]
        out[b, l, n, i, h] = _attend(q[b, l, n, i, h], k[b, l, :, h], v[b, l, :, h], real, scale)
    return out


def decode_spec_loop(q, k, v, neighbour_mask=None, softmax_scale=None):
    """One decoding step one sequence and head at a time: the new token attends to all real
    neighbour tokens of its sequence's current chunk under one softmax; none real gives 0.
    q (B, H, D); k, v (B, K, R, H, D)."""
    B, H, D = q.shape
    K, R = k.shape[1:3]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros_like(q)
    for b, h in itertools.product(range(B), range(H)):
        real = torch.ones(K * R, dtype=torch.bool) if neighbour_mask is None else neighbour_mask[b].reshape(K * R)
        out[b, h] = _attend(q[b, h], k[b, :, :, h].reshape(K * R, D), v[b, :, :, h].reshape(K * R, D), real, scale)
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


def decoding_logits(model, tokens, neighbours, mask):
    """The logits of the full forward pass and, from the same model, those of incremental decoding
    one token at a time (the neighbours of chunk u arrive with the step that completes it), both
    (B, n, vocab). tokens (B, n); neighbours and mask (B, n // m + 1, K, r)."""
    B, n = tokens.shape
    m = model.cfg.chunk_size
    with torch.no_grad():
        full = model(tokens, neighbours, mask)
        state = model.new_state(B, n)
        steps = []
        for t in range(n):
            new = {r: (neighbours[r, t // m], mask[r, t // m]) for r in range(B)} if t % m == m - 1 else {}
            steps.append(model.step(state, tokens[:, t], new))
    return full, torch.stack(steps, 1)


def check_model_decoding(device: str, backend: str = "auto", B: int = 2, n: int = 70, seed: int = 0):
    """A tiny RETRO model in float32 on `device` with `backend` (on a GPU, auto: the Triton CCA and
    encoder in the full pass, the CUDA decode kernel in the steps): its full forward pass and its
    incremental decoding each meet the error-ratio rule against the float64 model, the same-dtype
    PyTorch error being that of the float32 model on the reference backend. Returns the errors
    {name: (error, PyTorch float32 error, rounding floor)}."""
    import copy
    from dataclasses import replace

    from retro.model.model import RetroModel, preset

    torch.manual_seed(seed)
    m, V = 16, 97
    cfg = preset("tiny", vocab_size=V, chunk_size=m, max_seq_len=128, backend=backend)
    model = RetroModel(cfg).to(device).eval()
    reference = RetroModel(replace(cfg, backend="reference")).to(device).eval()
    reference.load_state_dict(model.state_dict())
    exact = copy.deepcopy(reference).double()
    tokens = torch.randint(0, V, (B, n), device=device)
    neighbours = torch.randint(0, V, (B, n // m + 1, 2, 2 * m), device=device)
    mask = torch.rand(B, n // m + 1, 2, 2 * m, device=device) > 0.2
    with torch.no_grad():
        ref64, ref32 = exact(tokens, neighbours, mask), reference(tokens, neighbours, mask)
    full, steps = decoding_logits(model, tokens, neighbours, mask)
    errors = {}
    for name, out in (("full forward", full), ("incremental decoding", steps)):
        assert_error_ratio(f"{backend} {device} {name}", out, ref32, ref64)
        errors[name] = (max_err(out, ref64), max_err(ref32, ref64), rounding_error(ref64, out.dtype))
    return errors
