"""GPU checks (marker `gpu`; skipped without CUDA): every backend against the float64 reference
with the error-ratio rule in bfloat16 and float16, the Triton backward against autograd through
the reference, the CUDA decode kernel, `train --compile` (inductor, bf16 autocast, fused AdamW)
against eager training, CUDA-graph decoding against eager, FSDP2 on one GPU. Run by
benchmarks/gpu_check.sh on the device (benchmarks/gpu_tests.txt: the cases its first call runs)."""
import pytest
import torch

from retro_kernels import chunked_cross_attention, chunked_cross_attention_decode
from tests.helpers.testing import (CCACase, check_backend, check_decode, check_model_decoding, random_cca,
                                   random_decode_step)

pytestmark = pytest.mark.gpu

CASES = [
    CCACase(2, 37, 3, 32, 5, 2, 7, 8),
    CCACase(2, 2048, 4, 64, 32, 2, 128, 64),   # the paper's shapes
    CCACase(1, 1000, 2, 128, 16, 2, 128, 64),  # head_dim 128, ragged seq_len
    CCACase(1, 300, 2, 80, 5, 3, 100, 64),     # head_dim 80, odd neighbour_len
    CCACase(1, 512, 2, 256, 4, 2, 128, 128),   # head_dim 256, chunk 128
    CCACase(2, 130, 2, 96, 3, 4, 33, 40),      # chunk 40 (not a power of two)
]


def cca(backend, m, mask):
    return lambda q, k, v: chunked_cross_attention(q, k, v, chunk_size=m, neighbour_mask=mask, backend=backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask", [None, "random"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference_on_gpu(case, mask, dtype):
    q, k, v, m = random_cca(case, device="cuda", mask=mask)
    check_backend(lambda b: cca(b, case.chunk_size, m), (q, k, v), torch.randn_like(q), dtype, "triton", "cuda",
                  label=str(case))


def test_triton_float32_on_gpu():
    case = CCACase(2, 300, 2, 64, 5, 2, 50, 64)
    q, k, v, m = random_cca(case, device="cuda")
    check_backend(lambda b: cca(b, 64, m), (q, k, v), torch.randn_like(q), torch.float32, "triton", "cuda",
                  label=str(case))


def test_auto_picks_triton_on_cuda(monkeypatch):
    import retro_kernels.ops.cca.op as op_module
    calls = []
    real = op_module.block_attention
    monkeypatch.setattr(op_module, "block_attention", lambda p, s, b: calls.append(b) or real(p, s, b))
    q, k, v, _ = random_cca(CCACase(1, 64, 2, 64, 1, 2, 8, 64), dtype=torch.bfloat16, device="cuda")
    chunked_cross_attention(q, k, v, chunk_size=64)
    assert calls == ["triton"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
# rows of head_dim 30 (every dtype) and 100 (16-bit dtypes) are not whole 16-byte vectors: they take
# the kernel's element-by-element (scalar) loads; the others its vector loads
@pytest.mark.parametrize("shape", [(3, 2, 32, 2, 7), (64, 16, 64, 2, 128), (8, 32, 128, 2, 128),
                                   (2, 4, 80, 4, 33), (1, 2, 256, 10, 128), (2, 3, 30, 2, 9), (5, 2, 100, 3, 40)],
                         ids=lambda s: "B{}-H{}-D{}-K{}-R{}".format(*s))
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_cuda_decode_matches_reference(shape, dtype, mask):
    B, H, D, K, R = shape
    q, k, v, m = random_decode_step(B, H, D, K, R, device="cuda", mask=mask)
    got = check_decode(q, k, v, m, dtype, "cuda", label=str(shape))
    torch.testing.assert_close(chunked_cross_attention_decode(*(x.to(dtype) for x in (q, k, v)), m), got)  # auto


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 2, 128, 14, 64, 64), (1, 3, 3, 100, 2, 128, 40)],
                         ids=lambda s: "B{}-L{}-K{}-R{}-H{}-D{}-C{}".format(*s))
def test_neighbour_attention_triton_on_gpu(shape, dtype):
    from retro_kernels import neighbour_cross_attention, neighbour_self_attention

    B, L, K, R, H, D, C = shape
    f = dict(dtype=torch.float64, device="cuda")
    q, k, v = (torch.randn(B, L, K, R, H, D, **f) for _ in range(3))
    kc, vc = (torch.randn(B, L, C, H, D, **f) for _ in range(2))
    nm = torch.rand(B, L, K, R, device="cuda") > 0.2
    nm[0, 0, 0] = False
    cm = torch.rand(B, L, C, device="cuda") > 0.2
    for op, (a, b, c, m) in ((neighbour_self_attention, (q, k, v, nm)), (neighbour_cross_attention, (q, kc, vc, cm))):
        check_backend(lambda backend, op=op, m=m: (lambda x, y, z: op(x, y, z, m, backend=backend)), (a, b, c),
                      torch.randn_like(q), dtype, "triton", "cuda", label=f"{op.__name__} {shape}")


def test_retro_model_decoding_matches_full_forward_on_gpu():
    """The fused GPU paths (Triton CCA and encoder in the full pass, the CUDA decode kernel in the
    steps) in float32: the full pass and incremental decoding each within the error-ratio rule of
    the float64 model (testing.check_model_decoding; tests/kernels/test_testing.py runs it on the CPU)."""
    check_model_decoding("cuda")


def test_compiled_training_follows_eager_bf16():
    """`retro train --compile` on the GPU: inductor, bfloat16 autocast, fused AdamW, the Triton
    ops. Error-ratio rule against float32 eager training (same weights, same batch): the compiled
    bf16 losses deviate at most 2x as much as eager bf16's, plus 1e-3 (an eighth of bfloat16's
    eps, 2^-7: a loss averages the rounding of many logits)."""
    from retro.model.model import preset
    from tests.retro.training.test_compile import inputs, run_training

    cfg = preset("tiny", vocab_size=300, max_seq_len=256)
    batch = inputs(cfg, batch=2, chunks=4)
    reference = run_training(torch.float32, None, 4, cfg, batch, device="cuda")
    eager = run_training(torch.float32, None, 4, cfg, batch, device="cuda", bf16=True)
    compiled = run_training(torch.float32, "inductor", 4, cfg, batch, device="cuda", bf16=True)
    torch._dynamo.reset()
    err_eager, err_compiled = (eager - reference).abs().max(), (compiled - reference).abs().max()
    assert err_compiled <= 2 * err_eager + 1e-3, (compiled, eager, reference)


def test_cuda_graph_generation_matches_eager_and_replays_its_graphs():
    """compile_decoding(mode="reduce-overhead"): a whole generation (prefills of three prompt
    lengths, then 70 teacher-forced steps crossing five chunk boundaries, neighbours retrieved at
    each) as CUDA graphs gives the eager step's logits: against float64, its error is at most twice
    the eager float32 error (plus float32 rounding of the logits). A second generation of the same
    shapes replays the graphs recorded by the first, records none, and gives the same logits."""
    import sys
    from dataclasses import replace
    from pathlib import Path

    from torch._dynamo.utils import counters

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    from retro.model.model import RetroModel, preset, recorded_cuda_graphs

    torch.manual_seed(0)
    m, B, prompts, steps, V = 16, 3, [5, 16, 23], 70, 97
    cfg = preset("tiny", vocab_size=V, chunk_size=m, max_seq_len=256, backend="auto")
    model = RetroModel(cfg).cuda().eval()
    exact_model = RetroModel(replace(cfg, backend="reference")).cuda().double().eval()
    exact_model.load_state_dict(model.state_dict())
    tokens = torch.randint(0, V, (B, max(prompts) + steps), device="cuda")
    L = tokens.shape[1] // m + 1
    nb = torch.randint(0, V, (B, L, 2, 2 * m), device="cuda")
    mask = torch.rand(B, L, 2, 2 * m, device="cuda") > 0.2

    def generation(model):
        state = model.new_state(B, 128)
        out = [model.prefill(state, tokens[:, :max(prompts)], nb, mask, prompts)]
        for _ in range(steps):
            pos = state.pos.tolist()
            new = {r: (nb[r, pos[r] // m], mask[r, pos[r] // m]) for r in range(B) if pos[r] % m == m - 1}
            out.append(model.step(state, tokens[torch.arange(B), state.pos], new))
        return torch.stack(out, 1).double()

    with torch.no_grad():
        exact, eager = generation(exact_model), generation(model)
        counters.clear()
        model.compile_decoding(mode="reduce-overhead")
        try:
            graphs = generation(model)       # warm-up, then recording, then replays
            recorded = recorded_cuda_graphs()
            again = generation(model)        # the same shapes: replays only
            assert recorded_cuda_graphs() == recorded > 0, "the second generation recorded new CUDA graphs"
            assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
        finally:
            model.eager_decoding()
            torch._dynamo.reset()
    floor = torch.finfo(torch.float32).eps * exact.abs().max()
    err_eager, err_graphs = (eager - exact).abs().max(), (graphs - exact).abs().max()
    assert err_graphs <= 2 * err_eager + floor, (err_graphs, err_eager, floor)
    assert torch.equal(again, graphs)


def test_sharded_model_on_one_gpu_matches_unsharded():
    """FSDP2 on the GPU (tests/retro/training/test_fsdp.py runs it in CPU processes): fsdp.shard_model on one CUDA
    device (NCCL, one rank; the path of `retro train --fsdp` on a GPU). In float32 the loss and
    every gradient are the unsharded model's on the same GPU; with bf16 the gathered weights
    compute in bfloat16 and the reduced gradients come back float32, within bfloat16's error of the
    float32 ones. The reference backend keeps Triton compiles out."""
    import copy

    from tests.helpers.retrieval_helpers import free_port
    from retro.training import fsdp
    from retro.model.model import RetroModel, preset
    from tests.retro.training.test_fsdp import SMALL

    cfg = preset("tiny", **{**SMALL, "vocab_size": 50, "chunk_size": 4, "max_seq_len": 16, "backend": "reference"})
    plain = RetroModel(cfg).cuda()
    sharded, sharded_bf16 = copy.deepcopy(plain), copy.deepcopy(plain)
    tokens = torch.randint(0, 50, (2, 16), device="cuda")
    neighbours = torch.randint(0, 50, (2, 4, 2, 8), device="cuda")
    mask = torch.rand(2, 4, 2, 8, device="cuda") > 0.2
    torch.distributed.init_process_group("cpu:gloo,cuda:nccl", init_method=f"tcp://127.0.0.1:{free_port()}",
                                         rank=0, world_size=1)
    try:
        fsdp.shard_model(sharded, torch.device("cuda"), bf16=False)
        fsdp.shard_model(sharded_bf16, torch.device("cuda"), bf16=True)
        losses = []
        for model in (plain, sharded, sharded_bf16):
            model.train()
            loss = model(tokens, neighbours, mask).float().square().mean()
            loss.backward()
            losses.append(loss.item())
        grads = [{name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # gathered: needs the group
                  for name, p in model.named_parameters()} for model in (sharded, sharded_bf16)]
    finally:
        torch.distributed.destroy_process_group()
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[2] == pytest.approx(losses[0], rel=5e-2) and losses[2] != losses[0]  # bfloat16 arithmetic
    for name, p in plain.named_parameters():
        for got, exact in zip(grads, (True, False)):
            assert got[name].dtype == torch.float32, (name, got[name].dtype)
            if exact:
                torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
            else:  # bfloat16 has 8 bits of mantissa: a few percent of the gradient's norm
                assert (got[name] - p.grad).norm() <= 0.05 * p.grad.norm() + 1e-6, name
