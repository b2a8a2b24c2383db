"""Compiles the Triton kernels for the GPU (sm_90) on a machine without one: the interpreter runs
the kernels' logic, this catches what only the GPU compiler rejects (types, layouts, shared
memory) before a device ever sees the code. Runs in a subprocess: the kernels must not be in
interpreter mode."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from retro_kernels.ops.block_attention.triton_kernels import block_attention_bwd_kernel, block_attention_fwd_kernel

POINTERS = {"Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV"}
def signature(kernel, dtype, constexprs):
    out = {}
    for name in kernel.arg_names:
        if name in constexprs: out[name] = "constexpr"
        elif name == "MASK": out[name] = "*u8"
        elif name == "LSE": out[name] = "*fp32"
        elif name in POINTERS: out[name] = f"*{dtype}"
        else: out[name] = "fp32" if name == "scale" else "i32"
    return out
results = []
for kernel in (block_attention_fwd_kernel, block_attention_bwd_kernel):
    for dtype, head_dim, mask in (("bf16", 64, True), ("fp16", 128, False), ("fp32", 32, True)):
        c = dict(HAS_MASK=mask, BLOCK_M=64, BLOCK_N=64, BLOCK_D=head_dim,
                 PRECISION="ieee" if dtype == "fp32" else "tf32")
        k = triton.compile(ASTSource(fn=kernel, signature=signature(kernel, dtype, c), constexprs=c),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
        results.append({"kernel": kernel.__name__, "dtype": dtype, "head_dim": head_dim,
                        "cubin_bytes": len(k.asm["cubin"]), "shared": k.metadata.shared})
print(json.dumps(results))
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("this triton build has no bundled ptxas")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 6
    for r in results:
        assert r["cubin_bytes"] > 0 and r["shared"] <= 227 * 1024, r


# --- every configuration the launchers can choose, compiled for sm_90 -------------------------
# `python tests/kernels/test_triton_compile.py` (without TRITON_INTERPRET) compiles them and prints one
# JSON object; the test below runs it and checks the result.

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# q_rows enters the launchers only through next_power_of_2(q_rows) and q_rows > BLOCK_M (a power
# of two), so powers of two and their successors reach every outcome.
Q_ROWS = sorted({1} | {2 ** i for i in range(10)} | {2 ** i + 1 for i in range(10)})
# RETRO_TRITON_AUTOTUNE=full, unset (what a GPU runs) and =0; the last two choose among the first's
# configurations at its block sizes (tests/kernels/test_triton_shortlist.py)
MODES = ("autotune", "shortlist", "default")
FIELDS = ("kernel", "dtype", "BLOCK_M", "BLOCK_D", "float32_partials", "BLOCK_N", "num_warps", "num_stages")


def launchable() -> dict:
    """{task: an example launch} over MODES x dtypes x head_dim 1..256 x Q_ROWS, from the launchers'
    own candidate_configs; a task is a tuple of FIELDS, one kernel compilation (float32 dk/dv
    partials change nothing for float32 inputs, whose dk/dv are float32 anyway)."""
    import torch
    from retro_kernels.ops.block_attention.triton_launch import candidate_configs
    tasks = {}
    for mode in MODES:
        for kernel, backward in (("fwd", False), ("bwd", True)):
            for dtype, name in DTYPES.items():
                for head_dim in range(1, 257):
                    for q_rows in Q_ROWS:
                        c = candidate_configs(getattr(torch, name), head_dim, q_rows, backward, mode)
                        partials = c.float32_partials and dtype != "fp32"
                        for cfg in c.configs:
                            task = (kernel, dtype, c.block_m, c.block_d, partials, cfg.kwargs["BLOCK_N"],
                                    cfg.num_warps, cfg.num_stages)
                            tasks.setdefault(task, f"{mode}: {name}, head_dim {head_dim}, q_rows {q_rows}")
    return tasks


def dominates(a, b) -> bool:
    """Task a needs at least task b's shared memory: same kernel, dtype and num_warps, the rest equal
    or, where shared memory grows with it, at least b's. It grows with BLOCK_D, num_stages and the
    float32 partials always (each buffer is a BLOCK_D-wide tile or independent of it; stages add
    pipeline buffers; partials add store staging); with BLOCK_M and BLOCK_N for float32 (FMA dots:
    every buffer a tile of them) and with BLOCK_N for the 16-bit forward (its dots' kind depends on
    BLOCK_M only). Checked on 1,167 Triton 3.9 compiles: every configuration of every list at every
    block size, none decreasing."""
    grows = {"BLOCK_D", "num_stages", "float32_partials"}
    if a[1] == "fp32":
        grows |= {"BLOCK_M", "BLOCK_N"}
    elif a[0] == "fwd":
        grows |= {"BLOCK_N"}
    return a != b and all(x >= y if f in grows else x == y for f, x, y in zip(FIELDS, a, b))


def specialization(kernel, dtype: str, constexprs: dict, float32_partials: bool):
    """(signature, attrs) as the JIT specializes a launch whose tensors are 16-byte aligned, whose
    integers are multiples of 16 and whose mask is contiguous (stride_mr = 1, a constexpr): the
    common launch, which vectorizes and pipelines its loads."""
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name == "MASK":
            signature[name] = "*u8"
        elif name == "LSE" or (name in ("DK", "DV") and float32_partials):
            signature[name] = "*fp32"
        elif name.isupper():  # the other pointers
            signature[name] = f"*{dtype}"
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
        if name != "scale":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def source(task):
    """Task -> (ASTSource, options) for sm_90."""
    from triton.compiler import ASTSource
    from retro_kernels.ops.block_attention import triton_kernels
    kernel_name, dtype, bm, bd, partials, bn, warps, stages = task
    kernel = getattr(triton_kernels, f"block_attention_{kernel_name}_kernel")
    constexprs = dict(HAS_MASK=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                      PRECISION="ieee" if dtype == "fp32" else "tf32", stride_mr=1)
    signature, attrs = specialization(kernel, dtype, constexprs, partials)
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs), \
        dict(num_warps=warps, num_stages=stages)


def compile_task(task) -> dict:
    """Compiles one task for sm_90 -> its shared memory (bytes) and, but for float32, ptxas's
    registers and spilled bytes (stores + loads). Runs triton.compile's stages; float32 stops after
    LLVM IR, which fixes the shared memory: ptxas takes 10-70 s on each of its FMA-unrolled
    kernels, which spill tens to hundreds of KB."""
    import contextlib
    import io
    import re
    import time

    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    start, src, options = time.perf_counter(), *source(task)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options(options)
    stages = {}
    backend.add_stages(stages, options, src.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    metadata = {"target": target, **options.__dict__}
    last = "llir" if task[1] == "fp32" else "cubin"
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v's registers and spills, printed
    log = io.StringIO()
    names = list(stages)
    with contextlib.redirect_stdout(log):
        for name in names[names.index(src.ext):names.index(last) + 1]:
            module = stages[name](module, metadata)
    regs = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    return {"task": list(task), "shared": metadata["shared"], "seconds": round(time.perf_counter() - start, 1),
            "regs": int(regs.group(1)) if regs else None,
            "spilled": int(spills.group(1)) + int(spills.group(2)) if spills else None}


def shared_by_triton_compile(task) -> int:
    """The shared memory triton.compile itself reports, to check compile_task's stages against."""
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    src, options = source(task)
    with contextlib.redirect_stdout(io.StringIO()):  # a ptxas log, where compile_task asked for one
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).metadata.shared


CROSS_CHECK = ("fwd", "bf16", 128, 128, False, 64, 4, 3)  # pipelined warp-group MMAs, 128 KiB


def twin(task):
    """The bfloat16 task of a float16 one: the same instructions and layouts for another element
    type, the same shared memory (in all 343 calibration pairs)."""
    return (task[0], "bf16") + tuple(task[2:])


def to_compile(tasks) -> list:
    """The tasks no other dominates, the slowest first; float16 through its bfloat16 twin but for
    the largest forward and backward task, compiled to check the twins agree."""
    top = [t for t in tasks if not any(dominates(o, t) for o in tasks)]
    top.sort(key=lambda t: (t[1] != "fp32", -t[3] * (t[2] + t[5])))
    half = [next(t for t in top if t[:2] == (kernel, "fp16")) for kernel in ("fwd", "bwd")]
    return [t for t in top if t[1] != "fp16"] + half


def main() -> None:
    """Prints {"launchable": n, "compiled": [compile_task's results, with an example launch each],
    "cross_check": [compile_task's and triton.compile's shared memory of CROSS_CHECK]}."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    tasks = launchable()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        checks = pool.submit(compile_task, CROSS_CHECK), pool.submit(shared_by_triton_compile, CROSS_CHECK)
        results = list(pool.map(compile_task, to_compile(tasks)))
        cross_check = [checks[0].result()["shared"], checks[1].result()]
    for r in results:
        r["example"] = tasks[tuple(r["task"])]
    print(json.dumps({"launchable": len(tasks), "compiled": results, "cross_check": cross_check}))


def describe(task) -> str:
    return " ".join(f"{f}={v}" for f, v in zip(FIELDS, task))


@pytest.mark.slow
def test_every_launchable_config_fits_sm90_shared_memory(tmp_path):
    """Every configuration candidate_configs lets the launchers choose (the autotune list and the
    RETRO_TRITON_AUTOTUNE=0 default; every dtype, BLOCK_D, BLOCK_M and dk/dv partial case) compiles
    for sm_90 within 227 KiB of shared memory: each task no other dominates is compiled (those it
    dominates need no more; float16 through its bfloat16 twin). ptxas's registers and spills are
    printed, not checked."""
    from retro_kernels.ops.block_attention.triton_limits import MAX_SHARED_MEMORY
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("this triton build has no bundled ptxas")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    results = report["compiled"]
    print(f"{report['launchable']} launchable configurations, {len(results)} compiled "
          f"({sum(r['seconds'] for r in results):.0f} s of compile time)")
    for r in sorted(results, key=lambda r: -r["shared"]):
        print(f"  {describe(r['task'])}: {r['shared']} B shared, {r['regs']} registers, "
              f"{r['spilled']} B spilled  [{r['example']}]")
    over = [f"{describe(r['task'])} [{r['example']}]: {r['shared']} B > {MAX_SHARED_MEMORY} B"
            for r in results if r["shared"] > MAX_SHARED_MEMORY]
    assert not over, "over sm_90's 227 KiB of shared memory:\n" + "\n".join(over)
    assert report["cross_check"][0] == report["cross_check"][1], report["cross_check"]
    shared = {tuple(r["task"]): r["shared"] for r in results}
    assert all(shared[t] == shared[twin(t)] for t in shared if t[1] == "fp16"), "float16 and bfloat16 differ"
    assert all(r["regs"] is not None for r in results if r["task"][1] != "fp32"), "ptxas -v reported no registers"


@pytest.mark.parametrize("mode", MODES)
def test_block_sizes_shrink_only_where_nothing_fits(mode):
    """16-bit inputs at head_dim 64 keep every configuration of the mode's space (the full one; the
    shortlist modes cut it) and the row blocks they always had; float32 at head_dim 129..256 (where
    128 rows fit no configuration) runs row blocks of 64."""
    import torch
    from retro_kernels.ops.block_attention.triton_launch import CONFIGS, candidate_configs
    for dtype in (torch.bfloat16, torch.float16):
        for backward in (False, True):
            for q_rows in Q_ROWS:
                c = candidate_configs(dtype, 64, q_rows, backward, mode)
                assert c.block_m == max(16, min(1 << (q_rows - 1).bit_length(), 128))
                if mode == "autotune":
                    assert c.configs == tuple(CONFIGS[mode][backward])
    for head_dim in (129, 256):
        assert candidate_configs(torch.float32, head_dim, 128, False, mode).block_m == 64


if __name__ == "__main__":
    main()
