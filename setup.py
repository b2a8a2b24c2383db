"""Builds retro_kernels._C with torch's cpp_extension (ninja).

The compiled sources come from csrc/sources.txt, the one list that CMakeLists.txt reads too.
Where torch has CUDA (and nvcc is found) the CUDA kernels and their glue are compiled in;
otherwise a CPU-only extension is built and everything else still works.
Set RETRO_KERNELS_NO_CUDA=1 to force a CPU-only build.
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


def extension_modules():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    sources = read_sources()
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("RETRO_KERNELS_NO_CUDA") != "1"
    )
    # -fno-trapping-math/-fno-math-errno (as torch itself builds) let the softmax loops vectorise.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-Wno-psabi"]
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
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
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
    ext_modules=extension_modules(),
    cmdclass={"build_ext": build_ext_class()},
)
