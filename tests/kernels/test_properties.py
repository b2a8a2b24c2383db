"""Property-based tests (hypothesis): every op, on every CPU-runnable backend, against the loop written
straight from its definition (testing.py), over random shapes -- seq_len not a multiple of the
chunk size or shorter than one chunk, 1 to 4 neighbours, odd neighbour lengths, fully masked
chunks and neighbours, a batch of 1 -- in float64 (float32 for Triton, which has no float64).
The fused backends' gradients are checked against autograd through the loop too."""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from retro_kernels import (chunked_cross_attention, chunked_cross_attention_decode,  # noqa: E402
                           neighbour_cross_attention, neighbour_self_attention)
from retro_kernels._extension import has_cpu_kernels, has_triton, triton_interpreting  # noqa: E402
from tests.helpers.testing import cca_spec_loop, cross_spec_loop, decode_spec_loop, self_spec_loop  # noqa: E402

TRITON_OK = has_triton() and not torch.cuda.is_available() and triton_interpreting()
BACKENDS = ["reference"] + (["cpu"] if has_cpu_kernels() else [])
# The Triton interpreter takes about a second a call: fewer examples, forward and backward.
CASES = [pytest.param(b, 25, id=b) for b in BACKENDS]
if TRITON_OK:
    CASES.append(pytest.param("triton", 6, id="triton", marks=pytest.mark.slow))

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def masks(draw, shape, group_dims: int):
    """None, or a bool mask of `shape` with some tokens padded and possibly whole groups (the
    first `group_dims` dimensions index a group) without any real token."""
    if draw(st.booleans()) and draw(st.booleans()):
        return None
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) > draw(st.sampled_from([0.0, 0.3, 0.7]))
    groups = mask.view(math.prod(shape[:group_dims]), math.prod(shape[group_dims:]))
    if groups.numel() and draw(st.booleans()):  # one group with no real token
        groups[draw(st.integers(0, groups.shape[0] - 1))] = False
    return mask


def tensors(draw, *shapes):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


@st.composite
def cca_problems(draw):
    m = draw(st.integers(1, 6))
    n = draw(st.integers(0, 4 * m + 3))  # includes n < m and n not a multiple of m
    B, H, D = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 9))
    L = n // m + draw(st.integers(0, 1))
    K, R = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    q, k, v = tensors(draw, (B, n, H, D), (B, L, K, R, H, D), (B, L, K, R, H, D))
    return q, k, v, draw(masks((B, L, K, R), 2)), m


@st.composite
def neighbour_problems(draw, cross: bool):
    B, L, K, R = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    H, D = draw(st.integers(1, 2)), draw(st.integers(1, 9))
    if cross:
        C = draw(st.integers(1, 6))
        q, k, v = tensors(draw, (B, L, K, R, H, D), (B, L, C, H, D), (B, L, C, H, D))
        return q, k, v, draw(masks((B, L, C), 2))
    q, k, v = tensors(draw, *[(B, L, K, R, H, D)] * 3)
    return q, k, v, draw(masks((B, L, K, R), 3))


@st.composite
def decode_problems(draw):
    B, H, D, K, R = (draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 9)),
                     draw(st.integers(1, 4)), draw(st.integers(1, 5)))
    q, k, v = tensors(draw, (B, H, D), (B, K, R, H, D), (B, K, R, H, D))
    return q, k, v, draw(masks((B, K, R), 1))


def check(op, loop, q, k, v, mask, backend):
    """op(backend) against the loop: the output, exact zeros where the loop gives exact zeros
    (positions before the first chunk, groups without a real key), and for the fused backends the
    gradients against autograd through the loop."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = loop(*leaves, mask)
    low = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    got = op(*low, mask, backend=backend)
    torch.testing.assert_close(got.double(), expected.detach(), **tol)
    assert (got[expected.detach() == 0] == 0).all()
    if backend == "reference" or not got.requires_grad or not expected.requires_grad:
        return
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, leaves, grad, allow_unused=True)
    have = torch.autograd.grad(got, low, grad.to(dtype), allow_unused=True)
    for name, w, h in zip("qkv", want, have):
        w = torch.zeros_like(q if name == "q" else k) if w is None else w
        torch.testing.assert_close(h.double(), w, **tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend, examples", CASES)
def test_chunked_cross_attention_matches_loop(backend, examples):
    @settings(max_examples=examples, **SETTINGS)
    @given(cca_problems())
    def run(problem):
        q, k, v, mask, m = problem

        def op(q, k, v, mask, backend):
            return chunked_cross_attention(q, k, v, chunk_size=m, neighbour_mask=mask, backend=backend)

        check(op, lambda q, k, v, mask: cca_spec_loop(q, k, v, m, mask), q, k, v, mask, backend)

    run()


@pytest.mark.parametrize("backend, examples", CASES)
@pytest.mark.parametrize("which", ["self", "cross"])
def test_neighbour_attention_matches_loop(which, backend, examples):
    op, loop = ((neighbour_self_attention, self_spec_loop) if which == "self"
                else (neighbour_cross_attention, cross_spec_loop))

    @settings(max_examples=examples, **SETTINGS)
    @given(neighbour_problems(cross=which == "cross"))
    def run(problem):
        check(op, loop, *problem, backend)

    run()


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_matches_loop(backend):
    @settings(max_examples=25, **SETTINGS)
    @given(decode_problems())
    def run(problem):
        q, k, v, mask = problem
        got = chunked_cross_attention_decode(q, k, v, mask, backend=backend)
        expected = decode_spec_loop(q, k, v, mask)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        assert (got[expected == 0] == 0).all()

    run()
