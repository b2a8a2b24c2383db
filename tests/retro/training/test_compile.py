"""`retro train --compile` (python/retro/training/compile.py) and the model FLOPs (python/retro/model/flops.py):
the forward with retrieval compiles as one graph (and the check sees a graph break when one is
put in), compiled training follows eager training in float32, and the FLOP formula equals a
direct count of the matrix products."""
import os
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from retro.training.compile import compile_for_training, set_fused, use_fused_adamw
from retro.model.flops import forward_flops_per_token, mfu, peak_flops, training_flops_per_token
from retro.model.model import RetroModel, preset
from retro.training.train import TrainOptions, make_optimizer
from retro.training.step import sequence_loss, train_step
from retro_kernels.nn import ChunkedCrossAttention
from retro_kernels._extension import has_triton, triton_interpreting

SMALL = dict(vocab_size=300, chunk_size=16, dim=32, ff_dim=64, heads=2, head_dim=16, enc_dim=32, enc_heads=2,
             enc_head_dim=16, depth=2, cca_layers=(1,), max_seq_len=64)


def inputs(cfg, batch=2, chunks=4, seed=1):
    """tokens and targets (B, n), neighbours (B, L, K, R) and a mask with some padding."""
    g = torch.Generator().manual_seed(seed)
    n, K, R = chunks * cfg.chunk_size, cfg.num_neighbours, cfg.neighbour_len
    tokens = torch.randint(0, cfg.vocab_size, (batch, n), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (batch, n), generator=g)
    neighbours = torch.randint(0, cfg.vocab_size, (batch, chunks, K, R), generator=g)
    mask = torch.rand(batch, chunks, K, R, generator=g) > 0.1
    return SimpleNamespace(tokens=tokens, targets=targets, neighbours=neighbours, neighbour_mask=mask)


# ---- fullgraph compilation ---------------------------------------------------------------------


@pytest.mark.slow
def test_forward_with_retrieval_is_one_graph():
    """The forward with neighbours (the fused CPU ops, checkpointing on and off) traces as one
    graph; compiled with fullgraph=True it gives the eager logits."""
    cfg = preset("tiny", **SMALL)
    model = RetroModel(cfg).train()
    b = inputs(cfg)
    for checkpointing in (False, True):
        model.checkpointing = checkpointing
        explained = torch._dynamo.explain(model)(b.tokens, b.neighbours, b.neighbour_mask)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    model.checkpointing = False
    expected = model(b.tokens, b.neighbours, b.neighbour_mask)
    compile_for_training(model, backend="eager")
    torch.testing.assert_close(model(b.tokens, b.neighbours, b.neighbour_mask), expected, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.skipif(not (has_triton() and triton_interpreting()),
                    reason="needs triton's interpreter (TRITON_INTERPRET=1)")
def test_triton_path_is_one_graph():
    """The GPU's path (backend "triton"; here its kernels under the interpreter): the backend
    checks (has_triton imports triton) must not break the graph; the compiled forward and
    backward give eager's loss and gradients."""
    cfg = preset("tiny", **{**SMALL, "backend": "triton", "enc_depth": 1})
    model = RetroModel(cfg).train()
    b = inputs(cfg, batch=1, chunks=2)
    explained = torch._dynamo.explain(model)(b.tokens, b.neighbours, b.neighbour_mask)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert_compiled_matches_eager(model, b)


@pytest.mark.slow
def test_the_loss_in_checkpointed_slices_is_one_graph(monkeypatch):
    """sequence_loss's forward(..., targets=...) in 8 slices (sliced_loss.py, each under
    torch.utils.checkpoint) traces as one graph; compiled, its loss and gradients are eager's."""
    from retro.model import sliced_loss

    monkeypatch.setattr(sliced_loss, "LOGITS_BUDGET", 2 * SMALL["vocab_size"] * 8)  # 8 positions per slice
    torch.manual_seed(0)
    cfg = preset("tiny", **SMALL)
    model = RetroModel(cfg).train()
    b = inputs(cfg)
    explained = torch._dynamo.explain(model)(b.tokens, b.neighbours, b.neighbour_mask, targets=b.targets)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert_compiled_matches_eager(model, b)


@pytest.mark.slow
def test_a_graph_break_is_seen_and_refused(monkeypatch):
    """The checks above can fail: a graph break put into the CCA layer is counted by explain and
    makes the fullgraph compile raise."""
    real = ChunkedCrossAttention.project_queries

    def with_break(self, x, positions):
        torch._dynamo.graph_break()
        return real(self, x, positions)

    monkeypatch.setattr(ChunkedCrossAttention, "project_queries", with_break)
    cfg = preset("tiny", **SMALL)
    model = RetroModel(cfg)
    b = inputs(cfg)
    explained = torch._dynamo.explain(model)(b.tokens, b.neighbours, b.neighbour_mask)
    assert explained.graph_break_count >= 1
    torch._dynamo.reset()
    compile_for_training(model, backend="eager")
    with pytest.raises(torch._dynamo.exc.Unsupported):
        model(b.tokens, b.neighbours, b.neighbour_mask)
    torch._dynamo.reset()


def assert_compiled_matches_eager(model, b) -> None:
    """sequence_loss and its gradients: eager, then compiled in place (aot_eager), equal."""
    loss = sequence_loss(model, b, world=1)[0]
    loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compile_for_training(model, backend="aot_eager")
    compiled_loss = sequence_loss(model, b, world=1)[0]
    compiled_loss.backward()
    torch._dynamo.reset()
    torch.testing.assert_close(compiled_loss, loss)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)


def run_training(dtype, compile_backend, steps, cfg, batch, device="cpu", bf16=False):
    """Per-step losses of `steps` training steps (the training loop's train_step, with its
    optimizer: fused AdamW when compiled on CUDA) from one initialisation, with weights in dtype
    (and bfloat16 autocast with bf16=True), eager or compiled with compile_backend."""
    torch.manual_seed(0)
    device = torch.device(device)
    model = RetroModel(cfg).to(device=device, dtype=dtype).train()
    if compile_backend is not None:
        compile_for_training(model, compile_backend)
    opts = TrainOptions(db="", out="", lr=3e-3, weight_decay=0.1)
    optimizer = make_optimizer(model, opts, use_fused_adamw(device, compile_backend is not None))
    batch = SimpleNamespace(**{k: v.to(device) for k, v in vars(batch).items()})
    losses = []
    for _ in range(steps):
        result = train_step(model, optimizer, batch, grad_clip=1.0, bf16=bf16)
        losses.append(float(result.nll / result.count))
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager_decomp_partition", pytest.param("inductor", marks=pytest.mark.skipif(
    os.environ.get("RETRO_TEST_INDUCTOR") != "1", reason="inductor's CPU build takes minutes: RETRO_TEST_INDUCTOR=1"))])
def test_compiled_training_follows_eager_float32(backend):
    """Tolerance, derived (flash-attention's error-ratio rule): float32 eager training deviates
    from the same training in float64 by err_eager = max over steps |L32 - L64|; compiled float32
    training (fused ops reorder the rounding) must deviate at most 2 * err_eager + 2 ulp(L)
    (ulp(5.7) = 4.8e-7 in float32: a loss is one float32 rounding of a mean), so that compiled
    and eager differ by at most 3 * err_eager + 2 ulp. Dropout is off (compiled graphs draw other
    random numbers). aot_eager_decomp_partition traces the whole forward and backward as inductor
    receives it (decompositions, min-cut partition, the custom ops through their fakes and
    autograd) and runs it op by op; inductor itself (its CPU code generation takes about two
    minutes on 2 cores) runs with RETRO_TEST_INDUCTOR=1."""
    cfg = preset("tiny", **SMALL)
    batch = inputs(cfg)
    steps = 4
    l64 = run_training(torch.float64, None, steps, cfg, batch)
    l32 = run_training(torch.float32, None, steps, cfg, batch)
    compiled = run_training(torch.float32, backend, steps, cfg, batch)
    torch._dynamo.reset()
    assert (l64[1:] < l64[0]).all()  # it trains
    ulp = torch.finfo(torch.float32).eps * l64.abs().max()
    err_eager = (l32 - l64).abs().max()
    err_compiled = (compiled - l64).abs().max()
    assert err_compiled <= 2 * err_eager + 2 * ulp, (compiled, l32, l64)
    assert (compiled - l32).abs().max() <= 3 * err_eager + 2 * ulp


def test_fused_adamw_choice_and_switch():
    assert use_fused_adamw(torch.device("cuda"), True) and not use_fused_adamw(torch.device("cuda"), False)
    assert not use_fused_adamw(torch.device("cpu"), True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    set_fused(optimizer, False)
    assert all(g["fused"] is None for g in optimizer.param_groups)
    assert all(s["step"].device.type == "cpu" and s["step"].dtype == torch.float32 for s in optimizer.state.values())
    optimizer.step()  # still steps


def test_compile_argument_errors():
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'tvm'"):
        compile_for_training(torch.nn.Linear(2, 2), "tvm")
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got int"):
        compile_for_training(3)


# ---- FLOPs -------------------------------------------------------------------------------------


def counted_flops(model, batch, retrieval: bool, backward: bool) -> int:
    """Matrix-product FLOPs of one forward (and backward) pass counted by torch's FlopCounterMode:
    the reference backend (plain PyTorch products the counter sees, where the fused ops are
    opaque to it) and the math SDPA (products, where the CPU flash kernel has no counted formula)."""
    nb, mask = (batch.neighbours, batch.neighbour_mask) if retrieval else (None, None)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(batch.tokens, nb, mask)
        if backward:
            logits.pow(2).sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("encoder", ["same width", "narrower encoder"])
@pytest.mark.parametrize("retrieval", [pytest.param(True, marks=pytest.mark.slow), False])
def test_flop_formula_equals_a_direct_count(encoder, retrieval):
    """Odd sizes (head_dim 12, ff 72, k = 3, chunk 8, two CCA layers; an encoder narrower than the
    decoder, so the input projection counts): the formula times the tokens equals the count of
    the forward exactly, and training (forward and backward) is 3x it."""
    enc = dict(enc_dim=32, enc_heads=2, enc_head_dim=16) if encoder == "same width" else \
        dict(enc_dim=24, enc_heads=3, enc_head_dim=8)
    cfg = preset("tiny", vocab_size=300, chunk_size=8, dim=32, ff_dim=72, heads=2, head_dim=12, depth=3,
                 cca_layers=(1, 2), num_neighbours=3, max_seq_len=64, backend="reference", **enc)
    model = RetroModel(cfg)
    batch = inputs(cfg, batch=2, chunks=3)
    tokens = batch.tokens.numel()
    n = batch.tokens.shape[1]
    assert counted_flops(model, batch, retrieval, False) == forward_flops_per_token(cfg, n, retrieval) * tokens
    assert counted_flops(model, batch, retrieval, True) == training_flops_per_token(cfg, n, retrieval) * tokens


def test_flops_of_the_paper_sizes():
    """172M without retrieval is about 6 N per token plus attention (12 L a n) and the unembedding;
    retrieval adds the CCA and encoder terms."""
    cfg = preset("172M", vocab_size=32000)
    model = RetroModel(cfg)
    n = 2048
    decoder_params = sum(p.numel() for name, p in model.named_parameters()
                         if name.startswith("layers.") and ".cca" not in name and p.dim() == 2)
    expected = 6 * decoder_params + 12 * cfg.depth * cfg.heads * cfg.head_dim * n + 6 * cfg.dim * cfg.vocab_size
    assert training_flops_per_token(cfg, n, retrieval=False) == expected
    assert training_flops_per_token(cfg, n) > training_flops_per_token(cfg, n, retrieval=False)


def test_peak_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12 == peak_flops("NVIDIA H200")
    assert peak_flops("NVIDIA H100 PCIe") == 756.5e12
    assert peak_flops("AMD EPYC, AVX2, 2 threads") is None
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    assert mfu(1000.0, 1e9, None) is None


def test_flops_argument_errors():
    cfg = preset("tiny", **SMALL)
    with pytest.raises(ValueError, match=r"seq_len must be a positive multiple of chunk_size=16, got 40"):
        forward_flops_per_token(cfg, 40)
    with pytest.raises(ValueError, match="cfg must be a RetroConfig, got dict"):
        forward_flops_per_token({}, 64)
    with pytest.raises(ValueError, match="tokens_per_s must be a number >= 0, got -1"):
        mfu(-1, 1.0, 1.0)
    with pytest.raises(ValueError, match="peak must be a positive number of FLOP/s or None, got 0"):
        mfu(1.0, 1.0, 0)
    with pytest.raises(ValueError, match="device_name must be a string, got None"):
        peak_flops(None)
