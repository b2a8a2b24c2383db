"""The compiled ops (torch.ops.retro_kernels.*), called directly, with one argument inconsistent with
the others: every size of every tensor argument one larger and one smaller, another dtype, other
strides (not contiguous), another device (meta), another number of dimensions, and out-of-range or
inconsistent integers of the problem's description (q_rows, groups, prefix_rows). Each call
must raise before a kernel reads memory -- ValueError for shapes, strides, devices and ranges,
TypeError for dtypes -- with a message that starts with the op's name and names the argument.
Sizes that an op derives from an argument (rather than checks against another) may change alone:
those calls, and one consistent call per op, must succeed and match the reference, so the checks
cannot be over-strict. The Triton launchers' own checks and limits are tested at the end."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import pytest
import torch

from retro_kernels import (chunked_cross_attention_decode_reference, chunked_cross_attention_reference,
                           neighbour_cross_attention_reference, neighbour_self_attention_reference)
from retro_kernels._extension import has_cpu_kernels, has_cuda_kernels, has_triton, triton_interpreting
from retro_kernels.ops.block_attention import block_attention, block_attention_decode, layouts
from retro_kernels.ops.block_attention.naive import block_attention_reference
from tests.helpers.testing import triton_device

TRITON_OK = has_triton() and (torch.cuda.is_available() or triton_interpreting())
B, N, H, D, L, K, R, M, C = 2, 20, 2, 8, 5, 2, 5, 6, 4
G = 3  # key groups of the decode op
SCALE = 0.3


@dataclass(frozen=True)
class OpSpec:
    op: str                # torch.ops.retro_kernels.<op>
    kind: str              # block (block_attention_fwd/_bwd) or decode (block_attention_decode)
    backward: bool = False
    legit: tuple = ()      # (argument, dimension) whose size may change alone

    @property
    def backend(self) -> str:
        return "triton" if self.op.endswith("_triton") else "cpu"

    @property
    def device(self) -> str:
        """Where the op's tensors live: the C++ ops' on the CPU, the Triton ops' on the GPU when
        there is one (else on the CPU, under the interpreter)."""
        return triton_device() if self.backend == "triton" else "cpu"

    def __str__(self) -> str:
        return self.op


CPP_OPS = [
    OpSpec("block_attention_fwd", "block", legit=(("q", 1),)),
    OpSpec("block_attention_bwd", "block", backward=True),
    OpSpec("block_attention_decode", "decode"),
]
TRITON_OPS = [OpSpec(s.op + "_triton", s.kind, s.backward, s.legit) for s in CPP_OPS if s.kind != "decode"]
OPS = ([pytest.param(s, id=str(s)) for s in CPP_OPS] if has_cpu_kernels() else []) + \
      ([pytest.param(s, id=str(s)) for s in TRITON_OPS] if TRITON_OK else [])
# The description's integers of the consistent block problem, chunked cross-attention's mapping
# with slack: rows 0 .. M-2 attend to nothing, the other 15 rows fill groups 0 .. 2 of M rows (the
# last one M-1), group 3 has no rows, key group 4 is not attended.
DESCRIPTION = {"q_rows": M, "groups": 4, "prefix_rows": M - 1}


def _inputs(kind: str, device="cpu") -> dict:
    """Consistent float32 q, k, v and key_mask of one op kind (mask with some padding)."""
    g = torch.Generator().manual_seed(0)
    q_shape, k_shape = {"block": ((B, N, H, D), (B, L, K * R, H, D)),
                        "decode": ((B, G, H, D), (B, G, K * R, H, D))}[kind]
    x = {name: torch.randn(shape, generator=g).to(device)
         for name, shape in (("q", q_shape), ("k", k_shape), ("v", k_shape))}
    x["key_mask"] = (torch.rand(k_shape[:3], generator=g) > 0.25).to(device)
    return x


def _op(spec: OpSpec):
    return getattr(torch.ops.retro_kernels, spec.op)


def _reference(kind: str, q, k, v, key_mask, q_rows=M, groups=4, prefix_rows=M - 1):
    if kind == "decode":
        return block_attention_reference(q, k, v, key_mask, 1, q.shape[1], 0, SCALE)[0]
    return block_attention_reference(q, k, v, key_mask, q_rows, groups, prefix_rows, SCALE)[0]


@functools.cache
def _forward_outputs(spec: OpSpec):
    """out and lse of the consistent inputs, from the forward op of the same backend."""
    fwd = getattr(torch.ops.retro_kernels, spec.op.replace("_bwd", "_fwd"))
    return fwd(*_inputs(spec.kind, spec.device).values(), *DESCRIPTION.values(), SCALE)


def consistent_args(spec: OpSpec, real: bool = False, device: str | None = None) -> dict:
    """The op's arguments by schema name, all consistent, on `device` (default the op's). A
    backward op gets out and lse of the right shapes and dtypes; their values come from the forward
    op only when `real`."""
    x = _inputs(spec.kind, spec.device if device is None else device)
    if spec.backward:
        q = x["q"]
        out, lse = _forward_outputs(spec) if real else (torch.zeros_like(q), torch.zeros(B, H, N, device=q.device))
        x = {"grad_out": torch.randn_like(q), **x, "out": out, "lse": lse}
    if spec.kind == "block":
        x.update(DESCRIPTION)
    x["softmax_scale"] = SCALE
    return x


def call(spec: OpSpec, args: dict):
    return _op(spec)(*args.values())


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values and shape with every stride doubled."""
    return torch.stack([t, t], dim=-1)[..., 0]


def _resized(t: torch.Tensor, dim: int, delta: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] += delta
    if t.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool, device=t.device)
    return torch.randn(shape, dtype=t.dtype, device=t.device)


def _other_dtype(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.bool, torch.float64) else t.double()


def mutations(spec: OpSpec, device: str | None = None):
    """(argument, description, replacement, expected exception or None for a legal change); the
    tensors on `device` (default the op's)."""
    args = consistent_args(spec, device=device)
    for name, t in args.items():
        if not isinstance(t, torch.Tensor):
            continue
        for dim in range(t.dim()):
            for delta in (1, -1):
                legal = (name, dim) in spec.legit
                yield name, f"size{dim}{delta:+d}", _resized(t, dim, delta), None if legal else ValueError
        yield name, "ndim+1", t[None], ValueError
        yield name, "ndim=1", t.reshape(-1), ValueError
        yield name, "dtype", _other_dtype(t), TypeError
        yield name, "strides", _non_contiguous(t), ValueError
        yield name, "meta", t.to("meta"), ValueError
    yield "q", "int64", args["q"].long(), TypeError
    yield "softmax_scale", "nan", float("nan"), ValueError
    yield "softmax_scale", "inf", float("inf"), ValueError
    if spec.kind == "block":
        # N - prefix_rows = 15 rows in groups of q_rows = 6; 4 groups; 5 key groups.
        yield "q_rows", "0", 0, ValueError
        yield "q_rows", "-1", -1, ValueError
        yield "q_rows", "3", 3, ValueError             # 15 rows need 5 groups of 3
        yield "q_rows", "4", 4, None                   # 4 groups of 4 rows
        yield "q_rows", "2**62", 2 ** 62, None         # all rows in group 0, no overflow
        yield "groups", "-1", -1, ValueError
        yield "groups", "2", 2, ValueError             # 15 rows need 3 groups of 6
        yield "groups", "3", 3, None                   # every group has rows
        yield "groups", "5", 5, None                   # every key group attended
        yield "groups", "6", 6, ValueError             # k has 5 key groups
        yield "prefix_rows", "-1", -1, ValueError      # (21 rows would fit 4 groups of 6)
        yield "prefix_rows", "0", 0, None              # 20 rows
        yield "prefix_rows", "20", N, None             # no row attends
        yield "prefix_rows", "21", N + 1, ValueError   # more than q's rows


@functools.cache
def mutation_table(spec: OpSpec) -> dict:
    """(argument, description) -> (replacement, expected exception); the replacements are only read."""
    return {(name, what): (replacement, error) for name, what, replacement, error in mutations(spec)}


def _cases():
    """The test cases, from mutations on the CPU: collecting creates nothing on a GPU."""
    for p in OPS:
        spec = p.values[0]
        for name, what, _, error in mutations(spec, "cpu"):
            yield pytest.param(spec, name, what, error, id=f"{spec}-{name}-{what}")


@pytest.mark.parametrize("spec, name, what, error", list(_cases()))
def test_inconsistent_argument_is_refused_and_named(spec, name, what, error):
    args = consistent_args(spec)
    args[name] = mutation_table(spec)[name, what][0]
    if error is None:  # a size or an integer the op derives the problem from: legal
        result = call(spec, args)
        if not spec.backward:
            out = result[0] if isinstance(result, tuple) else result
            params = [args[n] for n in ("q", "k", "v", "key_mask")]
            if spec.kind == "block":
                params += [args["q_rows"], args["groups"], args["prefix_rows"]]
            torch.testing.assert_close(out, _reference(spec.kind, *params), rtol=1e-4, atol=1e-5)
        return
    with pytest.raises(error) as info:
        call(spec, args)
    message = str(info.value).splitlines()[0]
    assert message.startswith(f"{spec.op}: "), message
    assert re.search(rf"\b{name}\b", message), f"{name!r} not named in: {message}"


@pytest.mark.parametrize("spec", OPS)
def test_consistent_call_succeeds_and_matches_reference(spec):
    args = consistent_args(spec, real=True)
    x = _inputs(spec.kind, spec.device)
    result = call(spec, args)
    if not spec.backward:
        out = result[0] if isinstance(result, tuple) else result
        torch.testing.assert_close(out, _reference(spec.kind, *x.values()), rtol=1e-4, atol=1e-5)
        if spec.kind == "block":
            lse = block_attention_reference(*x.values(), *DESCRIPTION.values(), SCALE)[1]
            torch.testing.assert_close(result[1], lse, rtol=1e-4, atol=1e-5)
        return
    leaves = [x[n].clone().requires_grad_() for n in ("q", "k", "v")]
    expected = torch.autograd.grad(_reference(spec.kind, *leaves, x["key_mask"]), leaves, args["grad_out"])
    for got, exp in zip(result, expected):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)


# ---- each public op's description (layouts.py), run by each backend ---------------------------------


def _family_inputs(family: str, device="cpu"):
    g = torch.Generator().manual_seed(1)
    shapes = {"cca": ((B, N, H, D), (B, L, K, R, H, D)), "self": ((B, L, K, R, H, D), (B, L, K, R, H, D)),
              "cross": ((B, L, K, R, H, D), (B, L, C, H, D)), "decode": ((B, H, D), (B, K, R, H, D))}
    q_shape, k_shape = shapes[family]
    q, k, v = (torch.randn(s, generator=g).to(device) for s in (q_shape, k_shape, k_shape))
    return q, k, v, (torch.rand(k_shape[:-2], generator=g) > 0.25).to(device)


FAMILIES = {
    "cca": (lambda q, k, v, m: layouts.cca(q, k, v, m, M),
            lambda q, k, v, m: chunked_cross_attention_reference(q, k, v, M, m, SCALE)),
    "self": (layouts.neighbour_self, lambda q, k, v, m: neighbour_self_attention_reference(q, k, v, m, SCALE)),
    "cross": (layouts.neighbour_cross, lambda q, k, v, m: neighbour_cross_attention_reference(q, k, v, m, SCALE)),
}
BACKENDS = (["cpu"] if has_cpu_kernels() else []) + (["triton"] if TRITON_OK else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_description_matches_its_reference(family, backend):
    """layouts.<family> run by the block op of `backend`: the output and the gradients of the
    public op's reference."""
    describe, reference = FAMILIES[family]
    q, k, v, m = _family_inputs(family, triton_device() if backend == "triton" else "cpu")
    grad = torch.randn_like(q)
    got_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    got = block_attention(describe(*got_leaves, m), SCALE, backend)
    exp_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = reference(*exp_leaves, m)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, got_leaves, grad), torch.autograd.grad(expected, exp_leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not has_cpu_kernels(), reason="needs retro_kernels._C")
def test_decode_description_matches_its_reference():
    q, k, v, m = _family_inputs("decode")
    torch.testing.assert_close(block_attention_decode(layouts.decode(q, k, v, m), SCALE),
                               chunked_cross_attention_decode_reference(q, k, v, m, SCALE), rtol=1e-4, atol=1e-5)


# ---- the CUDA decode op (compiled in only with CUDA) ---------------------------------------------


def _cuda_decode_ready():
    if not (torch.cuda.is_available() and has_cuda_kernels()):
        pytest.skip("needs a CUDA build and a GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["q", "k", "v", "neighbour_mask"])
def test_cuda_decode_refuses_inconsistent_arguments(name):
    _cuda_decode_ready()
    spec = OpSpec("block_attention_decode", "decode")
    for arg, what, replacement, error in mutations(spec):
        if arg != name or error is None or what == "meta":
            continue
        args = {n: (t.cuda() if isinstance(t, torch.Tensor) else t) for n, t in consistent_args(spec).items()}
        args[arg] = replacement.cuda()
        with pytest.raises(error, match=rf"^block_attention_decode: .*\b{arg}\b"):
            call(spec, args)
    args = {n: (t.cuda() if isinstance(t, torch.Tensor) else t) for n, t in consistent_args(spec).items()}
    args[name] = args[name].cpu()
    with pytest.raises((ValueError, RuntimeError)):
        call(spec, args)


@pytest.mark.gpu
def test_cuda_decode_limits():
    _cuda_decode_ready()
    op = torch.ops.retro_kernels.block_attention_decode
    q, k = torch.randn(32768, 2, 1, 8, device="cuda"), torch.randn(32768, 2, 2, 1, 8, device="cuda")
    with pytest.raises(ValueError, match=r"block_attention_decode: batch \* key_groups \* heads .* 65536, "
                                         r"expected <= 65535"):
        op(q, k, k, None, 1.0)
    q, k = torch.randn(1, 1, 1, 300, device="cuda"), torch.randn(1, 1, 2, 1, 300, device="cuda")
    with pytest.raises(ValueError, match="block_attention_decode: head_dim .* 300, expected <= 256"):
        op(q, k, k, None, 1.0)
    with pytest.raises(TypeError, match="block_attention_decode: q has dtype torch.float64"):
        op(q.double(), k.double(), k.double(), None, 1.0)
    empty = op(torch.randn(0, 1, 2, 8, device="cuda"), torch.randn(0, 1, 2, 2, 8, device="cuda"),
               torch.randn(0, 1, 2, 2, 8, device="cuda"), None, 1.0)
    assert empty.shape == (0, 1, 2, 8)
    # Several key groups per batch element: each (batch element, group) is one row of the kernel.
    q, k, v, m = (x.cuda() for x in _inputs("decode").values())
    torch.testing.assert_close(op(q, k, v, m, SCALE), _reference("decode", q, k, v, m), rtol=1e-4, atol=1e-5)


# ---- the Triton launchers ------------------------------------------------------------------------


@pytest.fixture
def launch_problem():
    if not TRITON_OK:
        pytest.skip("needs triton and a GPU or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(2, 10, 2, 8, device=dev)                      # 2 groups of 5 rows
    k, v = torch.randn(2, 2, 3, 2, 8, device=dev), torch.randn(2, 2, 3, 2, 8, device=dev)
    mask = torch.ones(2, 2, 3, dtype=torch.bool, device=dev)
    return q, k, v, mask, (5, 2, 0)  # q_rows, groups, prefix_rows


@pytest.mark.parametrize("name, bad, error, words", [
    ("k", lambda t: t[:1].contiguous(), ValueError, ["k", "shape"]),
    ("v", lambda t: t[:, :1], ValueError, ["v", "shape"]),
    ("v", lambda t: t.half(), TypeError, ["v", "dtype"]),
    ("q", lambda t: t.transpose(0, 1).contiguous().transpose(0, 1), ValueError, ["q", "strides"]),
    ("mask", lambda t: t.float(), TypeError, ["mask", "dtype"]),
    ("mask", lambda t: t[:1], ValueError, ["mask", "shape"]),
    ("q", lambda t: t.double(), TypeError, ["q", "dtype"]),
    ("q", lambda t: torch.randn(2, 10, 2, 300, device=t.device), ValueError, ["head_dim", "300", "256"]),
    ("q", lambda t: torch.randn(65536, 10, 1, 8, device=t.device), ValueError, ["batch * heads", "65535"]),
    ("q", lambda t: torch.cat([t, t[:, :1]], 1), ValueError, ["groups", "11 rows"]),
])
def test_triton_launcher_checks(launch_problem, name, bad, error, words):
    from retro_kernels.ops.block_attention import triton_launch

    q, k, v, mask, layout = launch_problem
    args = dict(q=q, k=k, v=v, mask=mask)
    args[name] = bad(args[name])
    if name == "q" and args["q"].shape[0] != 2:  # keep the other tensors consistent with the new batch
        b = args["q"].shape[0]
        args["k"], args["v"] = (torch.zeros(b, 2, 3, 1, 8, device=q.device) for _ in range(2))
        args["mask"] = None
    with pytest.raises(error) as info:
        triton_launch.forward(args["q"], args["k"], args["v"], args["mask"], *layout, SCALE)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_triton_launcher_checks_backward_arguments(launch_problem):
    from retro_kernels.ops.block_attention import triton_launch

    q, k, v, mask, layout = launch_problem
    out, lse = triton_launch.forward(q, k, v, mask, *layout, SCALE)
    good = dict(grad_out=torch.randn_like(q), out=out, lse=lse)
    for name, bad, error in (("grad_out", good["grad_out"][:, :5], ValueError), ("out", out.half(), TypeError),
                             ("lse", lse[:, :1], ValueError), ("lse", lse.double(), TypeError),
                             ("dk", torch.empty_like(k)[:, :1], ValueError)):
        kw = dict(good)
        kw[name] = bad
        extra = {"dk": kw.pop("dk")} if "dk" in kw else {}
        with pytest.raises(error, match=rf"triton block attention backward: {name} "):
            triton_launch.backward(kw["grad_out"], q, k, v, mask, kw["out"], kw["lse"], *layout, SCALE, **extra)


@pytest.mark.skipif(not has_cpu_kernels(), reason="retro_kernels._C not built")
def test_compiled_ops_name_the_module_of_their_fakes():
    """csrc/torch/registration.cpp's set_python_module names the module that registers the fakes:
    torch checks register_fake's caller against it when a fake first runs (a mismatch raises),
    and tells a fake tensor that reaches an op before that module is imported to import it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from retro_kernels.ops.block_attention import native_ops

    for op in ("block_attention_fwd", "block_attention_bwd", "block_attention_decode"):
        assert torch._C._dispatch_pystub(f"retro_kernels::{op}", "")[0] == native_ops.__name__, op
    with FakeTensorMode():
        q, k, v = torch.randn(B, G, H, D), torch.randn(B, G, R, H, D), torch.randn(B, G, R, H, D)
        out = torch.ops.retro_kernels.block_attention_decode(q, k, v, None, SCALE)
    assert out.shape == (B, G, H, D)
