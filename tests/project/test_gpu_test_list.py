"""benchmarks/gpu_tests.txt, the GPU run's test list, checked without a GPU: its format (what
gpu_check.sh's `$(grep -v '^\\s*#' ...)` splits into pytest arguments), and a run of the whole list
with CUDA faked as available (tests/helpers/fake_cuda.py): every test either reaches CUDA (it puts its work
on the GPU) or passes on the CPU; one that hands a Triton op CPU tensors, as test_op_boundaries.py
did, fails here as it would on the GPU. The plugin itself is shown to catch that."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIST = ROOT / "benchmarks" / "gpu_tests.txt"


def entries(text: str) -> list[str]:
    """The pytest arguments of a list: what `grep -v '^\\s*#'` keeps, split on whitespace."""
    return [word for line in text.splitlines() if not re.match(r"^\s*#", line) for word in line.split()]


def fake_cuda_run(args: list[str], cwd=ROOT) -> subprocess.CompletedProcess:
    """pytest ARGS in a subprocess with CUDA faked as available and TRITON_INTERPRET unset (a GPU
    machine's environment), one Triton configuration as in the GPU run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python")]),
               RETRO_TRITON_AUTOTUNE="0", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "tests.helpers.fake_cuda", "-rfEs", *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_the_list_is_well_formed():
    """Every non-comment line is one argument, a test file or node id that exists; no duplicates."""
    lines = [line.strip() for line in LIST.read_text().splitlines()]
    args = [line for line in lines if line and not line.startswith("#")]
    assert args, "the list is empty"
    assert entries(LIST.read_text()) == args, "a line holds more than one argument (a space, or a comment after it)"
    assert len(set(args)) == len(args), "duplicates"
    for arg in args:
        path = arg.split("::")[0]
        assert (ROOT / path).is_file(), f"{arg}: no file {path}"
        assert not re.search(r"[*?\s'\"$`]", arg), f"{arg}: characters the shell would expand or split"


@pytest.mark.slow
def test_the_list_runs_with_cuda_faked_as_available():
    """Nothing fails, every argument collects (a stale node id is an error), and CUDA was reached."""
    args = entries(LIST.read_text())
    proc = fake_cuda_run(args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    reached = re.search(r"fake_cuda: (\d+) reached CUDA", out)
    assert reached and int(reached.group(1)) >= len([a for a in args if "test_gpu.py" in a]), out[-3000:]


CATCHES = '''
import torch
from retro_kernels.ops.block_attention import triton_op  # noqa: F401  (registers the Triton ops)


def test_triton_op_on_cpu_tensors():  # test_op_boundaries.py's bug: fine only under the interpreter
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 1, 4, 1, 8)
    torch.ops.retro_kernels.block_attention_fwd_triton(q, k, k, None, 4, 1, 0, 1.0)


def test_work_on_the_gpu():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = torch.randn(1, 4, 1, 8, device=device), torch.randn(1, 1, 4, 1, 8, device=device)
    torch.ops.retro_kernels.block_attention_fwd_triton(q, k, k, None, 4, 1, 0, 1.0)


def test_cpu_work():
    x = torch.randn(3)
    assert torch.equal(x + x, 2 * x)
'''


@pytest.mark.slow
def test_fake_cuda_fails_a_triton_op_on_cpu_tensors(tmp_path):
    """The plugin's own check: the CPU-tensor Triton call fails (as on a GPU), the test that moves
    its tensors to the GPU reaches CUDA (skipped), CPU work passes. Without the plugin (the
    interpreter, CUDA absent) all three pass: only the fake shows the bug."""
    (tmp_path / "test_catches.py").write_text(textwrap.dedent(CATCHES))
    proc = fake_cuda_run([str(tmp_path / "test_catches.py")], cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert "1 failed, 1 passed, 1 skipped" in out, out[-4000:]
    assert "FAILED test_catches.py::test_triton_op_on_cpu_tensors" in out, out[-4000:]
    assert "q is on cpu, expected a CUDA tensor" in out, out[-4000:]
    assert "fake_cuda: 1 reached CUDA" in out, out[-4000:]
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python")])}
    plain = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_catches.py"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert plain.returncode == 0 and "3 passed" in plain.stdout, plain.stdout[-3000:] + plain.stderr[-3000:]


def test_gpu_env_shares_one_cache_folder(tmp_path):
    """Sourcing benchmarks/gpu_env.sh puts Triton's, inductor's and the autotuner's caches in one
    folder (created), and sets a RETRO_TRITON_AUTOTUNE the launchers accept (default: the shortlist)."""
    pytest.importorskip("triton")
    from retro_kernels.ops.block_attention.triton_launch import MODES

    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "RETRO_TRITON_AUTOTUNE"}
    proc = subprocess.run(["bash", "-c", f". {ROOT / 'benchmarks' / 'gpu_env.sh'} && env"], capture_output=True,
                          text=True, env={**env, "GPU_CACHE_DIR": str(cache)}, timeout=30)
    assert proc.returncode == 0, proc.stderr
    got = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert got["TRITON_CACHE_DIR"] == str(cache / "triton")
    assert got["TORCHINDUCTOR_CACHE_DIR"] == str(cache / "inductor")
    assert (cache / "triton").is_dir() and (cache / "inductor").is_dir()
    assert got["TRITON_CACHE_AUTOTUNING"] == got["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"
    assert MODES[got["RETRO_TRITON_AUTOTUNE"]] == "shortlist"
