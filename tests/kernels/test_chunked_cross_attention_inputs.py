"""Bad input to chunked_cross_attention: a clear ValueError/TypeError naming the argument, its
value and what was expected, raised before any kernel runs."""
import pytest
import torch

from retro_kernels import chunked_cross_attention


def good(**over):
    B, N, H, D, L, K, R = 2, 20, 2, 8, 3, 2, 5
    args = dict(q=torch.randn(B, N, H, D), k=torch.randn(B, L, K, R, H, D), v=torch.randn(B, L, K, R, H, D),
                chunk_size=6, neighbour_mask=torch.ones(B, L, K, R, dtype=torch.bool))
    args.update(over)
    return args


def call(backend="cpu", **over):
    a = good(**over)
    return chunked_cross_attention(a.pop("q"), a.pop("k"), a.pop("v"), backend=backend, **a)


@pytest.mark.parametrize("over, error, words", [
    (dict(q=torch.randn(2, 20, 16)), ValueError, ["q", "(2, 20, 16)", "4 dimensions"]),
    (dict(k=torch.randn(2, 3, 2, 5, 8)), ValueError, ["k", "6 dimensions"]),
    (dict(v="not a tensor"), TypeError, ["v", "str"]),
    (dict(q=torch.randint(0, 3, (2, 20, 2, 8))), TypeError, ["q", "floating-point", "int64"]),
    (dict(k=torch.randn(3, 3, 2, 5, 2, 8)), ValueError, ["k", "size 3", "dimension 0", "q's batch"]),
    (dict(k=torch.randn(2, 3, 2, 5, 4, 8)), ValueError, ["k", "dimension 4", "q's heads"]),
    (dict(v=torch.randn(2, 3, 2, 5, 2, 16)), ValueError, ["v", "dimension 5", "head_dim"]),
    (dict(v=torch.randn(2, 3, 2, 6, 2, 8)), ValueError, ["v", "neighbour_len"]),
    (dict(k=torch.randn(2, 2, 2, 5, 2, 8), v=torch.randn(2, 2, 2, 5, 2, 8),
          neighbour_mask=None), ValueError, ["k has 2 chunks", "at least", "20 // 6 = 3"]),
    (dict(chunk_size=0), ValueError, ["chunk_size", ">= 1", "0"]),
    (dict(chunk_size=6.0), TypeError, ["chunk_size", "int", "6.0"]),
    (dict(neighbour_mask=torch.ones(2, 3, 2, 4, dtype=torch.bool)), ValueError, ["neighbour_mask", "(2, 3, 2, 4)"]),
    (dict(neighbour_mask=torch.ones(2, 3, 2, 5)), TypeError, ["neighbour_mask", "torch.bool", "float32"]),
    (dict(k=torch.randn(2, 3, 2, 5, 2, 8, dtype=torch.float64)), TypeError, ["k", "float64", "q has torch.float32"]),
    (dict(softmax_scale=-1.0), ValueError, ["softmax_scale", "positive", "-1.0"]),
])
def test_bad_input_is_named(over, error, words):
    with pytest.raises(error) as info:
        call(**over)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_unknown_and_unusable_backends():
    with pytest.raises(ValueError, match="backend must be one of"):
        call(backend="fast")
    with pytest.raises(ValueError, match="not implemented"):
        call(backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_mixed_devices():
    with pytest.raises(ValueError, match="expected one device"):
        call(backend="reference", k=torch.randn(2, 3, 2, 5, 2, 8, device="cuda"))


def test_mask_on_other_device_is_named(monkeypatch):
    mask = torch.ones(2, 3, 2, 5, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="neighbour_mask is on meta"):
        call(neighbour_mask=mask)


def test_no_kernel_runs_on_bad_input(monkeypatch):
    import retro_kernels.ops.cca.op as op_module
    monkeypatch.setattr(op_module, "block_attention", lambda *a: pytest.fail("a kernel was called"))
    with pytest.raises(ValueError):
        call(chunk_size=-3)
