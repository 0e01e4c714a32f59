"""Build: the `fusedclip` package lives in python/fusedclip, the Triton kernels in triton_kernels/ (installed as
fusedclip.triton_kernels). The optional CUDA extension fusedclip._C (csrc/) is built when torch has CUDA and nvcc
is found; no GPU needs to be visible. Environment:
  FUSEDCLIP_FORCE_CUDA=1   build the extension even when the checks say no (fails loudly if it cannot)
  FUSEDCLIP_SKIP_CUDA=1    never build it (pure Python install)
  TORCH_CUDA_ARCH_LIST     archs to compile for (default "8.0;9.0+PTX")
  MAX_JOBS                 parallel compile jobs (read by torch's BuildExtension)
Install with `pip install --no-build-isolation .` so the build sees the torch you already have."""

from __future__ import annotations

import glob
import os
import re
import shutil
from typing import Optional

from setuptools import setup

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
_TRUE = ("1", "true", "yes", "on")


def _flag(env: dict, name: str) -> bool:
    return env.get(name, "").strip().lower() in _TRUE


def _find_nvcc(env: dict) -> Optional[str]:
    for home in (env.get("CUDA_HOME"), env.get("CUDA_PATH")):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc", path=env.get("PATH"))


def cuda_build_decision(env: Optional[dict] = None, torch_cuda: Optional[str] = "detect", nvcc: Optional[str] = "detect") -> tuple[bool, str]:
    """(build the extension?, why). torch_cuda / nvcc default to what this machine has; tests pass them in."""
    env = dict(os.environ if env is None else env)
    if _flag(env, "FUSEDCLIP_SKIP_CUDA"):
        return False, "FUSEDCLIP_SKIP_CUDA is set"
    if _flag(env, "FUSEDCLIP_FORCE_CUDA"):
        return True, "FUSEDCLIP_FORCE_CUDA is set"
    if torch_cuda == "detect":
        try:
            import torch

            torch_cuda = torch.version.cuda
        except ImportError:
            return False, "torch is not importable at build time (install with --no-build-isolation)"
    if not torch_cuda:
        return False, "this torch has no CUDA (torch.version.cuda is None)"
    if nvcc == "detect":
        nvcc = _find_nvcc(env)
    if not nvcc:
        return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return True, f"torch CUDA {torch_cuda}, nvcc at {nvcc}"


def arch_token(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST as one shell- and preprocessor-safe token: '8.0;9.0+PTX' -> '8.0_9.0+PTX'."""
    return re.sub(r"[^0-9A-Za-z.+]+", "_", arch_list.strip()) or "none"


def _cuda_extension() -> tuple[list, dict]:
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # read by torch's BuildExtension for the -gencode flags
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))) + sorted(glob.glob(os.path.join("csrc", "kernels", "*.cu")))
    # A bare token (quotes and ';' would not survive the build's shell lines); module.cpp stringifies it.
    archs = "-DFUSEDCLIP_CUDA_ARCHS=" + arch_token(arch_list)
    ext = CUDAExtension(
        name="fusedclip._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc", "kernels")],
        extra_compile_args={"cxx": ["-O3", archs], "nvcc": ["-O3", archs]},
    )
    return [ext], {"build_ext": BuildExtension}


def _extensions() -> tuple[list, dict]:
    build, why = cuda_build_decision()
    print(f"fusedclip: {'building' if build else 'not building'} the CUDA extension fusedclip._C: {why}")
    return _cuda_extension() if build else ([], {})


if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(
        packages=["fusedclip", "fusedclip.backends", "fusedclip.triton_kernels"],
        package_dir={
            "fusedclip": "python/fusedclip",
            "fusedclip.triton_kernels": "triton_kernels",
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
