"""RetroModel.apply_copy_prior (RetroConfig.copy_prior): the retrieval path starts as a copying circuit.

On a copy task (random tokens; each chunk's neighbour is [the chunk, its continuation], exactly
what retrieval returns for a duplicated document), a freshly built model must already predict
better with its neighbours than without; without the prior it must not (the gap is noise)."""
import pytest
import torch
import torch.nn.functional as F

from retro.model.config import RetroConfig
from retro.model.model import RetroModel

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
                enc_dim=64, enc_depth=2, enc_heads=4, enc_head_dim=16, num_neighbours=1, max_seq_len=L * M,
                backend="reference")
    return RetroConfig(**{**base, **overrides})


@pytest.mark.parametrize("enc_dim", [64, 48, 96])
def test_copy_prior_reads_the_neighbours_from_the_start(enc_dim):
    with_prior = loss_gap(config(enc_dim=enc_dim))
    without = loss_gap(config(enc_dim=enc_dim, copy_prior=False))
    assert with_prior > 0.2, f"copy prior: OFF - ON = {with_prior:.3f} nats at initialisation"
    assert abs(without) < 0.05, f"no prior: OFF - ON = {without:.3f} nats at initialisation"


@pytest.mark.parametrize("enc_dim", [64, 96])
def test_copy_prior_copies_the_neighbours_next_token(enc_dim):
    """At initialisation, with the prior, the model's greedy prediction is the token that follows
    the current one in its neighbour (here the true next token) far more often than without
    neighbours (chance: 1 in 512), and changing the neighbours changes the predictions: CCA reads them."""
    torch.manual_seed(0)
    model = RetroModel(config(enc_dim=enc_dim)).eval()
    x, y, nb = copy_task(8, 0)
    with torch.no_grad():
        on, off, other = model(x, nb), model(x), model(x, torch.roll(nb, 1, 0))
    hit = lambda logits: (logits[:, M - 1:].argmax(-1) == y[:, M - 1:]).float().mean().item()  # noqa: E731
    assert hit(on) > 0.25 and hit(off) < 0.05 and hit(other) < 0.05, (hit(on), hit(off), hit(other))
    torch.manual_seed(0)
    without = RetroModel(config(enc_dim=enc_dim, copy_prior=False)).eval()
    with torch.no_grad():
        assert hit(without(x, nb)) < 0.05  # chance is 1/512: the copying is the prior's
