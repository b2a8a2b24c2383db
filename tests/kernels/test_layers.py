"""ChunkedCrossAttention layer: backends agree, rotary positions follow the paper's relative
distance, gradients flow, bad input is named."""
import pytest
import torch

from retro_kernels import ChunkedCrossAttention
from retro_kernels.nn import apply_rotary, rotary_angles


def make(backend="reference", **kw):
    torch.manual_seed(1)
    args = dict(dim=24, heads=3, head_dim=8, chunk_size=4, context_dim=20)
    args.update(kw)
    return ChunkedCrossAttention(**args, backend=backend).double()


def inputs(B=2, N=14, L=4, K=2, R=6, dim=24, ctx=20):
    x = torch.randn(B, N, dim, dtype=torch.float64)
    nb = torch.randn(B, L, K, R, ctx, dtype=torch.float64)
    mask = torch.rand(B, L, K, R) > 0.3
    return x, nb, mask


def test_layer_backends_agree_with_gradients():
    x, nb, mask = inputs()
    outs = []
    for backend in ("reference", "cpu"):
        layer = make(backend)
        xi = x.clone().requires_grad_()
        y = layer(xi, nb, mask)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, layer.to_k.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert (outs[0][0][:, :3] == 0).all()  # positions 0 .. m-2 only keep the residual (0 here)


def test_rotary_scores_depend_on_relative_distance_only():
    """q at window offset i and neighbour token i' score like positions (m-1+i, i'): shifting both
    by the same amount keeps the score (rotary is relative)."""
    D, m = 8, 4
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)

    def score(pq, pk):
        cq, sq = rotary_angles(torch.tensor([pq]), D, dtype=torch.float64)
        ck, sk = rotary_angles(torch.tensor([pk]), D, dtype=torch.float64)
        return (apply_rotary(q[None, None], cq[:, None], sq[:, None]) *
                apply_rotary(k[None, None], ck[:, None], sk[:, None])).sum()

    for i in range(m):
        for ip in range(3):
            d = i - ip + m - 1  # paper eq. 6
            torch.testing.assert_close(score(m - 1 + i, ip), score(d + 5, 5))


def test_layer_uses_window_positions():
    """Queries t = u*m + m-1 + i get rotary position m-1+i whatever the chunk u."""
    layer = make("reference", heads=1, head_dim=8, dim=8, context_dim=8)
    x, nb, _ = inputs(B=1, N=12, L=3, K=1, R=4, dim=8, ctx=8)
    x[:, 7:11] = x[:, 3:7]  # windows of chunks 0 and 1 hold the same states
    nb[:, 1] = nb[:, 0]     # and chunks 0 and 1 retrieved the same neighbours
    y = layer(x, nb)
    torch.testing.assert_close(y[:, 7:11], y[:, 3:7])


def test_layer_bad_input_is_named():
    layer = make()
    x, nb, mask = inputs()
    with pytest.raises(ValueError, match="x has size 23 in dimension 2.*the layer's dim"):
        layer(x[..., :23], nb, mask)
    with pytest.raises(ValueError, match="neighbours has size 19 in dimension 4"):
        layer(x, nb[..., :19], mask)
    with pytest.raises(ValueError, match="neighbours must have shape"):
        layer(x, nb[0], mask)
    with pytest.raises(ValueError, match="rotary=True needs an even head_dim"):
        ChunkedCrossAttention(dim=8, heads=2, head_dim=7)


def test_rotary_is_a_complex_rotation_of_the_half_split_pairs():
    from retro_kernels.nn.rotary import apply_rotary, rotary_angles

    torch.manual_seed(0)
    x = torch.randn(3, 5, 2, 8, dtype=torch.float64)  # (..., heads, head_dim)
    positions = torch.tensor([0, 1, 7, 100, 2049])
    cos, sin = rotary_angles(positions, 8, 10000.0, torch.float64)
    got = apply_rotary(x, cos[:, None], sin[:, None])
    theta = positions[:, None].double() * 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.polar(torch.ones_like(theta), theta)[:, None]
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], -1), rtol=0, atol=1e-12)


def test_smeared_keys_mix_each_neighbour_token_with_the_one_before():
    torch.manual_seed(0)
    layer = ChunkedCrossAttention(dim=16, heads=2, head_dim=8, chunk_size=4, context_dim=12, rotary=False,
                                  smear_keys=True).double()
    with torch.no_grad():
        layer.smear.copy_(torch.tensor([-1.0, 2.0], dtype=torch.float64))
    nb = torch.randn(2, 3, 2, 8, 12, dtype=torch.float64)  # (batch, chunks, k, r, context_dim)
    k, _ = layer.project_neighbours(nb)
    plain = layer.to_k(nb).view(2, 3, 2, 8, 2, 8)
    a = torch.sigmoid(layer.smear)[:, None]
    for j in range(8):
        before = plain[..., j - 1, :, :] if j else torch.zeros_like(plain[..., 0, :, :])
        torch.testing.assert_close(k[..., j, :, :], (1 - a) * plain[..., j, :, :] + a * before)


def test_rotary_table_is_the_reference_computed_once():
    """rotary_table: rotary_angles of positions 0 .. n-1 to the last bit, one table per head size,
    device and dtype (a shorter length is a slice of the longer one, not a new computation)."""
    from retro_kernels.nn import rotary_table

    for dtype in (torch.float32, torch.float64):
        cos, sin = rotary_table(300, 16, 500.0, "cpu", dtype)
        want = rotary_angles(torch.arange(300), 16, 500.0, dtype)
        assert torch.equal(cos, want[0]) and torch.equal(sin, want[1])
        short = rotary_table(7, 16, 500.0, "cpu", dtype)[0]
        assert short.data_ptr() == cos.data_ptr() and short.shape == (7, 16)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_step_at_per_row_positions_is_the_full_layer(backend):
    """step: each row's one token at its own position, against the cached keys/values of the chunk
    that position attends (an all-False mask before the first complete chunk), gives forward's output
    at that position."""
    layer = make(backend, qk_norm=True, smear_keys=True)
    x, nb, mask = inputs(N=14, L=4)
    full = layer(x, nb, mask)
    k, v = layer.project_neighbours(nb)  # (B, L, K, R, H, D)
    for positions in ([0, 13], [3, 7], [12, 2], [5, 11]):
        pos = torch.tensor(positions)
        u = (pos + 1) // 4 - 1
        rows = torch.arange(2)
        m = mask[rows, u.clamp(min=0)] & (u >= 0)[:, None, None]
        got = layer.step(x[rows, pos][:, None], pos, k[rows, u.clamp(min=0)], v[rows, u.clamp(min=0)], m)
        torch.testing.assert_close(got[:, 0], full[rows, pos], rtol=1e-10, atol=1e-10)
