"""The Triton backend of chunked_cross_attention against the reference: on the CPU through the
Triton interpreter (float32, float16), on a GPU for real (see test_gpu.py)."""
import pytest
import torch

from retro_kernels import chunked_cross_attention
from retro_kernels._extension import has_triton, triton_interpreting
from retro_kernels.ops.block_attention import layouts
from tests.helpers.testing import CCACase, check_backend, random_cca, with_grads

pytestmark = pytest.mark.skipif(
    not has_triton() or not (torch.cuda.is_available() or triton_interpreting()),
    reason="needs triton and a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    CCACase(2, 37, 3, 32, 5, 2, 7, 8),     # ragged seq_len, an extra chunk
    CCACase(1, 7, 2, 16, 1, 1, 4, 8),      # shorter than one chunk
    CCACase(1, 50, 2, 24, 3, 3, 5, 20),    # head_dim 24 (padded), windows of 2 row blocks (interpreter)
    CCACase(1, 45, 1, 80, 2, 4, 9, 17),    # head_dim 80, 4 neighbours, 2 row blocks + ragged tail
    CCACase(2, 9, 2, 32, 9, 1, 3, 1),      # chunk_size 1
]


def cca(backend, m, mask):
    return lambda q, k, v: chunked_cross_attention(q, k, v, chunk_size=m, neighbour_mask=mask, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask", [None, "random"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_forward_and_gradients(case, mask, dtype):
    q, k, v, m = random_cca(case, mask=mask)
    on_device = None if m is None else m.to(DEVICE)
    check_backend(lambda b: cca(b, case.chunk_size, m if b == "reference" else on_device), (q, k, v),
                  torch.randn_like(q), dtype, "triton", DEVICE, label=str(case))


def test_triton_exact_zeros_for_unattended_positions_and_masked_chunks():
    case = CCACase(2, 37, 3, 32, 5, 2, 7, 8)
    q, k, v, m = random_cca(case, dtype=torch.float32, device=DEVICE, mask="random")
    out = chunked_cross_attention(q, k, v, chunk_size=8, neighbour_mask=m, backend="triton")
    assert torch.isfinite(out).all()
    assert (out[:, :7] == 0).all() and (out[0, 15:23] == 0).all()


def test_triton_kernels_write_every_output_element():
    """The launchers handed NaN-filled outputs (what a caching allocator may hand back) must leave
    no NaN: every element is written, exact 0 (and lse = +inf) where nothing is attended. Chunk
    size 20 spans two row blocks of 16 (two prefix blocks, float32 dk/dv partials), chunk 1 of
    batch 0 is fully masked and chunk 2 is beyond seq_len // chunk_size (unused)."""
    from retro_kernels.ops.block_attention import triton_launch

    case = CCACase(2, 50, 2, 24, 3, 3, 5, 20)
    q, k, v, m = random_cca(case, dtype=torch.float32, device=DEVICE, mask="random")
    p = layouts.cca(q, k, v, m, 20)
    q_rows, k_g, v_g, m_g = p.q, p.k, p.v, p.key_mask
    nan = float("nan")
    out, lse = torch.full_like(q, nan), torch.full((2, 2, 50), nan, device=DEVICE)
    triton_launch.forward(q_rows, k_g, v_g, m_g, p.q_rows, p.groups, p.prefix_rows, 0.3, out=out, lse=lse)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[:, :19] == 0).all() and (lse[:, :, :19] == float("inf")).all()  # before the first chunk
    assert (out[0, 39:50] == 0).all() and (lse[0, :, 39:50] == float("inf")).all()  # chunk 1 fully masked
    assert torch.isfinite(lse[1, :, 19:]).all()
    expected = chunked_cross_attention(q, k, v, chunk_size=20, neighbour_mask=m, backend="reference",
                                       softmax_scale=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)

    dq, dk, dv = (torch.full_like(x, nan) for x in (q, k_g, v_g))
    triton_launch.backward(torch.randn_like(q), q_rows, k_g, v_g, m_g, out, lse, p.q_rows, p.groups, p.prefix_rows,
                           0.3, dq=dq, dk=dk, dv=dv)
    assert not dq.isnan().any() and not dk.isnan().any() and not dv.isnan().any()
    assert (dq[:, :19] == 0).all() and (dq[0, 39:50] == 0).all()
    assert (dk[:, 2] == 0).all() and (dv[:, 2] == 0).all()  # the unused chunk
    assert (dk[0, 1] == 0).all() and (dv[0, 1] == 0).all()  # the fully masked chunk


def test_triton_backward_is_deterministic():
    case = CCACase(1, 45, 1, 80, 2, 4, 9, 17)
    q, k, v, m = random_cca(case, dtype=torch.float32, device=DEVICE)
    grad = torch.randn_like(q)
    a = with_grads(cca("triton", 17, m), (q, k, v), grad)
    b = with_grads(cca("triton", 17, m), (q, k, v), grad)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_opcheck_triton_ops():
    case = CCACase(1, 13, 2, 16, 4, 2, 3, 4)
    q, k, v, m = random_cca(case, dtype=torch.float32, device=DEVICE)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    p = layouts.cca(q, k, v, m, 4)
    torch.library.opcheck(torch.ops.retro_kernels.block_attention_fwd_triton.default, (*p.args, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_triton_rejects_float64():
    case = CCACase(1, 16, 1, 16, 2, 1, 4, 8)
    q, k, v, _ = random_cca(case, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        chunked_cross_attention(q, k, v, chunk_size=8, backend="triton")
