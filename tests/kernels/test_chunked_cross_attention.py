"""chunked_cross_attention: the reference against the per-position loop (testing.cca_spec_loop), the
C++ CPU kernel against the reference (error-ratio rule per dtype, gradients, gradcheck), the
custom-op machinery (opcheck, torch.compile) and every bad input."""
import pytest
import torch

from retro_kernels import chunked_cross_attention, chunked_cross_attention_reference
from retro_kernels.ops.block_attention import layouts
from tests.helpers.testing import CCACase, cca_spec_loop, check_backend, random_cca

CASES = [
    CCACase(2, 37, 3, 32, 5, 2, 7, 8),      # seq_len not a multiple of chunk_size, extra chunk
    CCACase(1, 5, 2, 16, 1, 1, 4, 8),       # shorter than one chunk: all zeros
    CCACase(1, 7, 2, 16, 1, 1, 4, 8),       # seq_len = m - 1
    CCACase(1, 8, 2, 16, 1, 2, 16, 8),      # exactly one chunk: only its last position attends
    CCACase(2, 32, 2, 64, 4, 3, 16, 8),     # a multiple of chunk_size, 3 neighbours
    CCACase(1, 70, 1, 80, 5, 4, 9, 13),     # head_dim 80, 4 neighbours, odd sizes
    CCACase(1, 40, 2, 128, 3, 1, 33, 16),   # head_dim 128, neighbour_len != 2m
    CCACase(2, 9, 2, 32, 9, 2, 3, 1),       # chunk_size 1
    CCACase(1, 256, 2, 64, 4, 2, 128, 64),  # the paper's m, k, r
]


def cca(backend, chunk_size, mask):
    return lambda q, k, v: chunked_cross_attention(q, k, v, chunk_size=chunk_size, neighbour_mask=mask,
                                                   backend=backend)


@pytest.mark.parametrize("mask", [None, "random", "none_real"])
@pytest.mark.parametrize("case", CASES[:5] + CASES[7:8], ids=str)
def test_reference_matches_spec_loop(case, mask):
    q, k, v, m = random_cca(case, mask=mask)
    out = chunked_cross_attention_reference(q, k, v, case.chunk_size, m)
    expected = cca_spec_loop(q, k, v, case.chunk_size, m)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert (out[:, : case.chunk_size - 1] == 0).all()


def test_reference_query_positions_are_not_shifted_by_one():
    # Position m-1 (the last token of chunk 0) attends chunk 0; position m-2 attends nothing.
    case = CCACase(1, 16, 1, 8, 2, 1, 4, 8)
    q, k, v, _ = random_cca(case, mask=None)
    out = chunked_cross_attention_reference(q, k, v, 8)
    assert (out[0, 6] == 0).all() and (out[0, 7] != 0).all()
    v2 = v.clone()
    v2[:, 1] += 1.0  # chunk 1's neighbours only reach positions 15 .. 22
    out2 = chunked_cross_attention_reference(q, k, v2, 8)
    torch.testing.assert_close(out2[0, :15], out[0, :15])
    assert not torch.allclose(out2[0, 15], out[0, 15])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", [None, "random"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_kernel_error_ratio(case, mask, dtype):
    q, k, v, m = random_cca(case, mask=mask)
    got = check_backend(lambda b: cca(b, case.chunk_size, m), (q, k, v), torch.randn_like(q), dtype, "cpu",
                        label=str(case))
    assert all(g.dtype == dtype for g in got)


def test_cpu_kernel_exact_zeros_and_no_nan():
    case = CCACase(2, 37, 3, 32, 5, 2, 7, 8)
    q, k, v, m = random_cca(case, dtype=torch.float32, mask="random")
    q.requires_grad_()
    out = chunked_cross_attention(q, k, v, chunk_size=8, neighbour_mask=m, backend="cpu")
    assert (out[:, :7] == 0).all()
    # batch 0, chunk 1 is fully masked: its window (positions 15 .. 22) gives exactly 0
    assert (out[0, 15:23] == 0).all() and (out[0, 23] != 0).any()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[:, :7] == 0).all()


@pytest.mark.slow
def test_cpu_kernel_gradcheck():
    case = CCACase(1, 11, 2, 4, 3, 2, 3, 4)
    q, k, v, m = random_cca(case, mask="random")
    inputs = [x.requires_grad_() for x in (q, k, v)]
    assert torch.autograd.gradcheck(cca("cpu", 4, m), inputs)


def test_cpu_kernel_is_deterministic_and_reads_non_contiguous_inputs():
    case = CCACase(2, 37, 3, 32, 5, 2, 7, 8)
    q, k, v, m = random_cca(case, dtype=torch.float32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    a = chunked_cross_attention(q, k, v, chunk_size=8, neighbour_mask=m, backend="cpu")
    b = chunked_cross_attention(qt, k, v, chunk_size=8, neighbour_mask=m, backend="cpu")
    assert torch.equal(a, b)


@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck_cpu_ops(with_mask):
    case = CCACase(2, 13, 2, 8, 4, 2, 3, 4)
    q, k, v, m = random_cca(case, dtype=torch.float32, mask="random" if with_mask else None)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    p = layouts.cca(q, k, v, m, 4)
    torch.library.opcheck(torch.ops.retro_kernels.block_attention_fwd.default, (*p.args, 0.3))
    out, lse = torch.ops.retro_kernels.block_attention_fwd(*p.args, 0.3)
    args = (torch.randn_like(p.q), p.q.detach(), p.k.detach(), p.v.detach(), p.key_mask, out.detach(), lse,
            p.q_rows, p.groups, p.prefix_rows, 0.3)
    torch.library.opcheck(torch.ops.retro_kernels.block_attention_bwd.default, args)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    case = CCACase(2, 21, 2, 16, 3, 2, 5, 8)
    q, k, v, m = random_cca(case, dtype=torch.float32)

    def layer(q, k, v):
        return chunked_cross_attention(q * 2, k, v, chunk_size=8, neighbour_mask=m, backend="cpu").sum(-1)

    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    qc, kc, vc = (x.clone().requires_grad_() for x in (q, k, v))
    qe, ke, ve = (x.clone().requires_grad_() for x in (q, k, v))
    torch.testing.assert_close(compiled(qc, kc, vc), layer(qe, ke, ve))
    compiled(qc, kc, vc).sum().backward()
    layer(qe, ke, ve).sum().backward()
    torch.testing.assert_close(qc.grad, qe.grad)
    torch.testing.assert_close(kc.grad, ke.grad)


def test_auto_picks_cpu_kernel_for_cpu_tensors(monkeypatch):
    case = CCACase(1, 16, 1, 8, 2, 1, 4, 8)
    q, k, v, _ = random_cca(case, dtype=torch.float32)
    calls = []
    import retro_kernels.ops.cca.op as op_module
    real = op_module.block_attention
    monkeypatch.setattr(op_module, "block_attention",
                        lambda p, s, backend: calls.append(backend) or real(p, s, backend))
    chunked_cross_attention(q, k, v, chunk_size=8)
    assert calls == ["cpu"]
