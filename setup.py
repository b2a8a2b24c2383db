"""Builds retro_kernels._C with torch's cpp_extension (ninja).

The compiled sources come from csrc/sources.txt, the one list that CMakeLists.txt reads too.
Where torch has CUDA (and nvcc is found) the CUDA kernels and their glue are compiled in;
otherwise a CPU-only extension is built and everything else still works.
Set RETRO_KERNELS_NO_CUDA=1 to force a CPU-only build, RETRO_KERNELS_REQUIRE_CUDA=1 to fail
instead of building one (scripts/cuda_check.sh does).
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CUDA_ARCHS = ("80", "90a")  # kept in step with CMakeLists.txt


def read_sources() -> dict[str, list[str]]:
    """csrc/sources.txt -> {section: [path relative to the repository root]}."""
    sections: dict[str, list[str]] = {}
    current = None
    for raw in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
        else:
            sections[current].append(f"csrc/{line}")
    return sections


def cuda_wheel_include_flags() -> list[str]:
    """-idirafter flags for the headers of the CUDA libraries that torch's CUDA wheels install
    (the nvidia-* packages: cusparse.h, cublas_v2.h, ...), which torch's CUDA headers include. A
    CUDA toolkit with only the compiler and runtime lacks them; searched after every other
    include directory, so a full toolkit's own headers win."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = sorted({str(d) for root in nvidia.__path__ for d in Path(root).glob("*/include") if d.is_dir()})
    return [flag for d in dirs for flag in ("-idirafter", d)]


def extension_modules():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    sources = read_sources()
    missing = [path for paths in sources.values() for path in paths if not (ROOT / path).is_file()]
    if missing:
        raise FileNotFoundError(f"csrc/sources.txt lists files that do not exist: {', '.join(missing)}")
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("RETRO_KERNELS_NO_CUDA") != "1"
    )
    # -fno-trapping-math/-fno-math-errno (as torch itself builds) let the softmax loops vectorise.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-Wno-psabi"]
    if not with_cuda and os.environ.get("RETRO_KERNELS_REQUIRE_CUDA") == "1":
        raise RuntimeError(
            "RETRO_KERNELS_REQUIRE_CUDA=1 but the CUDA extension cannot be built: "
            f"torch {torch.__version__} has CUDA {torch.version.cuda}, CUDA_HOME is {CUDA_HOME}"
        )
    if not with_cuda:
        return [
            CppExtension(
                "retro_kernels._C",
                sources["cpu"],
                extra_compile_args={"cxx": cxx},
                extra_link_args=["-fopenmp"],
            )
        ]
    nvcc = ["-O3", "-std=c++17"] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
    return [
        CUDAExtension(
            "retro_kernels._C",
            sources["cpu"] + sources["cuda"] + sources["cuda-glue"],
            define_macros=[("RETRO_KERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx + cuda_wheel_include_flags(), "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    ]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    packages=find_packages(include=["retro_kernels", "retro_kernels.*"])
    + find_packages("python", include=["retro", "retro.*"]),
    package_dir={"retro": "python/retro"},
    package_data={"retro.serve": ["page.html"]},  # the page of `retro serve`
    ext_modules=extension_modules(),
    cmdclass={"build_ext": build_ext_class()},
)
