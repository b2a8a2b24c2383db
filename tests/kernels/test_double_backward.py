"""Second derivatives through every fused op: gradgradcheck in float64 on every backend that runs
here (the Triton kernels, which have no float64, in float32 against the float64 reference with the
error-ratio rule), a Hessian-vector product and a gradient penalty through the nn layers against
backend="reference", the first-order backward still on the fused kernel, and the backward ops'
own refusal to be differentiated."""
import pytest
import torch

from retro_kernels import (ChunkedCrossAttention, RetroEncoder, chunked_cross_attention,
                           chunked_cross_attention_decode, neighbour_cross_attention, neighbour_self_attention)
from retro_kernels._extension import has_triton, triton_interpreting
from retro_kernels.ops.block_attention import autograd as block_autograd
from retro_kernels.ops.block_attention import layouts
from tests.helpers.testing import CCACase, assert_error_ratio, random_cca, random_decode_step

TRITON_OK = has_triton() and (torch.cuda.is_available() or triton_interpreting())
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOAT64_BACKENDS = ["reference", "cpu", "auto"]  # auto: the C++ kernels on CPU tensors
F64 = dict(dtype=torch.float64)


def _bind(op, mask):
    """make(backend, device="cpu") -> fn(q, k, v): `op` with `mask` (on `device`) and `backend`."""
    return lambda backend, device="cpu": lambda q, k, v: op(q, k, v, mask.to(device), backend=backend)


def _cca():
    """Odd sizes: head_dim 3, seq_len 10 (not a multiple of chunk_size 4), an unused third chunk;
    random mask with batch 0's chunk 1 fully masked."""
    q, k, v, m = random_cca(CCACase(2, 10, 1, 3, 3, 2, 3, 4), mask="random")
    return (q, k, v), _bind(lambda q, k, v, m, backend: chunked_cross_attention(
        q, k, v, chunk_size=4, neighbour_mask=m, backend=backend), m)


def _self():
    q, k, v = (torch.randn(1, 2, 2, 3, 1, 3, **F64) for _ in range(3))
    m = torch.rand(1, 2, 2, 3) > 0.3
    m[0, 0, 1] = False  # a neighbour with no real token
    return (q, k, v), _bind(neighbour_self_attention, m)


def _cross():
    q = torch.randn(1, 2, 2, 3, 1, 3, **F64)
    k, v = (torch.randn(1, 2, 5, 1, 3, **F64) for _ in range(2))
    m = torch.rand(1, 2, 5) > 0.3
    m[0, 1] = False  # a chunk with no real state
    return (q, k, v), _bind(neighbour_cross_attention, m)


def _decode():
    q, k, v, m = random_decode_step(B=2, H=2, D=3, K=2, R=3)  # sequence 0 has no real token
    return (q, k, v), _bind(chunked_cross_attention_decode, m)


OPS = {"cca": _cca, "neighbour_self": _self, "neighbour_cross": _cross, "cca_decode": _decode}


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_gradgradcheck_float64(op, backend):
    inputs, make = OPS[op]()
    inputs = [x.requires_grad_() for x in inputs]
    assert torch.autograd.gradcheck(make(backend), inputs)
    assert torch.autograd.gradgradcheck(make(backend), inputs)


def second_order(fn, inputs, grad_out, weights):
    """The first-order input gradients g_i of <fn(*inputs), grad_out> and the gradients of
    sum_i <g_i, weights_i> with respect to every input and grad_out, on fresh leaves (detached)."""
    leaves = [x.detach().clone().requires_grad_() for x in (*inputs, grad_out)]
    *xs, go = leaves
    grads = torch.autograd.grad(fn(*xs), xs, go, create_graph=True)
    second = torch.autograd.grad(sum((g * w).sum() for g, w in zip(grads, weights)), leaves)
    return [g.detach() for g in (*grads, *second)]


@pytest.mark.skipif(not TRITON_OK, reason="needs triton and a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("op", ["cca", "neighbour_self", "neighbour_cross"])
def test_triton_second_derivatives_error_ratio(op):
    """Triton has no float64: its second derivatives in float32 against the float64 reference's,
    with the error-ratio rule (PyTorch's own float32 error on the reference backend as the yardstick)."""
    inputs, make = OPS[op]()
    grad_out = torch.randn_like(make("reference")(*inputs))
    weights = [torch.randn_like(x) for x in inputs]
    ref64 = second_order(make("reference"), inputs, grad_out, weights)
    f32 = [x.float() for x in (*inputs, grad_out)]
    w32 = [w.float() for w in weights]
    ref32 = second_order(make("reference"), f32[:-1], f32[-1], w32)
    got = second_order(make("triton", DEVICE), [x.to(DEVICE) for x in f32[:-1]], f32[-1].to(DEVICE),
                       [w.to(DEVICE) for w in w32])
    names = ["dq", "dk", "dv", "d(dq.w)/dq", "d(dq.w)/dk", "d(dq.w)/dv", "d(dq.w)/dgrad_out"]
    for name, g, r, r64 in zip(names, got, ref32, ref64):
        assert_error_ratio(f"{op} triton {name}", g.cpu(), r, r64)


def test_first_order_backward_runs_the_fused_kernel(monkeypatch):
    """Without create_graph the backward is the fused kernel's; the differentiable reference
    formulas run only where a graph of the gradients is asked for."""
    inputs, make = OPS["cca"]()
    xs = [x.requires_grad_() for x in inputs]
    calls = []
    formulas = block_autograd.block_attention_backward_reference
    monkeypatch.setattr(block_autograd, "block_attention_backward_reference",
                        lambda *a: calls.append(1) or formulas(*a))
    torch.autograd.grad(make("cpu")(*xs).sum(), xs)
    assert calls == []
    torch.autograd.grad(make("cpu")(*xs).sum(), xs, create_graph=True)
    assert calls == [1]


def _layer(backend):
    torch.manual_seed(1)
    return ChunkedCrossAttention(dim=6, heads=2, head_dim=4, chunk_size=4, context_dim=5, backend=backend).double()


def _layer_inputs():
    torch.manual_seed(2)
    x = torch.randn(2, 11, 6, **F64)
    neighbours = torch.randn(2, 3, 2, 3, 5, **F64)
    mask = torch.rand(2, 3, 2, 3) > 0.3
    mask[0, 1] = False
    return x, neighbours, mask


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_layer_hessian_vector_product_matches_reference(backend):
    x, neighbours, mask = _layer_inputs()
    w, u = torch.randn(2, 11, 6, **F64), torch.randn(2, 11, 6, **F64)

    def hvp(layer):
        return torch.autograd.functional.hvp(lambda x: (layer(x, neighbours, mask) * w).sum(), x, u)[1]

    expected = hvp(_layer("reference"))
    assert expected[:, 3:].abs().max() > 1e-3  # positions 3 .. attend: a curvature to get right
    torch.testing.assert_close(hvp(_layer(backend)), expected, rtol=1e-10, atol=1e-12)


def _penalised_weight_grads(module, *inputs):
    """Gradients of the parameters of sum(out^2) + |d <out, w> / d inputs[:2]|^2 (a gradient penalty;
    w random: the encoder ends in a LayerNorm, whose outputs sum to a constant)."""
    leaves = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
    out = module(*leaves)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    grads = torch.autograd.grad((out * w).sum(), leaves[:2], create_graph=True)
    loss = out.square().sum() + sum(g.square().sum() for g in grads)
    return torch.autograd.grad(loss, list(module.parameters()))


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_layer_gradient_penalty_weight_grads_match_reference(backend):
    x, neighbours, mask = _layer_inputs()
    expected = _penalised_weight_grads(_layer("reference"), x, neighbours, mask)
    for got, want in zip(_penalised_weight_grads(_layer(backend), x, neighbours, mask), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_encoder_gradient_penalty_weight_grads_match_reference(backend):
    def encoder(b):
        torch.manual_seed(3)
        return RetroEncoder(dim=6, depth=1, heads=2, head_dim=4, context_dim=5, backend=b).double()

    torch.manual_seed(4)
    neighbours, states = torch.randn(1, 2, 2, 3, 6, **F64), torch.randn(1, 2, 4, 5, **F64)
    nmask, cmask = torch.rand(1, 2, 2, 3) > 0.3, torch.rand(1, 2, 4) > 0.3
    expected = _penalised_weight_grads(encoder("reference"), neighbours, states, nmask, cmask)
    for got, want in zip(_penalised_weight_grads(encoder(backend), neighbours, states, nmask, cmask), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_backward_ops_refuse_differentiation_by_name():
    """Called directly, a first-derivative kernel does not pass for differentiable: it raises,
    naming itself and the ways out (torch warned once and returned wrong second derivatives)."""
    pairs = [(torch.ops.retro_kernels.block_attention_fwd, torch.ops.retro_kernels.block_attention_bwd, "cpu")]
    if TRITON_OK:
        from retro_kernels.ops.block_attention.triton_op import block_attention_bwd_triton, block_attention_fwd_triton
        pairs.append((block_attention_fwd_triton, block_attention_bwd_triton, DEVICE))
    for fwd, bwd, device in pairs:
        q, k, v, m = random_cca(CCACase(1, 9, 1, 4, 2, 1, 3, 4), dtype=torch.float32, device=device)
        p = layouts.cca(q, k, v, m, 4)
        out, lse = fwd(*p.args, 0.5)
        grad_out = torch.randn_like(p.q).requires_grad_()
        dq, _, _ = bwd(grad_out, *p.args[:4], out, lse, *p.args[4:], 0.5)
        with pytest.raises(RuntimeError, match=r"block_attention_bwd.*backend='reference'"):
            dq.sum().backward()


def test_decode_op_opcheck_with_autograd():
    """The decode op now has an autograd formula: opcheck's autograd and AOT-dispatch tests pass
    with inputs that require grad."""
    q, k, v, m = random_decode_step()
    q, k, v = (x.float().requires_grad_() for x in (q, k, v))
    p = layouts.decode(q, k, v, m)
    torch.library.opcheck(torch.ops.retro_kernels.block_attention_decode.default, (p.q, p.k, p.v, p.key_mask, 0.2))
