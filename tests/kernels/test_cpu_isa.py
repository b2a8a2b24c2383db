"""The C++ CPU kernels' instruction-set paths: each one the machine supports (AVX-512, AVX2, the
baseline SSE2/NEON path), forced with RETRO_KERNELS_CPU_ISA in a fresh process, must match the
reference (error-ratio rule, forward and gradients) on shapes that reach every part of the
register-blocked matrix product: row remainders, one-vector column blocks and scalar tails."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retro_kernels import cpu_kernel_isa, has_cpu_kernels

pytestmark = pytest.mark.skipif(not has_cpu_kernels(), reason="needs the C++ extension")

ROOT = Path(__file__).resolve().parents[2]
ISAS = ["default", "avx2", "avx512"]

SCRIPT = r"""
import sys, torch
from retro_kernels import chunked_cross_attention, cpu_kernel_isa, neighbour_self_attention
from tests.helpers.testing import CCACase, check_backend, random_cca

want = sys.argv[1]
if cpu_kernel_isa() != want:
    print("UNSUPPORTED", cpu_kernel_isa())
    sys.exit(0)
torch.manual_seed(0)
cases = [
    CCACase(2, 37, 3, 32, 5, 2, 7, 8),      # few rows and keys: tails everywhere
    CCACase(1, 70, 1, 80, 5, 4, 9, 13),     # head_dim 80: one-vector column blocks and tails
    CCACase(1, 40, 2, 128, 3, 1, 33, 16),   # head_dim 128
    CCACase(1, 256, 2, 64, 4, 2, 128, 64),  # the paper's m, k, r: full tiles
    CCACase(1, 150, 1, 24, 2, 1, 140, 75),  # head_dim 24, more than one key tile, 75 rows
]
for case in cases:
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        q, k, v, m = random_cca(case, mask="random")
        make = lambda b: (lambda q, k, v: chunked_cross_attention(q, k, v, chunk_size=case.chunk_size,
                                                                  neighbour_mask=m, backend=b))
        check_backend(make, (q, k, v), torch.randn_like(q), dtype, "cpu", label=str(case))
for R, D in ((5, 16), (130, 36)):
    q, k, v = (torch.randn(2, 2, 2, R, 2, D, dtype=torch.float64) for _ in range(3))
    m = torch.rand(2, 2, 2, R) > 0.3
    make = lambda b: (lambda q, k, v: neighbour_self_attention(q, k, v, m, backend=b))
    for dtype in (torch.float32, torch.bfloat16):
        check_backend(make, (q, k, v), torch.randn_like(q), dtype, "cpu", label=f"self R{R} D{D}")
print("OK", want)
"""


def test_cpu_kernel_isa_is_reported():
    assert cpu_kernel_isa() in ISAS


@pytest.mark.parametrize("isa", ISAS)
def test_isa_path_matches_reference(isa):
    env = dict(os.environ, RETRO_KERNELS_CPU_ISA=isa,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", SCRIPT, isa], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    if run.stdout.startswith("UNSUPPORTED"):
        pytest.skip(f"this CPU does not run the {isa} path ({run.stdout.strip()})")
    assert f"OK {isa}" in run.stdout
