"""pytest plugin: runs tests as a GPU machine would see them, on a machine without one.

    python -m pytest -p tests.helpers.fake_cuda TESTS   (the repository root on PYTHONPATH; TRITON_INTERPRET unset)

torch.cuda.is_available() says True and device_count() 1, so every `"cuda" if
torch.cuda.is_available() else "cpu"` choice, every gpu-marked test and every Triton backend case
is taken as on a GPU; TRITON_INTERPRET is removed, as on a GPU, so the Triton launchers refuse CPU
tensors exactly as they do there. Creating anything on CUDA (device="cuda", .cuda(), .to("cuda"),
a CUDA generator or stream) reaches torch.cuda's lazy initialisation, which raises ReachedCuda: the
test did put its work on the GPU, and is reported as skipped ("reached CUDA") from there on. What
fails is what would fail on the GPU for a reason that is not the GPU's: a Triton op handed CPU
tensors, a test that mixes devices before its first CUDA tensor, a CUDA-only path taken with CPU
tensors. The summary line counts the tests that reached CUDA (tests/project/test_gpu_test_list.py checks
that the fake took effect)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.pop("TRITON_INTERPRET", None)  # before triton or retro_kernels are imported, as on a GPU


class ReachedCuda(Exception):
    """The test created or touched something on the (absent) CUDA device."""


def _reached(*args, **kwargs):
    raise ReachedCuda("the test reached CUDA (faked as available)")


torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda._lazy_init = _reached  # called by every CUDA tensor creation and transfer
# bookkeeping a GPU machine does for CPU work too (torch.compile saves and restores the CUDA RNG
# state around tracing whenever CUDA is available): harmless, so faked rather than "reached"
torch.cuda.get_rng_state = lambda device="cuda": torch.zeros(16, dtype=torch.uint8)
torch.cuda.set_rng_state = lambda new_state, device="cuda": None

# CUDA paths a CPU-only torch refuses without going through _lazy_init
_CUDA_MESSAGES = ("without ATen_cuda", "accelerator device when none is available", "not compiled with CUDA",
                  "no NVIDIA driver")
_reached_ids: list[str] = []


def reached_cuda(exc: BaseException | None) -> bool:
    """exc, or an exception it was raised from or during, is CUDA being reached."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ReachedCuda) or any(m in str(exc) for m in _CUDA_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and reached_cuda(call.excinfo.value):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, "reached CUDA (faked): the rest needs a GPU")
        _reached_ids.append(item.nodeid)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"fake_cuda: {len(_reached_ids)} reached CUDA")
