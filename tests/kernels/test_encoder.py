"""RetroEncoder: the fused backends reproduce the reference layer, gradients reach every weight,
and the K neighbours of a chunk see the same chunk states."""
import pytest
import torch

from retro_kernels import RetroEncoder


def make(backend, **kw):
    torch.manual_seed(3)
    args = dict(dim=16, depth=2, heads=2, head_dim=8, context_dim=12)
    args.update(kw)
    return RetroEncoder(**args, backend=backend).double()


def data(B=2, L=3, K=2, R=7, dim=16, m=5, ctx=12):
    x = torch.randn(B, L, K, R, dim, dtype=torch.float64)
    h = torch.randn(B, L, m, ctx, dtype=torch.float64)
    mask = torch.rand(B, L, K, R) > 0.25
    return x, h, mask


@pytest.mark.parametrize("neighbours", [1, 2, 4])
def test_backends_agree_with_gradients(neighbours):
    x, h, mask = data(K=neighbours)
    results = []
    for backend in ("reference", "cpu"):
        enc = make(backend)
        hi = h.clone().requires_grad_()
        y = enc(x, hi, mask)
        y.square().sum().backward()
        results.append((y.detach(), hi.grad, [p.grad for p in enc.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b)
    assert all(g is not None and g.abs().sum() > 0 for g in results[1][2])


def test_identical_neighbours_of_a_chunk_encode_identically():
    x, h, _ = data(K=3)
    x[:, :, 1] = x[:, :, 0]
    y = make("cpu")(x, h)
    torch.testing.assert_close(y[:, :, 1], y[:, :, 0])
    assert not torch.allclose(y[:, 0, 0], y[:, 1, 0])


def test_cross_attention_only_in_listed_layers():
    enc = make("cpu", depth=3, cross_attend_layers=(0, 2))
    assert [layer.cross_attn is not None for layer in enc.layers] == [True, False, True]
    with pytest.raises(ValueError, match="cross_attend_layers must index layers 0 .. 1"):
        make("cpu", cross_attend_layers=(2,))


def test_bad_input_is_named():
    enc = make("cpu")
    x, h, mask = data()
    with pytest.raises(ValueError, match=r"chunk_states has size 2 in dimension 1 .* neighbours' chunks"):
        enc(x, h[:, :2], mask)
    with pytest.raises(ValueError, match="neighbours has size 15 in dimension 4"):
        enc(x[..., :15], h, mask)
