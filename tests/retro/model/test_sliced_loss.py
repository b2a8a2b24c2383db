"""The next-token NLL a slice of the sequence at a time (python/retro/model/sliced_loss.py), through the
models' forward(..., targets=...): in float64 it equals cross_entropy on the whole logits, values
and gradients (hidden states, output weights, every trainable weight), for odd shapes; no slice's
logits are kept for the backward pass; a retrofitted Hugging Face model's output layer (Gemma's
logit soft-capping, Cohere's and Granite's scalings) is reproduced, and where it is not, the
model says so once and falls back to the whole logits."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM,
                          Gemma3TextConfig, GraniteConfig, GraniteForCausalLM)

from retro.retrofitting.wrapper import hf_head
from retro.model import sliced_loss
from retro.base.defaults import IGNORE
from retro.model.model import RetroModel, preset
from retro.retrofitting.wrapper import retrofit
from retro.model.sliced_loss import slice_length, sliced_nll
from retro.training.step import sequence_loss
from tests.retro.retrofitting.test_retrofit import MODELS, SMALL_LLAMA

SMALL = dict(vocab_size=300, chunk_size=8, dim=32, ff_dim=64, heads=2, head_dim=16, enc_dim=32, enc_heads=2,
             enc_head_dim=16, depth=2, cca_layers=(1,), max_seq_len=64)
SOFTCAP = 0.1  # far below the raw logits of the tiny Gemmas: the cap shapes every logit
FAMILIES = {
    **{k: MODELS[k] for k in ("gpt2", "llama")},
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**SMALL_LLAMA, head_dim=8, final_logit_softcapping=SOFTCAP)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**SMALL_LLAMA, head_dim=8, final_logit_softcapping=SOFTCAP)),
    "cohere": lambda: CohereForCausalLM(CohereConfig(**SMALL_LLAMA, logit_scale=0.25)),
    "granite": lambda: GraniteForCausalLM(GraniteConfig(**SMALL_LLAMA, logits_scaling=4.0)),
}


def reference_nll(logits, targets):
    """cross_entropy on the whole logits (B, n, V) -> (B, n), 0 at IGNORE."""
    return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")


def with_ignored(targets, seed=0):
    """targets with some positions (and the whole of row 0's last 3) set to IGNORE."""
    g = torch.Generator().manual_seed(seed)
    targets = targets.clone()
    targets[torch.rand(targets.shape, generator=g) < 0.2] = IGNORE
    targets[0, -3:] = IGNORE
    return targets


def assert_same_gradients(got, want, tensors, rtol):
    """The gradients w.r.t. tensors of the NLLs got and want (B, n), each token weighed differently
    (so each position's gradient counts), agree."""
    weights = torch.rand(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(2))
    got_grads = torch.autograd.grad((got * weights).sum(), tensors, retain_graph=True)
    want_grads = torch.autograd.grad((want * weights).sum(), tensors, retain_graph=True)
    assert any(g.abs().sum() > 0 for g in got_grads)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        torch.testing.assert_close(g, w, rtol=rtol, atol=1e-12, msg=lambda m: f"tensor {i}: {m}")


# ---- the function ----------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 3, 4, 13, 50, None])
def test_sliced_nll_equals_cross_entropy_on_the_whole_logits(length):
    """B = 3, n = 13 (not a multiple of most lengths), IGNORE targets; the loss weighs each token
    differently, so each position's gradient is checked."""
    torch.manual_seed(0)
    B, n, d, V = 3, 13, 8, 11
    hidden = torch.randn(B, n, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    targets = with_ignored(torch.randint(0, V, (B, n)))
    calls = []

    def logits_fn(h):
        assert h.is_contiguous()  # one matrix product, not B of them with the weight expanded B times
        calls.append(h.shape[1])
        return F.linear(h, weight)

    got = sliced_nll(hidden, targets, logits_fn, V, length)
    forward_calls = list(calls)
    want = reference_nll(F.linear(hidden, weight), targets)
    assert got.dtype == torch.float64 and got.shape == (B, n)
    assert (got[targets == IGNORE] == 0).all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert_same_gradients(got, want, [hidden, weight], 1e-12)
    step = n if length is None else length  # the default budget holds the whole (tiny) sequence
    assert forward_calls == [min(step, n - s) for s in range(0, n, step)]
    # each slice's logits recomputed in the backward pass; a single slice is not
    assert len(calls) == (2 * len(forward_calls) if len(forward_calls) > 1 else 1)
    with torch.no_grad():
        torch.testing.assert_close(sliced_nll(hidden, targets, logits_fn, V, length), want.detach(), rtol=1e-12,
                                   atol=1e-12)


def test_no_logits_are_kept_for_the_backward_pass():
    """What the forward leaves for the backward: the hidden states and targets of the slices,
    never a tensor with V columns (a slice's logits, their float32 copy or log-softmax)."""
    B, n, d, V = 2, 12, 8, 1000
    hidden = torch.randn(B, n, d, requires_grad=True)
    weight = torch.randn(V, d, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        nll = sliced_nll(hidden, torch.randint(0, V, (B, n)), lambda h: F.linear(h, weight).bfloat16(), V, 5)
    assert saved and not any(shape and shape[-1] == V for shape in saved), saved
    nll.sum().backward()
    assert hidden.grad.shape == hidden.shape and weight.grad.abs().sum() > 0


def test_slice_length_follows_the_logits_budget():
    assert slice_length(8, 262144) == 2 ** 25 // (8 * 262144) == 16
    assert slice_length(16, 128000) == 16
    assert slice_length(256, 262144) == 1  # more rows than the budget: one position at a time
    assert slice_length(2, 100) == 2 ** 25 // 200
    assert slice_length(2, 100, budget=1000) == 5


@pytest.mark.parametrize("call, error, message", [
    (lambda h, t: sliced_nll(h[0], t, F.relu, 4), ValueError,
     r"hidden must be a \(B, n, d\) tensor, got shape \(3, 4\)"),
    (lambda h, t: sliced_nll(h, t[:, :2], F.relu, 4), ValueError, r"targets must be a \(B, n\) = \(2, 3\) tensor"),
    (lambda h, t: sliced_nll(h, t.float(), F.relu, 4), TypeError,
     "targets must hold integer token ids .* got dtype torch.float32"),
    (lambda h, t: sliced_nll(h, t, F.relu, 4, 0), ValueError, "length must be an integer >= 1, got 0"),
    (lambda h, t: slice_length(0, 4), ValueError, "batch must be an integer >= 1, got 0"),
    (lambda h, t: slice_length(2, 4, budget=2.5), ValueError, "budget must be an integer >= 1, got 2.5"),
])
def test_bad_input_is_refused_by_name(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))


# ---- RetroModel --------------------------------------------------------------------------------------


def retro_inputs(cfg, B=2, n=29, seed=1):
    """n = 29: 3 complete chunks of 8 and 5 tokens of a 4th."""
    g = torch.Generator().manual_seed(seed)
    L, K, R = n // cfg.chunk_size, cfg.num_neighbours, cfg.neighbour_len
    return (torch.randint(0, cfg.vocab_size, (B, n), generator=g),
            torch.randint(0, cfg.vocab_size, (B, L, K, R), generator=g),
            torch.rand(B, L, K, R, generator=g) > 0.2,
            with_ignored(torch.randint(0, cfg.vocab_size, (B, n), generator=g), seed))


@pytest.mark.parametrize("budget, slices", [(2 * 300 * 4, 8), (1, 29)])  # slices of 4 positions (the last 1); of 1
def test_retro_model_targets_give_the_whole_logits_loss(monkeypatch, budget, slices):
    """forward(..., targets) in slices (LOGITS_BUDGET made small) = cross_entropy on forward's
    logits, in float64: values and the gradient of every weight (the tied embedding included)."""
    torch.manual_seed(0)
    cfg = preset("tiny", **SMALL)
    model = RetroModel(cfg).double().train()
    tokens, nb, mask, targets = retro_inputs(cfg)
    monkeypatch.setattr(sliced_loss, "LOGITS_BUDGET", budget)
    calls = []
    real = model._logits
    monkeypatch.setattr(model, "_logits", lambda x: calls.append(x.shape[1]) or real(x))
    params = [p for p in model.parameters() if p.requires_grad]
    got = model(tokens, nb, mask, targets=targets)
    assert len(calls) == slices
    want = reference_nll(model(tokens, nb, mask), targets)
    assert got.dtype == torch.float64 and got.shape == targets.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert_same_gradients(got, want, params, 1e-9)


def test_sequence_loss_is_the_summed_cross_entropy(monkeypatch):
    """train_step.sequence_loss (now the targets path) = the summed cross_entropy of the whole
    logits over the scored targets, in float32 and under bfloat16 autocast (float32 NLL)."""
    torch.manual_seed(0)
    cfg = preset("tiny", **SMALL)
    model = RetroModel(cfg).train()
    tokens, nb, mask, targets = retro_inputs(cfg)
    monkeypatch.setattr(sliced_loss, "LOGITS_BUDGET", 2 * 300 * 3)

    class Batch:
        pass
    batch = Batch()
    batch.tokens, batch.neighbours, batch.neighbour_mask, batch.targets = tokens, nb, mask, targets
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, nll, count = sequence_loss(model, batch, world=2)
            logits = model(tokens, nb, mask).float()
        want = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="sum")
        assert nll.dtype == torch.float32 and count == (targets != IGNORE).sum()
        torch.testing.assert_close(nll, want.detach(), rtol=1e-5 if bf16 else 1e-6, atol=0)
        torch.testing.assert_close(loss, 2 * want / count, rtol=1e-5 if bf16 else 1e-6, atol=0)


# ---- retrofitted Hugging Face models -----------------------------------------------------------------


def retrofitted(family):
    torch.manual_seed(0)
    hf = FAMILIES[family]().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the check passes: no fallback warning
        model = retrofit(hf, chunk_size=4, backend="cpu", encoder=dict(dim=24, head_dim=12)).double()
    with torch.no_grad():
        for layer in model.cca.values():
            layer.to_out.weight.normal_(0, 0.5)  # CCA changes the states the output layer reads
    return model


def hf_inputs(n=23, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 100, (B, n), generator=g), torch.randint(0, 100, (B, n // 4 + 1, 2, 8), generator=g),
            torch.rand(B, n // 4 + 1, 2, 8, generator=g) > 0.3,
            with_ignored(torch.randint(0, 100, (B, n), generator=g), seed))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_retrofitted_targets_give_the_whole_logits_loss(monkeypatch, family):
    """forward(..., targets) in slices of 3 positions (the last of 2) = cross_entropy on the base's
    own logits (the hooks' CCA included), with and without neighbours, in float64: values and the
    gradients of the new weights."""
    model = retrofitted(family).train()
    assert model.sliced_head is True
    tokens, nb, mask, targets = hf_inputs()
    monkeypatch.setattr(sliced_loss, "LOGITS_BUDGET", 2 * model.cfg.vocab_size * 3)
    params = [p for p in model.parameters() if p.requires_grad]
    for args in ((nb, mask), ()):
        got = model(tokens, *args, targets=targets)
        want = reference_nll(model(tokens, *args), targets)
        assert got.dtype == torch.float64 and got.shape == targets.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        if args:
            assert_same_gradients(got, want, params, 1e-9)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_the_gemma_soft_cap_is_applied(family):
    """The tiny Gemmas' raw logits exceed the cap many times over and their logits stay below it:
    the sliced loss (equal to the whole logits' in the test above) goes through the cap."""
    model = retrofitted(family).eval()
    tokens, nb, mask, _ = hf_inputs()
    with torch.no_grad():
        states = model._decoder_states(tokens, nb, mask)
        raw = model.base.get_output_embeddings()(states)
        logits = model._head_logits(states)
    assert raw.abs().max() > 2 * SOFTCAP and logits.abs().max() < SOFTCAP
    torch.testing.assert_close(logits, model(tokens, nb, mask), rtol=0, atol=0)


def test_a_head_that_does_not_reproduce_the_logits_falls_back_with_one_warning(monkeypatch):
    """A head without Gemma's soft cap (the check sees its logits differ): one RuntimeWarning at
    construction, then the loss comes from the whole logits, still equal to cross_entropy's."""
    monkeypatch.setattr(hf_head, "head_logits", lambda hf, states: hf.get_output_embeddings()(states))
    torch.manual_seed(0)
    hf = FAMILIES["gemma2"]().double()
    with pytest.warns(RuntimeWarning, match=r"Gemma2ForCausalLM: its decoder states and output layer do not reproduce "
                                            r"its logits \(logits differing by up to"):
        model = retrofit(hf, chunk_size=4, backend="cpu", encoder=dict(dim=24, head_dim=12)).double()
    assert model.sliced_head is False
    tokens, nb, mask, targets = hf_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # warned once, not at every call
        got = model(tokens, nb, mask, targets=targets)
        got_again = model(tokens, nb, mask, targets=targets)
    want = reference_nll(model(tokens, nb, mask), targets)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_again, got, rtol=0, atol=0)
    # the sliced (uncapped) head would have given another loss: the fallback is what kept it right
    wrong = sliced_nll(model._decoder_states(tokens, nb, mask), targets, model._head_logits, 100)
    assert (wrong - want).abs().max() > 1e-3


def test_a_head_that_raises_falls_back_too(monkeypatch):
    def broken(hf, **kwargs):
        raise AttributeError("no decoder here")

    monkeypatch.setattr(hf_head, "decoder_states", broken)
    with pytest.warns(RuntimeWarning, match=r"\(AttributeError: no decoder here\)"):
        model = retrofit(MODELS["llama"]().double(), chunk_size=4, backend="cpu",
                         encoder=dict(dim=24, head_dim=12)).double()
    tokens, nb, mask, targets = hf_inputs()
    torch.testing.assert_close(model(tokens, nb, mask, targets=targets),
                               reference_nll(model(tokens, nb, mask), targets), rtol=1e-10, atol=1e-12)
