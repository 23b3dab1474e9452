"""Build script: a plain Python install, plus the CUDA extension ``parallax._C`` when possible.

Metadata lives in pyproject.toml. The extension is built only when the torch in the build
environment is a CUDA build and nvcc is found (``CUDA_HOME``/``PATH``); anywhere else the
install is pure Python and parallax.ops can JIT-build the kernels later or use the torch
references. Set ``PARALLAX_NO_CUDA_EXT=1`` to skip the extension, ``PARALLAX_CUDA_ARCHS`` to
choose targets (default ``80;89;90a``). Build isolation hides the installed torch, so build
with ``pip install --no-build-isolation .`` to get the extension.
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup

CSRC = os.path.join("src", "parallax", "csrc")


def _cuda_extension():
    if os.environ.get("PARALLAX_NO_CUDA_EXT") == "1":
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda is None or not nvcc or not os.path.exists(nvcc):
        return None
    archs = os.environ.get("PARALLAX_CUDA_ARCHS", "80;89;90a").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cu"))) + [os.path.join(CSRC, "binding.cpp")]
    ext = CUDAExtension(
        name="parallax._C",
        sources=sources,
        include_dirs=[os.path.abspath(CSRC)],
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", *gencode]},
    )
    return ext, BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


_built = _cuda_extension()
if _built is None:
    setup()
else:
    setup(ext_modules=[_built[0]], cmdclass={"build_ext": _built[1]})
