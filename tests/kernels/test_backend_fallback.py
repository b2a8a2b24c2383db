"""No silent fallback on the GPU: backend="auto" on CUDA tensors warns once (per op and reason)
when the fused kernel it would pick is missing or cannot take the problem; CPU tensors stay quiet;
resolved_backend is each op's own resolution; the benchmarks refuse to label a fallback as a fused
kernel.

No GPU is needed: resolution reads only the queries' device, dtype and shape, so "CUDA tensors"
are meta tensors whose device reads cuda, and the kernels' availability is monkeypatched."""
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ (a plain `pytest` does not add it)

import retro_kernels.ops.cca.op as cca_op  # noqa: E402
import retro_kernels.ops.cca_decode.op as decode_op  # noqa: E402
import retro_kernels.ops.neighbour_attention.op as neighbour_op  # noqa: E402
from benchmarks import harness  # noqa: E402
from retro_kernels.ops import BackendFallbackWarning, _backends, resolved_backend  # noqa: E402

TRITON_OPS = ("chunked_cross_attention", "neighbour_self_attention", "neighbour_cross_attention")
DECODE = "chunked_cross_attention_decode"
ALL_OPS = (*TRITON_OPS, DECODE)


class _CudaLooking(torch.Tensor):
    """A meta tensor that reports a CUDA device: what backend resolution reads, without a GPU."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def cuda_queries(op: str, head_dim: int = 16, dtype=torch.bfloat16, batch: int = 2, heads: int = 2) -> torch.Tensor:
    """Queries of `op`'s shape that look like CUDA tensors."""
    shape = {"chunked_cross_attention": (batch, 8, heads, head_dim), DECODE: (batch, heads, head_dim)}.get(
        op, (batch, 2, 2, 4, heads, head_dim))
    return torch.Tensor._make_subclass(_CudaLooking, torch.empty(shape, dtype=dtype, device="meta"))


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test starts with no fallback warned about yet."""
    monkeypatch.setattr(_backends, "_warned", set())


def kernels(monkeypatch, triton: bool = True, cuda: bool = True, cpu: bool = True) -> None:
    """Pretends the fused kernels are (un)available in this process."""
    monkeypatch.setattr(_backends, "has_triton", lambda: triton)
    monkeypatch.setattr(_backends, "has_cuda_kernels", lambda: cuda)
    monkeypatch.setattr(_backends, "has_cpu_kernels", lambda: cpu)


def resolve_recording(op: str, q: torch.Tensor, backend: str = "auto") -> tuple[str, list]:
    """(resolved backend, the BackendFallbackWarnings issued), with Python's own once-per-location
    filter off: deduplication must come from retro_kernels."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name = resolved_backend(op, backend, q)
    return name, [w for w in caught if issubclass(w.category, BackendFallbackWarning)]


def assert_warns_once(op: str, q: torch.Tensor, wanted: str, words: tuple[str, ...]) -> None:
    """The first resolution falls back to the reference with one warning naming op, wanted and
    the reason; the second falls back silently."""
    name, caught = resolve_recording(op, q)
    assert name == "reference"
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    for word in (op, repr(wanted), "'reference'", *words):
        assert word in message, f"{word!r} not in {message!r}"
    assert issubclass(caught[0].category, RuntimeWarning)
    again, caught = resolve_recording(op, q)
    assert again == "reference" and caught == [], [str(w.message) for w in caught]


# ---- the warning -----------------------------------------------------------------------------


@pytest.mark.parametrize("op", TRITON_OPS)
def test_missing_triton_warns_once(monkeypatch, op):
    kernels(monkeypatch, triton=False)
    assert_warns_once(op, cuda_queries(op), "triton", ("triton is not installed",))


def test_extension_without_cuda_warns_once_for_decode(monkeypatch):
    kernels(monkeypatch, cuda=False)
    assert_warns_once(DECODE, cuda_queries(DECODE), "cuda", ("retro_kernels._C was built without CUDA",))


@pytest.mark.parametrize("op", TRITON_OPS)
def test_shape_outside_triton_limits_warns_once(monkeypatch, op):
    kernels(monkeypatch)
    assert_warns_once(op, cuda_queries(op, head_dim=300), "triton", ("supports head_dim 1 .. 256; q has head_dim 300",))


def test_dtype_outside_triton_limits_warns(monkeypatch):
    kernels(monkeypatch)
    assert_warns_once("chunked_cross_attention", cuda_queries("chunked_cross_attention", dtype=torch.float64),
                      "triton", ("q has dtype torch.float64",))


def test_shape_outside_cuda_decode_limits_warns_once(monkeypatch):
    kernels(monkeypatch)
    assert_warns_once(DECODE, cuda_queries(DECODE, head_dim=300), "cuda", ("head_dim 300",))


def test_each_reason_warns_once(monkeypatch):
    """Once per op and reason: another reason, or another op, warns again."""
    kernels(monkeypatch)
    op = "chunked_cross_attention"
    assert len(resolve_recording(op, cuda_queries(op, head_dim=300))[1]) == 1
    assert len(resolve_recording(op, cuda_queries(op, head_dim=512))[1]) == 1
    assert len(resolve_recording("neighbour_self_attention", cuda_queries("neighbour_self_attention", 300))[1]) == 1
    assert len(resolve_recording(op, cuda_queries(op, head_dim=300))[1]) == 0


@pytest.mark.parametrize("op, fused", [*((op, "triton") for op in TRITON_OPS), (DECODE, "cuda")])
def test_no_warning_when_the_fused_kernel_runs(monkeypatch, op, fused):
    kernels(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        assert resolved_backend(op, "auto", cuda_queries(op)) == fused
    assert _backends._warned == set()


@pytest.mark.parametrize("op, fused, missing", [*((op, "triton", dict(triton=False)) for op in TRITON_OPS),
                                                (DECODE, "cuda", dict(cuda=False))])
def test_explicit_fused_backend_raises_instead(monkeypatch, op, fused, missing):
    kernels(monkeypatch, **missing)
    with pytest.raises(ValueError, match="cannot run"):
        resolved_backend(op, fused, cuda_queries(op))
    kernels(monkeypatch)
    with pytest.raises(ValueError, match="head_dim"):
        resolved_backend(op, fused, cuda_queries(op, head_dim=300))
    assert _backends._warned == set()


def _cpu_problem(op: str):
    """fn() calling the public op with backend "auto" on small CPU tensors, and its reference."""
    B, L, K, R, H, D, m = 1, 2, 2, 3, 2, 8, 4
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    calls = {
        "chunked_cross_attention": lambda b: cca_op.chunked_cross_attention(
            rnd(B, L * m, H, D), rnd(B, L, K, R, H, D), rnd(B, L, K, R, H, D), chunk_size=m, backend=b),
        "neighbour_self_attention": lambda b: neighbour_op.neighbour_self_attention(
            *(rnd(B, L, K, R, H, D) for _ in range(3)), backend=b),
        "neighbour_cross_attention": lambda b: neighbour_op.neighbour_cross_attention(
            rnd(B, L, K, R, H, D), rnd(B, L, m, H, D), rnd(B, L, m, H, D), backend=b),
        DECODE: lambda b: decode_op.chunked_cross_attention_decode(
            rnd(B, H, D), rnd(B, K, R, H, D), rnd(B, K, R, H, D), backend=b),
    }
    return calls[op]


@pytest.mark.parametrize("op", ALL_OPS)
def test_cpu_tensors_stay_quiet(monkeypatch, op):
    """CPU tensors: no warning, with the C++ kernels or without them (auto runs the reference)."""
    call = _cpu_problem(op)
    for cpu in (True, False):
        kernels(monkeypatch, cpu=cpu)
        with warnings.catch_warnings():
            warnings.simplefilter("error", BackendFallbackWarning)
            torch.manual_seed(0)
            call("auto")
        assert _backends._warned == set()


# ---- one resolution: the op's and resolved_backend's --------------------------------------------


@pytest.mark.parametrize("op, module, resolver", [
    ("chunked_cross_attention", cca_op, "_backend"), (DECODE, decode_op, "_backend"),
    ("neighbour_self_attention", neighbour_op, "_self_backend"),
    ("neighbour_cross_attention", neighbour_op, "_cross_backend")])
def test_resolved_backend_is_the_ops_own_resolution(monkeypatch, op, module, resolver):
    """resolved_backend answers with the function the op calls (the op calls it, once per call); an
    op call that falls back (CPU made to warn, the C++ kernels hidden) issues the warning, and
    resolved_backend then finds it already issued: one code path."""
    real = getattr(module, resolver)
    assert _backends._resolvers[op] is real
    calls = []
    monkeypatch.setattr(module, resolver, lambda backend, q: calls.append(backend) or real(backend, q))
    _cpu_problem(op)("auto")
    assert calls == ["auto"]
    kernels(monkeypatch, cpu=False)
    monkeypatch.setattr(_backends, "WARN_ON_FALLBACK", frozenset({"cpu", "cuda"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _cpu_problem(op)("auto")
    assert [op in str(w.message) and "retro_kernels._C is not built" in str(w.message) for w in caught] == [True]
    assert caught[0].filename == __file__  # points at the caller, not at retro_kernels
    q = torch.empty(1, 2, 8) if op == DECODE else torch.empty(1, 8, 2, 8)
    name, again = resolve_recording(op, q)
    assert (name, again) == ("reference", [])


def test_resolved_backend_names_bad_arguments():
    with pytest.raises(ValueError, match=r"op must be one of \(.*'chunked_cross_attention'.*got 'cca'"):
        resolved_backend("cca", "auto", torch.empty(1, 8, 2, 8))
    with pytest.raises(TypeError, match="q must be a torch.Tensor.*got list"):
        resolved_backend("chunked_cross_attention", "auto", [1, 2])
    with pytest.raises(ValueError, match="backend must be one of"):
        resolved_backend("chunked_cross_attention", "fast", torch.empty(1, 8, 2, 8))


@pytest.mark.slow
def test_fallback_warning_does_not_break_a_compiled_graph(monkeypatch):
    """torch.compile(fullgraph=True) of an op that falls back: the warning is issued while tracing
    (no graph break) and the output is the reference's."""
    kernels(monkeypatch, cpu=False)
    monkeypatch.setattr(_backends, "WARN_ON_FALLBACK", frozenset({"cpu", "cuda"}))
    q, k, v = torch.randn(1, 8, 2, 8), torch.randn(1, 2, 2, 3, 2, 8), torch.randn(1, 2, 2, 3, 2, 8)
    fn = torch.compile(lambda q, k, v: cca_op.chunked_cross_attention(q, k, v, chunk_size=4), fullgraph=True,
                       backend="eager")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn(q, k, v)
    finally:
        torch._dynamo.reset()
    assert [issubclass(w.category, BackendFallbackWarning) for w in caught] == [True]
    torch.testing.assert_close(out, cca_op.chunked_cross_attention(q, k, v, chunk_size=4, backend="reference"))


# ---- the benchmarks' refusal ------------------------------------------------------------------


def test_benchmark_refuses_a_fallback_labelled_fused(monkeypatch):
    kernels(monkeypatch, triton=False)
    op = "chunked_cross_attention"
    with pytest.raises(harness.FallbackLabelError, match=r"'ours \(triton\)'.*runs backend 'reference'"), \
            pytest.warns(BackendFallbackWarning, match="triton is not installed"):
        harness.fused_backend("ours (triton)", op, "auto", cuda_queries(op))
    with pytest.raises(harness.FallbackLabelError, match="neighbour_self_attention runs backend 'reference'"):
        harness.require_fused("RETRO (fused kernels)", {op: "triton", "neighbour_self_attention": "reference"})
    assert harness.ran_backend(op, "auto", cuda_queries(op)) == "reference"  # warned once already


def test_benchmark_records_the_fused_backend(monkeypatch):
    kernels(monkeypatch)
    op = "chunked_cross_attention"
    assert harness.fused_backend("ours (triton)", op, "auto", cuda_queries(op)) == "triton"
    assert harness.labelled_backend(op, "reference", torch.empty(1, 8, 2, 8)) == "reference"
    assert harness.labelled_backend(op, "cpu", torch.empty(1, 8, 2, 8)) == "cpu"
    assert harness.backend_column({op: "triton", "neighbour_self_attention": "triton"}) == "triton"
    assert harness.backend_column({}) == harness.NO_RETRIEVAL


def _tiny_model():
    from retro.model.model import RetroModel, preset

    return RetroModel(preset("tiny", vocab_size=300, chunk_size=16, dim=32, ff_dim=64, heads=2, head_dim=16,
                             enc_dim=32, enc_heads=2, enc_head_dim=16, depth=2, cca_layers=(1,), max_seq_len=64))


def test_model_benchmark_records_and_refuses(monkeypatch):
    """benchmarks.model: the fused variant's cell names what auto resolves to for the model's
    CCA and encoder ops; where auto would fall back (here: the C++ kernels hidden), it raises."""
    from benchmarks.model import FUSED_VARIANT, variant_backends

    model = _tiny_model()
    cfg = model.cfg
    kernels(monkeypatch)
    for decode in (False, True):
        ran = harness.model_backends(model, 2, 4, cfg.num_neighbours, cfg.neighbour_len, torch.float32, decode=decode)
        cca = DECODE if decode else "chunked_cross_attention"
        assert ran == {cca: "cpu", "neighbour_cross_attention": "cpu", "neighbour_self_attention": "cpu"}
        assert variant_backends(FUSED_VARIANT, model, True, True, 2, 4, torch.float32, decode) == "cpu"
    assert variant_backends(FUSED_VARIANT, model, True, False, 2, 4, torch.float32, False) == harness.NO_RETRIEVAL
    kernels(monkeypatch, cpu=False)
    assert variant_backends("RETRO (reference backend)", model, False, True, 2, 4, torch.float32, False) == "reference"
    with pytest.raises(harness.FallbackLabelError, match="RETRO \\(fused kernels\\)"):
        variant_backends(FUSED_VARIANT, model, True, True, 2, 4, torch.float32, False)
