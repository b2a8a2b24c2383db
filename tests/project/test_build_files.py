"""The files that build the GPU path: csrc/sources.txt names every compiled source and only files
that exist (a wrong name breaks `pip install` on a CUDA machine, which CI's CPU torch never
builds). The GPU check itself (benchmarks/gpu_check.sh) is tested in tests/project/test_gpu_check.py."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
