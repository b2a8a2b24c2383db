"""RetroModel.copy_prior: the retrieval path starts as a copying circuit.

On a copy task (random tokens; each chunk's neighbour is [the chunk, its continuation], exactly
what retrieval returns for a duplicated document), a freshly built model must already predict
better with its neighbours than without; without the prior it must not (the gap is noise)."""
import pytest
import torch
import torch.nn.functional as F

from retro.model import RetroConfig, RetroModel

M, L, VOCAB = 16, 4, 512


def copy_task(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (batch, (L + 1) * M), generator=g)
    x, y = tokens[:, :L * M], tokens[:, 1:L * M + 1]
    # neighbours of chunk u: [chunk u, chunk u + 1] of the same text (the continuation holds the targets)
    nb = torch.stack([tokens[:, u * M:(u + 2) * M] for u in range(L)], 1)[:, :, None]  # (B, L, 1, 2M)
    return x, y, nb


def loss_gap(cfg: RetroConfig, seed: int = 0) -> float:
    """OFF - ON cross-entropy (nats) of the tokens that attend neighbours, at initialisation."""
    torch.manual_seed(seed)
    model = RetroModel(cfg).eval()
    x, y, nb = copy_task(8, seed)
    with torch.no_grad():
        on, off = model(x, nb), model(x)
    ce = lambda logits: F.cross_entropy(logits[:, M - 1:].transpose(1, 2), y[:, M - 1:]).item()  # noqa: E731
    return ce(off) - ce(on)


def config(**overrides) -> RetroConfig:
    base = dict(vocab_size=VOCAB, dim=64, ff_dim=128, depth=3, heads=4, head_dim=16, chunk_size=M, cca_layers=(1, 2),
                enc_dim=64, enc_depth=2, enc_heads=4, enc_head_dim=16, neighbours=1, max_seq_len=L * M,
                backend="reference")
    return RetroConfig(**{**base, **overrides})


@pytest.mark.parametrize("enc_dim", [64, 48, 96])
def test_copy_prior_reads_the_neighbours_from_the_start(enc_dim):
    with_prior = loss_gap(config(enc_dim=enc_dim))
    without = loss_gap(config(enc_dim=enc_dim, copy_init=False))
    assert with_prior > 0.2, f"copy prior: OFF - ON = {with_prior:.3f} nats at initialisation"
    assert abs(without) < 0.05, f"no prior: OFF - ON = {without:.3f} nats at initialisation"


def test_copy_prior_weights():
    model = RetroModel(config())
    for layer in model.encoder.layers:
        assert torch.count_nonzero(layer.self_attn.to_out.weight) == 0
        assert torch.count_nonzero(layer.ff[-1].weight) == 0
    for i in model.cfg.cca_layers:
        cca = model.layers[i].cca
        torch.testing.assert_close(cca.to_k.weight, cca.to_q.weight)
        torch.testing.assert_close(cca.to_out.weight, cca.to_v.weight.T)
        assert torch.sigmoid(cca.smear).min() > 0.85
    # another encoder width: keys see the decoder's space through the encoder's input projection
    model = RetroModel(config(enc_dim=96))
    cca = model.layers[1].cca
    torch.testing.assert_close(cca.to_k.weight @ model.to_encoder.weight, cca.to_q.weight, atol=1e-5, rtol=1e-4)


def test_old_checkpoints_load_without_the_new_options():
    old = {k: v for k, v in config().to_dict().items() if k not in RetroConfig.LEGACY}
    cfg = RetroConfig.from_dict(old)
    assert not cfg.copy_init and not cfg.qk_norm and not cfg.smear_keys and cfg.cca_rotary
