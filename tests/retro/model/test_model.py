"""The RETRO model: presets, RETRO[OFF], backends, and incremental decoding that reproduces the
full forward pass across chunk boundaries (float64)."""
import pytest
import torch

from retro.model.config import PRESETS, RetroConfig, paper_cca_layers, preset
from retro.base.errors import RetroError
from retro.model.model import RetroModel


def tiny(**kw):
    args = dict(vocab_size=61, chunk_size=4, dim=32, ff_dim=64, heads=2, head_dim=16, enc_dim=24, enc_heads=2,
                enc_head_dim=12, depth=4, cca_layers=(1, 3), max_seq_len=64, backend="cpu")
    args.update(kw)
    return preset("tiny", **args)


def inputs(B=2, n=23, K=2, R=8, V=61, m=4):
    tok = torch.randint(0, V, (B, n))
    nb = torch.randint(0, V, (B, n // m + 1, K, R))
    mask = torch.rand(B, n // m + 1, K, R) > 0.3
    return tok, nb, mask


def test_paper_presets():
    assert paper_cca_layers(12) == (5, 8, 11)
    assert paper_cca_layers(32) == (5, 8, 11, 14, 17, 20, 23, 26, 29)
    assert paper_cca_layers(4) == (0, 3)  # too shallow for layer 6: every 3rd from the last
    for name in ("172M", "425M", "1.5B", "7.5B"):
        cfg = preset(name)
        assert cfg.enc_dim == 896 and cfg.enc_depth == 2 and cfg.cca_layers == paper_cca_layers(cfg.depth)
    assert preset("172M").dim == 896 and preset("7.5B").depth == 32
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        preset("huge")
    assert set(PRESETS) == {"tiny", "172M", "425M", "1.5B", "7.5B"}


def test_retro_off_and_on_differ_and_encoder_runs_once():
    torch.manual_seed(0)
    model = RetroModel(tiny()).double().eval()
    tok, nb, mask = inputs()
    calls = []
    model.encoder.register_forward_hook(lambda *a: calls.append(1))
    on = model(tok, nb, mask)
    assert len(calls) == 1
    off = model(tok)
    assert not torch.allclose(on, off)
    # positions before the first complete chunk's last token are unaffected by retrieval
    torch.testing.assert_close(on[:, :3], off[:, :3])


def test_backends_agree():
    torch.manual_seed(0)
    tok, nb, mask = inputs()
    outs = []
    for backend in ("reference", "cpu"):
        torch.manual_seed(1)
        model = RetroModel(tiny(backend=backend)).double()
        logits = model(tok, nb, mask)
        logits.square().mean().backward()
        outs.append((logits.detach(), model.embed.weight.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


@pytest.mark.slow
@pytest.mark.parametrize("backend,K,qk_norm", [("reference", 2, False), ("cpu", 2, False), ("cpu", 1, True),
                                                ("reference", 4, True), ("cpu", 4, False)])
def test_incremental_decoding_equals_full_forward(backend, K, qk_norm):
    """Prompts of different lengths in one batch (across chunk boundaries), then token by token;
    neighbours arrive when a chunk completes, as in generation. Any number of neighbours K works,
    whatever the model was configured (trained) with."""
    torch.manual_seed(0)
    model = RetroModel(tiny(backend=backend, qk_norm=qk_norm)).double().eval()
    m = 4
    # every prompt length mod m: 4 and 8 end a chunk (n % m == 0), 3 and 11 stop one token before
    # one completes (n % m == m - 1: the first step encodes it), 5 and 10 stop inside one
    prompts = [3, 4, 5, 8, 10, 11]
    B = len(prompts)
    tok, nb, mask = inputs(B=B, K=K)
    full = model(tok, nb, mask)
    state = model.new_state(B, 32, num_neighbours=K)
    first = model.prefill(state, tok[:, :max(prompts)], nb, mask, prompts)  # one pass, right padding
    logits = {(r, p - 1): first[r] for r, p in enumerate(prompts)}
    for _ in range(12):
        pos = state.pos.tolist()
        new = {r: (nb[r, pos[r] // m], mask[r, pos[r] // m]) for r in range(B) if pos[r] % m == m - 1}
        out = model.step(state, torch.stack([tok[r, pos[r]] for r in range(B)]), new)
        for r in range(B):
            logits[(r, pos[r])] = out[r]
    assert {p % m for p in prompts} == set(range(m))
    for (r, t), got in logits.items():
        torch.testing.assert_close(got, full[r, t], rtol=1e-10, atol=1e-10)
    assert len(logits) == 13 * B


def test_saved_configs_with_the_old_neighbours_key_load():
    """cfg.num_neighbours was saved as "neighbours" by older checkpoints: from_dict reads both names."""
    cfg = tiny(num_neighbours=3)
    assert RetroConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    old["neighbours"] = old.pop("num_neighbours")
    assert RetroConfig.from_dict(old) == cfg and RetroConfig.from_dict(old).num_neighbours == 3
    with pytest.raises(RetroError, match="both 'neighbours' and its new name 'num_neighbours'"):
        RetroConfig.from_dict({**old, "num_neighbours": 3})
    with pytest.raises(RetroError, match="num_neighbours"):
        RetroConfig.from_dict({**old, "neighbours": 0})  # the old key is checked as the new field
    older = cfg.to_dict()
    del older["qk_norm"], older["smear_keys"]  # saved before these existed, when they were off
    with pytest.raises(RetroError, match="lacks qk_norm, smear_keys"):
        RetroConfig.from_dict(older)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="cca_layers must be non-empty .* < depth=4"):
        RetroModel(tiny(cca_layers=(4,)))


def test_feed_forward_width_is_honoured():
    model = RetroModel(tiny(ff_dim=200))
    assert model.layers[0].ff[0].out_features == 200 and model.layers[0].ff[3].in_features == 200


def test_qk_norm_attention_is_the_layer_with_normalised_queries_and_keys():
    """With qk_norm the CCA layer equals the reference op on unit-length q, k times the gain, scale 1."""
    from retro_kernels import ChunkedCrossAttention, chunked_cross_attention_reference

    torch.manual_seed(0)
    layer = ChunkedCrossAttention(16, 2, 8, chunk_size=4, context_dim=12, qk_norm=True, qk_gain=3.0,
                                  backend="cpu").double()
    x, ctx = torch.randn(2, 11, 16, dtype=torch.float64), torch.randn(2, 2, 3, 8, 12, dtype=torch.float64)
    q = layer.project_queries(x, torch.arange(11))
    k, v = layer.project_neighbours(ctx)
    assert torch.allclose(q.norm(dim=-1), torch.full_like(q[..., 0], 3.0))
    assert torch.allclose(k.norm(dim=-1), torch.ones_like(k[..., 0]))
    want = layer.to_out(chunked_cross_attention_reference(q, k, v, chunk_size=4, softmax_scale=1.0).reshape(2, 11, 16))
    torch.testing.assert_close(layer(x, ctx), want)


def greedy_decode(model, tokens, nb, mask, prompts, steps, m=4):
    """Greedy decoding of rows with prompts of the given lengths: neighbours arrive at every
    completed chunk, as in generation -> tokens (B, steps + 1)."""
    B = len(prompts)
    state = model.new_state(B, 32)
    out = [model.prefill(state, tokens[:, :max(prompts)], nb, mask, prompts).argmax(-1)]
    for _ in range(steps):
        pos = state.pos.tolist()
        new = {r: (nb[r, pos[r] // m], mask[r, pos[r] // m]) for r in range(B) if pos[r] % m == m - 1}
        out.append(model.step(state, out[-1], new).argmax(-1))
    return torch.stack(out, 1)


@pytest.mark.slow
def test_compiled_decoding_step_gives_the_eager_greedy_tokens():
    """compile_decoding(): both halves of the step compile whole (fullgraph, the custom decode op
    through its fake), one graph serves every step, and greedy decoding gives the eager tokens."""
    torch.manual_seed(0)
    model = RetroModel(tiny(depth=2, cca_layers=(1,), enc_depth=1)).eval()
    tok, nb, mask = inputs(B=2, n=24, K=2)
    eager = greedy_decode(model, tok, nb, mask, [3, 6], 12)
    torch._dynamo.reset()
    model.compile_decoding()
    try:
        compiled = greedy_decode(model, tok, nb, mask, [3, 6], 12)
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = greedy_decode(model, tok, nb, mask, [3, 6], 12)  # new caches of the same shapes: no recompiling
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, eager) and torch.equal(again, eager)


def greedy_logits(model, tokens, nb, mask, prompts, steps, m=4):
    """As greedy_decode, also returning the logits -> tokens (B, steps + 1), logits (B, steps + 1, V)."""
    B = len(prompts)
    state = model.new_state(B, 32)
    logits = [model.prefill(state, tokens[:, :max(prompts)], nb, mask, prompts)]
    out = [logits[-1].argmax(-1)]
    for _ in range(steps):
        pos = state.pos.tolist()
        new = {r: (nb[r, pos[r] // m], mask[r, pos[r] // m]) for r in range(B) if pos[r] % m == m - 1}
        logits.append(model.step(state, out[-1], new))
        out.append(logits[-1].argmax(-1))
    return torch.stack(out, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("backend,qk_norm", [("cpu", True), ("reference", False)])
def test_batch_prefill_equals_row_by_row_prefill(backend, qk_norm):
    """Greedy generation of prompts of every length mod m prefilled in one batch (right padding)
    gives each row's tokens of that prompt prefilled and decoded alone (batch 1); the logits differ
    only by float rounding (batched matmuls round differently from single-row ones): in float32 by
    no more than a few times the float32 model's own error against float64, and in float64 likewise
    (the float64 bound: the same factor on float64's eps relative to float32's)."""
    torch.manual_seed(0)
    # random weights everywhere (no copy prior, whose zero encoder outputs ignore the chunk states)
    model = RetroModel(tiny(backend=backend, qk_norm=qk_norm, copy_prior=False)).eval()
    exact_model = RetroModel(tiny(backend=backend, qk_norm=qk_norm, copy_prior=False)).double().eval()
    exact_model.load_state_dict(model.state_dict())
    prompts = [3, 4, 5, 8, 10, 11]
    tok, nb, mask = inputs(B=len(prompts), n=32, K=2)

    def row_by_row(model):
        runs = [greedy_logits(model, tok[r:r + 1], nb[r:r + 1], mask[r:r + 1], [p], 12) for r, p in enumerate(prompts)]
        return torch.cat([t for t, _ in runs]), torch.cat([lg for _, lg in runs])

    with torch.no_grad():
        tokens, logits = greedy_logits(model, tok, nb, mask, prompts, 12)
        rows, row_logits = row_by_row(model)
        exact_tokens, exact = row_by_row(exact_model)
        tokens64, logits64 = greedy_logits(exact_model, tok, nb, mask, prompts, 12)
    assert torch.equal(rows, exact_tokens)  # the greedy path is not decided by rounding
    assert logits.abs().amin(-1).max() > 0 and tokens.unique().numel() > 5  # real logits, varied tokens
    assert torch.equal(tokens, rows) and torch.equal(tokens64, exact_tokens)
    rounding = (row_logits.double() - exact).abs().max()  # float32's own error
    assert rounding > 0
    assert (logits - row_logits).abs().max() <= 4 * rounding
    eps_ratio = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
    assert (logits64 - exact).abs().max() <= 4 * rounding * eps_ratio
