"""chunked_cross_attention_decode: the C++ CPU kernel against the reference, and decoding one token
at a time reproduces the training op at every position (the token at position t attends to the
neighbours of chunk (t + 1) // m - 1, as in training)."""
import pytest
import torch

from retro_kernels import chunked_cross_attention, chunked_cross_attention_decode
from retro_kernels.ops.block_attention import layouts
from tests.helpers.testing import CCACase, check_decode, random_cca, random_decode_step


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 2, 32, 2, 7), (1, 4, 80, 4, 33), (2, 1, 128, 1, 128), (5, 3, 24, 3, 1)])
@pytest.mark.parametrize("mask", [False, True])
def test_cpu_decode_error_ratio(shape, dtype, mask):
    B, H, D, K, R = shape
    q, k, v, m = random_decode_step(B, H, D, K, R, mask=mask)
    check_decode(q, k, v, m, dtype, "cpu", label=str(shape))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_decoding_token_by_token_matches_training_op(backend):
    case = CCACase(2, 29, 2, 16, 4, 2, 6, 8)
    q, k, v, m = random_cca(case, mask="random")
    full = chunked_cross_attention(q, k, v, chunk_size=8, neighbour_mask=m, backend="reference")
    for t in range(case.seq_len):
        u = (t + 1) // 8 - 1  # the chunk whose neighbours position t sees
        if u < 0:
            continue
        step = chunked_cross_attention_decode(q[:, t], k[:, u], v[:, u], m[:, u], backend=backend)
        torch.testing.assert_close(step, full[:, t], rtol=1e-10, atol=1e-10)


def test_decode_bad_input_is_named():
    q, k, v, m = random_decode_step()
    with pytest.raises(ValueError, match="k has size 4 in dimension 3"):
        chunked_cross_attention_decode(q, torch.randn(3, 2, 7, 4, 32, dtype=torch.float64), v, m)
    with pytest.raises(ValueError, match=r"neighbour_mask must have shape"):
        chunked_cross_attention_decode(q, k, v, m[:, :1])
    with pytest.raises(ValueError, match="backend='cuda' cannot run"):
        chunked_cross_attention_decode(q, k, v, m, backend="cuda")
    with pytest.raises(TypeError, match="q must be a floating-point"):
        chunked_cross_attention_decode(q.long(), k, v, m)


def test_opcheck_decode_op():
    q, k, v, m = random_decode_step()
    q, k, v = q.float(), k.float(), v.float()
    problem = layouts.decode(q, k, v, m)
    torch.library.opcheck(torch.ops.retro_kernels.block_attention_decode.default,
                          (problem.q, problem.k, problem.v, problem.key_mask, 0.2),
                          test_utils=("test_schema", "test_faketensor"))
