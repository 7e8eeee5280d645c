"""Builds fastbert_kernels._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA.

Environment switches (as flash-attention does):
  FASTBERT_SKIP_CUDA=1          build the CPU kernels only, even with a CUDA torch.
  FASTBERT_CUDA_ARCH_LIST=80;90  compute capabilities for the CUDA build (default 80;90).
  MAX_JOBS=N                    parallel compile jobs (torch's own switch).
Build with `pip install --no-build-isolation -e .` so the torch already installed is used; an
isolated build would pull a different (multi-GB CUDA) torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def extensions() -> list:
    sources = [str(p.relative_to(ROOT)) for p in [CSRC / "ops.cpp", *sorted((CSRC / "cpu").glob("*.cpp"))]]
    # -fopenmp: without it at::parallel_for compiles to a serial loop.
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is left to torch (2.13 passes -std=c++20)
    include_dirs = [str(CSRC / "include")]
    with_cuda = (
        cpp_extension.CUDA_HOME is not None
        and __import__("torch").version.cuda is not None
        and os.environ.get("FASTBERT_SKIP_CUDA", "0") != "1"
    )
    if not with_cuda:
        return [
            cpp_extension.CppExtension(
                "fastbert_kernels._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx},
                extra_link_args=["-fopenmp"],
            )
        ]
    archs = sorted(
        {a.strip() for a in os.environ.get("FASTBERT_CUDA_ARCH_LIST", "80;90").split(";") if a.strip()}, key=int
    )
    # Machine code for each listed architecture, plus PTX of the newest, which the driver compiles
    # for any later GPU (Blackwell and beyond) instead of failing with "no kernel image".
    # No --use_fast_math: expf/logf feed the exit decision, which should match the CPU build.
    nvcc = [
        "-O3",
        "-std=c++20",
        *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs),
        f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}",
    ]
    sources += [str(p.relative_to(ROOT)) for p in sorted((CSRC / "cuda").glob("*.cu"))]
    sources += [str(p.relative_to(ROOT)) for p in sorted((CSRC / "cuda").glob("*.cpp"))]
    return [
        cpp_extension.CUDAExtension(
            "fastbert_kernels._C",
            sources,
            include_dirs=include_dirs,
            # The architectures go into the binary so that availability can check the device.
            define_macros=[("FASTBERT_WITH_CUDA", None), ("FASTBERT_CUDA_ARCHS", f'"{";".join(archs)}"')],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    packages=find_packages(include=["fastbert_kernels", "fastbert_kernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
