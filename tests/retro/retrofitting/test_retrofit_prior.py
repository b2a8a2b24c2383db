"""The copy prior of a retrofitted model (retrofit_prior.py) and CCA's placement in the block.

A tiny random Llama is the base: its residual stream carries each token's embedding, which is all
the prior needs. The data is a copying task: each sequence's neighbours hold its own text, so a
model that reads them can predict the tokens it has not seen; the base cannot (random tokens)."""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from retro.training.data import Batch
from retro.retrofitting.wrapper import retrofit
from retro.training.step import train_step

M, K, V = 8, 2, 64


def tiny_llama(layers=4, seed=0):
    """Blocks at a small initialisation and input embeddings of unit scale: as in a trained model,
    the residual stream keeps the token's identity; an untied unembedding of 0.3 lets the logits be
    confident (the base itself predicts nothing: random text)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      initializer_range=0.05, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)
        model.get_output_embeddings().weight.normal_(0, 0.3)
    return model


def copy_batch(batch=8, chunks=4, seed=0, shuffle=False) -> Batch:
    """Random sequences; chunk u's first neighbour is [chunk u, chunk u+1] of the same sequence
    (its continuation is what the model must predict next), the second a random distractor.
    shuffle: the neighbours of another sequence instead (nothing to copy)."""
    g = torch.Generator().manual_seed(seed)
    n = chunks * M
    text = torch.randint(3, V, (batch, n + M + 1), generator=g)
    tokens, targets = text[:, :n], text[:, 1:n + 1]
    nb = torch.randint(3, V, (batch, chunks, K, 2 * M), generator=g)
    for u in range(chunks):
        nb[:, u, 0] = text[:, u * M:(u + 2) * M]
    if shuffle:
        nb = nb.roll(1, dims=0)
    return Batch(tokens, targets, nb, torch.ones(nb.shape, dtype=torch.bool))


def loss(model, b: Batch, neighbours=True) -> float:
    with torch.no_grad():
        logits = model(b.tokens, b.neighbours if neighbours else None, b.neighbour_mask)
    # only the positions that read neighbours (from m-1 on)
    return float(torch.nn.functional.cross_entropy(logits[:, M - 1:].transpose(1, 2), b.targets[:, M - 1:]))


def train_new_parts(model, lr: float, steps: int = 15) -> None:
    """steps of AdamW on the new parts (the base is frozen) over fresh copy batches."""
    params = [p for n, p in model.named_parameters() if not n.startswith("base.")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for s in range(steps):
        train_step(model, opt, copy_batch(seed=10 + s), grad_clip=1.0)
    model.eval()


def retrofitted(placement="inside", **kw):
    return retrofit(tiny_llama(), cca_layers=(1, 3), chunk_size=M, k=K, backend="cpu", placement=placement,
                    encoder=dict(dim=64, depth=1, head_dim=16), **kw).double()


@pytest.mark.parametrize("placement", ["inside", "after"])
def test_copy_prior_reads_the_neighbours_before_any_training(placement):
    model = retrofitted(placement)
    fit, held = copy_batch(seed=1), copy_batch(seed=2)
    base = loss(model, held, neighbours=False)
    assert loss(model, held) == base  # zero-initialised: exactly the base
    chosen = model.fit_copy_prior(fit, log=lambda *_: None)
    assert chosen["scale"] > 0 and min(chosen["query_fit_cos"].values()) > 0.5
    with_prior = loss(model, held)
    # the prior copies: much better with the sequence's own text among the neighbours ...
    assert with_prior < 0.6 * base, (with_prior, base)
    # ... and no better with another sequence's neighbours (nothing to copy there)
    assert loss(model, copy_batch(seed=2, shuffle=True)) > 0.95 * base
    assert loss(model, held, neighbours=False) == base  # RETRO[OFF] is still the base model


def test_copy_prior_is_deterministic_and_training_starts_from_it():
    a, b = retrofitted(), retrofitted()
    fit = copy_batch(seed=1)
    a.fit_copy_prior(fit, log=lambda *_: None)
    b.fit_copy_prior(fit, log=lambda *_: None)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    held = copy_batch(seed=2)
    start = loss(a, held)
    train_new_parts(a, lr=1e-3)
    assert loss(a, held) < 0.95 * start  # training improves on the prior (by 8.5% here), it does not undo it


def test_zero_start_learns_far_less_in_the_same_steps():
    """The reason for the prior: the same training from zero-initialised CCA (the gradient of the
    attention weights is zero until the output projections have grown) ends far behind."""
    ends = {}
    for prior in (True, False):
        model = retrofitted()
        if prior:
            model.fit_copy_prior(copy_batch(seed=1), log=lambda *_: None)
        train_new_parts(model, lr=3e-3)
        ends[prior] = loss(model, copy_batch(seed=2))
    assert ends[True] < 0.7 * ends[False], ends


def test_inside_placement_is_between_attention_and_mlp():
    """placement "inside" computed by hand on a one-block base: h = x + attn(x); h += CCA(h);
    out = h + mlp(h); the retrofitted model's logits equal that."""
    torch.manual_seed(0)
    hf = tiny_llama(layers=1)
    model = retrofit(hf, cca_layers=(0,), chunk_size=M, k=K, backend="cpu", encoder=dict(dim=64, depth=1,
                                                                                          head_dim=16)).double()
    with torch.no_grad():
        for p in list(model.cca.parameters()) + list(model.encoder.parameters()):
            p.normal_(0, 0.2)
    b = copy_batch(batch=2, chunks=3)
    n = b.tokens.shape[1]
    block, inner = model.blocks[0], hf.model
    with torch.no_grad():
        x = inner.embed_tokens(b.tokens)
        pos = torch.arange(n)[None]
        cos, sin = inner.rotary_emb(x, pos)
        causal = torch.full((n, n), float("-inf"), dtype=x.dtype).triu(1)[None, None]
        h = x + block.self_attn(block.input_layernorm(x), position_embeddings=(cos, sin), attention_mask=causal)[0]
        states = model.encode(b.neighbours, b.neighbour_mask, h.reshape(2, 3, M, -1))
        h = h + model.cca["0"](model.cca_norm["0"](h), states, b.neighbour_mask)
        h = h + block.mlp(block.post_attention_layernorm(h))
        want = hf.lm_head(inner.norm(h))
        got = model(b.tokens, b.neighbours, b.neighbour_mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    after = retrofit(tiny_llama(layers=1), cca_layers=(0,), chunk_size=M, k=K, backend="cpu", placement="after",
                     encoder=dict(dim=64, depth=1, head_dim=16)).double()
    after.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (after(b.tokens, b.neighbours, b.neighbour_mask) - got).abs().max() > 1e-3


def test_bad_placement_and_settings_are_refused():
    from retro.base.errors import RetroError

    with pytest.raises(RetroError, match="placement must be one of inside, after, got 'middle'"):
        retrofitted("middle")
    with pytest.raises(TypeError, match="unexpected settings"):
        retrofitted(dim=3)


def test_settings_reach_the_new_parts():
    model = retrofitted(qk_norm=False, smear_keys=False, cca_rotary=True, encoder_input_norm=False)
    cca = model.cca["1"]
    assert cca.qk_gain is None and cca.smear is None and cca.rotary
    assert isinstance(model.encoder_in_norm, torch.nn.Identity)
    default = retrofitted()
    assert not default.cca["1"].rotary and default.cfg.cca_rotary is False
    assert np.isclose(default.cca["1"].rotary_base, default.cfg.rotary_base)
