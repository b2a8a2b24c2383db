"""neighbour_self_attention / neighbour_cross_attention: references against per-token loops, the
C++ and Triton kernels against the reference (error-ratio rule, gradients, gradcheck), opcheck,
torch.compile and bad input."""
import pytest
import torch

from retro_kernels import (neighbour_cross_attention, neighbour_cross_attention_reference,
                           neighbour_self_attention, neighbour_self_attention_reference)
from retro_kernels._extension import has_triton, triton_interpreting
from retro_kernels.ops.block_attention import layouts
from tests.helpers.testing import check_backend, cross_spec_loop, self_spec_loop

TRITON_OK = has_triton() and (torch.cuda.is_available() or triton_interpreting())
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, L, K, R, H, D, C): 1..4 neighbours, odd lengths, head_dim 32/64/80/128
SHAPES = [(2, 3, 2, 9, 2, 32, 5), (1, 2, 1, 17, 3, 16, 8), (1, 2, 4, 6, 1, 80, 13),
          (1, 1, 3, 33, 2, 64, 20), (1, 2, 2, 12, 1, 128, 7)]


def problem(shape, mask=True):
    B, L, K, R, H, D, C = shape
    f = dict(dtype=torch.float64)
    q, k, v = (torch.randn(B, L, K, R, H, D, **f) for _ in range(3))
    kc, vc = (torch.randn(B, L, C, H, D, **f) for _ in range(2))
    nm = cm = None
    if mask:
        nm = torch.rand(B, L, K, R) > 0.3
        nm[0, 0, 0] = False  # a neighbour with no real token
        cm = torch.rand(B, L, C) > 0.3
        cm[0, -1] = False    # a chunk with no real state
    return (q, k, v, nm), (q, kc, vc, cm)


def self_op(backend, mask):
    return lambda q, k, v: neighbour_self_attention(q, k, v, mask, backend=backend)


def cross_op(backend, mask):
    return lambda q, k, v: neighbour_cross_attention(q, k, v, mask, backend=backend)


def test_references_match_token_loops():
    (q, k, v, nm), (_, kc, vc, cm) = problem((1, 2, 2, 5, 2, 4, 3))
    torch.testing.assert_close(neighbour_self_attention_reference(q, k, v, nm), self_spec_loop(q, k, v, nm))
    torch.testing.assert_close(neighbour_cross_attention_reference(q, kc, vc, cm), cross_spec_loop(q, kc, vc, cm))


BACKENDS = ["cpu"] + (["triton"] if TRITON_OK else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["self", "cross"])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_error_ratio(shape, mask, which, backend):
    s, c = problem(shape, mask)
    q, k, v, m = s if which == "self" else c
    make = self_op if which == "self" else cross_op
    dtypes = [torch.float64, torch.float32, torch.bfloat16] if backend == "cpu" else [torch.float32, torch.float16]
    dev = DEVICE if backend == "triton" else "cpu"
    on_device = None if m is None else m.to(dev)
    for dtype in dtypes:
        got = check_backend(lambda b: make(b, m if b == "reference" else on_device), (q, k, v), torch.randn_like(q),
                            dtype, backend, dev, label=f"{which} {shape}")
    if mask:
        out = got[0].cpu()
        if which == "self":
            assert (out[0, 0, 0] == 0).all()
        else:
            assert (out[0, -1] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["self", "cross"])
def test_cpu_gradcheck(which):
    s, c = problem((1, 2, 2, 4, 2, 4, 3))
    q, k, v, m = s if which == "self" else c
    make = self_op if which == "self" else cross_op
    assert torch.autograd.gradcheck(make("cpu", m), [x.requires_grad_() for x in (q, k, v)])


@pytest.mark.parametrize("name", ["neighbour_self", "neighbour_cross"])
def test_opcheck(name):
    s, c = problem((1, 2, 2, 5, 2, 8, 3))
    q, k, v, m = (s if "self" in name else c)
    q, k, v = (x.float().requires_grad_() for x in (q, k, v))
    layout = layouts.neighbour_self if name == "neighbour_self" else layouts.neighbour_cross
    torch.library.opcheck(torch.ops.retro_kernels.block_attention_fwd.default, (*layout(q, k, v, m).args, 0.3))
    if TRITON_OK:
        p = layout(*(x.to(DEVICE) if isinstance(x, torch.Tensor) else x for x in (q, k, v, m)))
        torch.library.opcheck(torch.ops.retro_kernels.block_attention_fwd_triton.default, (*p.args, 0.3),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph():
    (q, k, v, nm), (_, kc, vc, cm) = problem((1, 2, 2, 6, 2, 8, 4))
    q, k, v, kc, vc = (x.float() for x in (q, k, v, kc, vc))

    def f(q, k, v, kc, vc):
        x = neighbour_self_attention(q, k, v, nm, backend="cpu")
        return neighbour_cross_attention(x, kc, vc, cm, backend="cpu")

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v, kc, vc), f(q, k, v, kc, vc))


def test_bad_input_is_named():
    (q, k, v, nm), (_, kc, vc, cm) = problem((1, 2, 2, 5, 2, 8, 3))
    with pytest.raises(ValueError, match="k has size 4 in dimension 3"):
        neighbour_self_attention(q, k[:, :, :, :4], v, nm)
    with pytest.raises(ValueError, match="neighbour_mask must have shape"):
        neighbour_self_attention(q, k, v, nm[:, :1])
    with pytest.raises(TypeError, match="v has dtype torch.float32"):
        neighbour_self_attention(q, k, v.float(), nm)
    with pytest.raises(ValueError, match="k must have shape .*chunk_len"):
        neighbour_cross_attention(q, k, vc, cm)
    with pytest.raises(ValueError, match="k has size 3 in dimension 1 .* q's num_chunks"):
        neighbour_cross_attention(q, torch.randn(1, 3, 3, 2, 8, dtype=torch.float64), vc, cm)
    with pytest.raises(TypeError, match="chunk_mask must have dtype torch.bool"):
        neighbour_cross_attention(q, kc, vc, cm.float())
