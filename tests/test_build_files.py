"""The files that build and check the GPU path: csrc/sources.txt names every compiled source and
only files that exist (a wrong name breaks `pip install` on a CUDA machine, which CI's CPU torch
never builds); benchmarks/gpu_check.sh runs every gpu-marked test and stops at its deadline."""
import os
import re
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def listed_sources() -> dict[str, list[str]]:
    sections, current = {}, None
    for raw in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        elif line:
            current.append(line)
    return sections


def test_sources_txt_lists_every_compiled_source_and_each_exists():
    sections = listed_sources()
    assert set(sections) == {"cpu", "cuda", "cuda-glue"}
    listed = [path for paths in sections.values() for path in paths]
    missing = [path for path in listed if not (ROOT / "csrc" / path).is_file()]
    assert not missing, f"csrc/sources.txt lists files that do not exist: {missing}"
    on_disk = sorted(str(p.relative_to(ROOT / "csrc")) for p in (ROOT / "csrc").rglob("*")
                     if p.suffix in (".cpp", ".cu", ".cc"))
    assert sorted(listed) == on_disk, "every C++/CUDA source under csrc/ must be in csrc/sources.txt"
    assert all(p.endswith(".cu") for p in sections["cuda"]) and sections["cuda-glue"]


def test_setup_py_refuses_a_source_list_naming_a_missing_file(tmp_path):
    """setup.py reads the list first and names the missing file (the defect that broke the CUDA
    install: ninja's 'missing and no known rule to make it', after minutes of compiling)."""
    for part in ("setup.py", "pyproject.toml", "README.md"):
        (tmp_path / part).write_text((ROOT / part).read_text())
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "sources.txt").write_text("[cpu]\ntorch/registration.cpp\n")
    proc = subprocess.run(["python", "setup.py", "--name"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "csrc/torch/registration.cpp" in proc.stderr, proc.stderr[-2000:]


def gpu_test_files() -> list[str]:
    line = re.search(r'^GPU_TEST_FILES="([^"]+)"', GPU_CHECK.read_text(), re.M)
    return line.group(1).split()


def test_gpu_check_runs_every_file_with_gpu_tests():
    files = gpu_test_files()
    assert all((ROOT / f).is_file() for f in files), files
    marked = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                    if re.search(r"mark\.gpu|pytestmark = pytest\.mark\.gpu", p.read_text()))
    assert set(marked) <= set(files), f"gpu-marked tests missing from gpu_check.sh: {set(marked) - set(files)}"


def test_gpu_check_stops_at_its_deadline_and_keeps_what_it_wrote(tmp_path):
    """A section that would run past the call's budget is cut there, the run says so, and its
    log is under $OUT. A stand-in python that hangs on the build plays the slow machine."""
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n[[ \" $* \" == *\" setup.py \"* ]] && exec sleep 600\nexit 0\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(out), "CALL_BUDGET_S": "32", "GPU_SECTIONS": "build"}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(GPU_CHECK)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    log = (out / "run.log").read_text()
    assert proc.returncode != 0 and elapsed < 45, (elapsed, log)
    assert "build: CUT" in log and "BUILD FAILED: stopping" in log, log
    assert (out / "build.log").exists()


def test_gpu_check_budgets_fit_a_device_command():
    """Each call's default budget fits a device command (10 min) with its start: <= 9 and 6 min."""
    text = GPU_CHECK.read_text()
    budgets = [int(b) for b in re.findall(r"BUDGET=\$\{CALL_BUDGET_S:-(\d+)\}", text)]
    assert len(budgets) == 2 and budgets[0] <= 540 and budgets[1] <= 360, budgets
