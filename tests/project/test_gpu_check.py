"""The GPU check (benchmarks/gpu_check.sh) and its rows (benchmarks/gpu_rows.py): the schema refuses
a row off it, the declared figures are checked one by one, rows are on disk as soon as they are
emitted, a section cut at its box (or a run stopped by a signal) keeps its rows in the one
tarball, and only the tarball and run.log come back. The CPU rehearsal's own tarball is checked by
test_rehearsal_tarball_holds_every_required_figure, which .ci/run runs after the rehearsal."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks/ (a plain `pytest` does not add it)
from benchmarks import gpu_rows  # noqa: E402

GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def good_row(**overrides) -> dict:
    row = {"machine": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0", "commit": "abc",
           "profile": "gpu", "section": "decode", "mode": "eager", "variant": "RETRO", "config": "172M", "batch": 32,
           "dtype": "bfloat16", "backend": "cuda", "compile": "none", "ms": 3.5, "tokens_per_s": 9142.8}
    return {**row, **overrides}


@pytest.mark.parametrize("key", list(gpu_rows.KEYS))
def test_a_row_without_a_schema_key_or_with_the_wrong_type_is_refused_by_name(key):
    gpu_rows.validate_row(good_row())
    row = good_row()
    del row[key]
    with pytest.raises(gpu_rows.RowError, match=repr(key)):
        gpu_rows.validate_row(row)
    wrong = 1.5 if gpu_rows.KEYS[key] is str else "32"
    with pytest.raises(gpu_rows.RowError, match=repr(key)):
        gpu_rows.validate_row(good_row(**{key: wrong}))


def test_a_row_needs_a_finite_figure_or_an_error():
    with pytest.raises(gpu_rows.RowError, match="'ms'"):
        gpu_rows.validate_row(good_row(ms=math.nan))
    with pytest.raises(gpu_rows.RowError, match="'tokens_per_s'"):
        gpu_rows.validate_row(good_row(tokens_per_s=-1.0))
    bare = {k: v for k, v in good_row().items() if k not in gpu_rows.METRICS}
    with pytest.raises(gpu_rows.RowError, match="figures"):
        gpu_rows.validate_row(bare)
    gpu_rows.validate_row({**bare, "error": "OutOfMemoryError: ..."})
    with pytest.raises(gpu_rows.RowError, match="section"):
        gpu_rows.validate_row(good_row(section="benchmarks"))


def rows_for(profile: str, drop: tuple = ()) -> list[dict]:
    """One row per required figure of `profile` (figures 1, 2, 3, ...), leaving out `drop`."""
    rows = []
    for n, (section, mode, variant, config, batch, dtype, metric) in enumerate(gpu_rows.required_figures(profile)):
        if (section, mode, variant, config, batch, dtype, metric) not in drop:
            keys = good_row(profile=profile, section=section, mode=mode, variant=variant, config=config,
                            batch=batch, dtype=dtype)
            rows.append({**{k: v for k, v in keys.items() if k not in gpu_rows.METRICS}, metric: float(n + 1)})
    return rows


def test_missing_figures_names_each_figure_no_row_holds():
    required = gpu_rows.required_figures("gpu")
    assert gpu_rows.missing_figures(rows_for("gpu"), "gpu") == []
    for figure in (required[0], required[len(required) // 2], required[-1]):
        assert gpu_rows.missing_figures(rows_for("gpu", drop=(figure,)), "gpu") == [figure]
    # a rehearsal's rows are not the GPU run's figures
    assert len(gpu_rows.missing_figures(rows_for("rehearsal"), "gpu")) == len(required)


def test_the_gpu_profile_declares_the_figures_the_check_exists_for():
    need = set(gpu_rows.required_figures("gpu"))
    cca = [f for f in need if f[0] == "cca"]
    assert {f[3] for f in cca} == {"H16 D64 n2048 k2 r128 m64", "H32 D128 n2048 k2 r128 m64"}
    assert {f[1] for f in cca if f[2] == "layer: ours" and f[6] == "pct_bandwidth_floor"} == {"forward",
                                                                                               "forward+backward"}
    assert {f[2] for f in cca if f[2].startswith("bare")} == {"bare: ours", "bare: SDPA", "bare: FlexAttention"}
    assert {(f[1], f[4]) for f in need if f[0] == "decode"} == {(m, b) for m in ("eager", "compiled") for b in (1, 32)}
    assert {(f[1], f[6]) for f in need if f[0] == "training" and f[3] == "172M"} >= {("eager", "mfu_pct"),
                                                                                     ("compiled", "mfu_pct")}
    assert all(f[5] == "bfloat16" for f in need)


def test_an_unsupported_rehearsal_figure_is_held_only_by_a_row_with_its_error():
    (section, mode, variant), = gpu_rows.PROFILES["rehearsal"].unsupported
    figures = [f for f in gpu_rows.required_figures("rehearsal") if f[:3] == (section, mode, variant)]
    rows = rows_for("rehearsal", drop=tuple(figures))
    assert gpu_rows.missing_figures(rows, "rehearsal") == figures
    _, _, _, config, batch, dtype, _ = figures[0]
    failed = {k: v for k, v in good_row(profile="rehearsal", section=section, mode=mode, variant=variant, config=config,
                                        batch=batch, dtype=dtype).items() if k not in gpu_rows.METRICS}
    assert gpu_rows.missing_figures(rows + [{**failed, "error": "NotImplementedError: no backward"}], "rehearsal") == []


def test_emit_appends_each_row_to_the_file_at_once(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    monkeypatch.setenv(gpu_rows.ROWS_ENV, str(path))
    monkeypatch.setenv(gpu_rows.COMMIT_ENV, "0123456789")
    keys = {k: v for k, v in good_row().items() if k not in ("machine", "torch", "triton", "commit", "profile")}
    first = gpu_rows.emit("gpu", "cpu", **keys)
    assert gpu_rows.read_rows(path) == [first] and first["commit"] == "0123456789"
    second = gpu_rows.emit("gpu", "cpu", **{**keys, "batch": 1, "ms": 0.25})
    assert gpu_rows.read_rows(path) == [first, second]
    with pytest.raises(gpu_rows.RowError, match="'batch'"):
        gpu_rows.emit("gpu", "cpu", **{**keys, "batch": 0})
    assert len(gpu_rows.read_rows(path)) == 2  # a refused row is not written


FAKE_PYTHON = """#!/usr/bin/env bash
# plays the benchmarks: cca appends one row, then hangs (the slow GPU); the row checker is real
case " $* " in
  *" benchmarks.cca_gpu "*)
    echo '{row}' >> "$RETRO_GPU_ROWS"; echo "cca: one row written"; exec sleep 600 ;;
  *" benchmarks.gpu_rows "*) exec {python} "$@" ;;
  *" pytest "*) echo "pytest args: $*"; exit 0 ;;
esac
echo "fake python $*"
"""


def run_check(tmp_path, sections: str, budget: int, box: int, stop_after_row: bool = False, **extra):
    """Runs gpu_check.sh (rehearsal; `extra`: more environment) with the fake python; returns
    (returncode, seconds, $OUT)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    fake = tmp_path / "python"
    row = json.dumps(good_row(profile="rehearsal", section="cca", mode="forward", variant="layer: ours",
                              config="H2 D16 n256 k2 r32 m16", batch=2, dtype="float32"))
    fake.write_text(FAKE_PYTHON.replace("{row}", row).replace("{python}", sys.executable))
    fake.chmod(0o755)
    out, work_tmp = tmp_path / "out", tmp_path / "tmp"
    work_tmp.mkdir()
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(out), "TMPDIR": str(work_tmp), "GPU_CHECK_REHEARSAL": "1",
           "CHECK_BUDGET_S": str(budget), "CCA_S": str(box), "GPU_SECTIONS": sections, "RETRO_COMMIT": "0123456789",
           **extra}
    t0 = time.monotonic()
    proc = subprocess.Popen(["bash", str(GPU_CHECK)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    if stop_after_row:  # the device tool stopping the command: TERM to its process group
        while not list(work_tmp.glob("gpu_check.*/rows.jsonl")) and time.monotonic() - t0 < 60:
            time.sleep(0.2)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    return proc.returncode, time.monotonic() - t0, out


def tarball_files(path: Path) -> dict[str, str]:
    """name -> text of each file in the tarball (plots decoded with replacement characters)."""
    with tarfile.open(path) as tar:
        return {m.name.removeprefix("./"): tar.extractfile(m).read().decode(errors="replace")
                for m in tar.getmembers() if m.isfile()}


def test_a_section_cut_at_its_box_keeps_its_rows_and_only_two_files_come_back(tmp_path):
    rc, seconds, out = run_check(tmp_path, "cca", budget=60, box=4)
    log = (out / "run.log").read_text()
    assert rc != 0 and seconds < 40, (rc, seconds, log)
    assert "== cca: CUT at 4 s" in log and "missing figure" in log, log
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check-rehearsal.tar.gz", "run.log"]
    files = tarball_files(out / "gpu_check-rehearsal.tar.gz")
    assert {"rows.jsonl", "info.txt", "logs/cca.log", "run.log"} <= set(files), sorted(files)
    assert "cca: one row written" in files["logs/cca.log"]
    rows = [json.loads(line) for line in files["rows.jsonl"].splitlines()]
    assert len(rows) == 1 and rows[0]["variant"] == "layer: ours"
    assert not list((tmp_path / "tmp").iterdir()), "the work folders are removed"


def test_a_run_stopped_by_a_signal_packs_what_it_measured(tmp_path):
    rc, seconds, out = run_check(tmp_path, "cca decode", budget=120, box=100, stop_after_row=True)
    log = (out / "run.log").read_text()
    assert rc != 0 and seconds < 40, (rc, seconds, log)
    assert "== interrupted" in log and "== decode" not in log, log
    rows = tarball_files(out / "gpu_check-rehearsal.tar.gz")["rows.jsonl"].splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["section"] == "cca"


def test_the_tests_section_runs_the_curated_list_in_its_order(tmp_path):
    listing = tmp_path / "gpu_tests.txt"
    listing.write_text("# most valuable first\ntests/kernels/test_gpu.py::test_b[bf16]  # a comment\n\n"
                       "  tests/test_a.py\n")
    _, _, out = run_check(tmp_path, "tests", budget=60, box=30, GPU_TESTS_LIST=str(listing))
    log = (out / "run.log").read_text()
    assert "--collect-only tests/kernels/test_gpu.py::test_b[bf16] tests/test_a.py\n" in log, log
    listing.write_text("# nothing listed\n")
    _, _, out = run_check(tmp_path / "again", "tests", budget=60, box=30, GPU_TESTS_LIST=str(listing))
    assert "--collect-only tests/kernels/test_gpu.py\n" in (out / "run.log").read_text()


def test_the_budgets_fit_one_device_command():
    """One command: <= 480 s on the GPU (a device command may run 10 min, the machine's start takes
    some of the 15), the four figure sections' boxes with the packing margin within it; the
    rehearsal within 3 minutes."""
    text = GPU_CHECK.read_text()
    budgets = dict(re.findall(r"PROFILE=(\w+) BUDGET=\$\{CHECK_BUDGET_S:-(\d+)\}", text))
    assert int(budgets["gpu"]) <= 480 and int(budgets["rehearsal"]) <= 170, budgets
    build = int(re.search(r'section build "\$\{BUILD_S:-(\d+)\}" env', text).group(1))
    boxes = [int(b) for b in re.search(r'PROFILE" = gpu \]; then boxes=\(([\d ]+)\)', text).group(1).split()]
    assert build + sum(boxes) + 15 <= int(budgets["gpu"]), (build, boxes)
    assert re.search(r"timeout_s 5\d\d", text), "the header gives the device command's timeout"


def test_rehearsal_tarball_holds_every_required_figure():
    """The CPU rehearsal's tarball (.ci/run: GPU_CHECK_REHEARSAL=1 bash benchmarks/gpu_check.sh, then
    this test with GPU_CHECK_TARBALL set) holds a row for every figure the GPU run must produce."""
    path = os.environ.get("GPU_CHECK_TARBALL")
    if not path:
        pytest.skip("set GPU_CHECK_TARBALL to a rehearsal's tarball (.ci/run does, after the rehearsal)")
    files = tarball_files(Path(path))
    assert {"rows.jsonl", "run.log", "info.txt"} <= set(files)
    rows = gpu_rows.read_rows(path)
    for row in rows:
        gpu_rows.validate_row(row)
    assert {r["profile"] for r in rows} == {"rehearsal"}
    assert gpu_rows.missing_figures(rows, "rehearsal") == []
    assert {r["section"] for r in rows} >= {"cca", "decode", "training"}
