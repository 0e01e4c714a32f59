"""Build: the `fusedclip` package lives in python/fusedclip, the Triton kernels in triton_kernels/ (installed as
fusedclip.triton_kernels). The optional CUDA extension fusedclip._C (csrc/) is built when torch has CUDA and a CUDA
toolkit is found (CUDA_HOME, CUDA_PATH, the nvcc on PATH, /usr/local/cuda: see find_cuda_home); no GPU needs to be
visible. The optional host extension fusedclip._host (csrc/host/, C++ only: the steady-state fast path's per-call
check, and the torch backend's CPU passes in one OpenMP region) is built whenever torch is importable and a C++
compiler is found; if its build fails, the install goes on without it (fusedclip then checks in Python, more slowly,
and the torch backend runs its per-op CPU path) and says why. Environment:
  FUSEDCLIP_FORCE_CUDA=1   build the extension even when the checks say no (fails loudly if it cannot)
  FUSEDCLIP_SKIP_CUDA=1    never build it (pure Python install)
  FUSEDCLIP_SKIP_HOST_EXT=1  never build fusedclip._host
  TORCH_CUDA_ARCH_LIST     archs to compile for (default "8.0;9.0+PTX")
  MAX_JOBS                 parallel compile jobs (read by torch's BuildExtension)
Install with `pip install --no-build-isolation .` so the build sees the torch you already have."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from typing import Optional

from setuptools import setup

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
_TRUE = ("1", "true", "yes", "on")


def _flag(env: dict, name: str) -> bool:
    return env.get(name, "").strip().lower() in _TRUE


def _is_toolkit(home: Optional[str]) -> bool:
    """A CUDA toolkit root: bin/nvcc to compile with, include/cuda_runtime.h for the host side."""
    return bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
        os.path.join(home, "include", "cuda_runtime.h")
    )


def _nvcc_top(nvcc: str) -> Optional[str]:
    """The toolkit root an nvcc reports (`#$ TOP=...` of a dry run); right even when `nvcc` is a wrapper script
    in another folder (e.g. /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc)."""
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-v", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            check=False, capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.normpath(m.group(1).strip()) if m else None


def find_cuda_home(env: Optional[dict] = None) -> tuple[Optional[str], str]:
    """(CUDA toolkit root or None, how it was found or why none was). In order: CUDA_HOME, CUDA_PATH, the
    toolkit of the nvcc on PATH (as nvcc itself reports it), /usr/local/cuda; each must hold bin/nvcc and
    include/cuda_runtime.h. torch's cpp_extension reads CUDA_HOME when it is imported, so setup.py settles it
    first (torch's own guess, the parent of the nvcc on PATH, is wrong for a wrapper script)."""
    env = dict(os.environ if env is None else env)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = env.get(var)
        if home:
            if _is_toolkit(home):
                return home, f"{var}={home}"
            return None, f"{var}={home} is not a CUDA toolkit (it needs bin/nvcc and include/cuda_runtime.h)"
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        for home in (_nvcc_top(nvcc), os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))):
            if _is_toolkit(home):
                return home, f"the toolkit of {nvcc}: {home}"
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda", "/usr/local/cuda"
    if nvcc:
        return None, f"{nvcc} is on PATH but no toolkit root with include/cuda_runtime.h was found (set CUDA_HOME)"
    return None, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"


def cuda_build_decision(
    env: Optional[dict] = None, torch_cuda: Optional[str] = "detect", cuda_home: Optional[str] = "detect"
) -> tuple[bool, str]:
    """(build the extension?, why). torch_cuda / cuda_home default to what this machine has; tests pass them in."""
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
    how = "given"
    if cuda_home == "detect":
        cuda_home, how = find_cuda_home(env)
    if not cuda_home:
        return False, how
    return True, f"torch CUDA {torch_cuda}, CUDA toolkit {cuda_home} ({how})"


def arch_token(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST as one shell- and preprocessor-safe token: '8.0;9.0+PTX' -> '8.0_9.0+PTX'."""
    return re.sub(r"[^0-9A-Za-z.+]+", "_", arch_list.strip()) or "none"


def _cuda_extension() -> tuple[list, dict]:
    home, how = find_cuda_home()
    if home is None:  # only when FUSEDCLIP_FORCE_CUDA overrode the decision
        raise RuntimeError(f"fusedclip: FUSEDCLIP_FORCE_CUDA is set but no CUDA toolkit was found: {how}")
    os.environ["CUDA_HOME"] = home  # before cpp_extension is imported: it reads CUDA_HOME once, at import
    if "torch.utils.cpp_extension" in sys.modules and sys.modules["torch.utils.cpp_extension"].CUDA_HOME != home:
        raise RuntimeError("fusedclip: torch.utils.cpp_extension was imported before setup.py chose CUDA_HOME")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # read by torch's BuildExtension for the -gencode flags
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "kernels", "*.cu")))
    # A bare token (quotes and ';' would not survive the build's shell lines); module.cpp stringifies it.
    archs = "-DFUSEDCLIP_CUDA_ARCHS=" + arch_token(arch_list)
    ext = CUDAExtension(
        name="fusedclip._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc", "kernels")],
        # ptxas warns about any register spill or other local-memory use (CMake's kernels target makes it an error).
        extra_compile_args={
            "cxx": ["-O3", archs],
            "nvcc": ["-O3", archs, "-Xptxas=--warn-on-spills,--warn-on-local-memory-usage"],
        },
    )
    return [ext], {"build_ext": BuildExtension}


HOST_EXT = "fusedclip._host"


def host_build_decision(env: Optional[dict] = None, torch_version: Optional[str] = "detect") -> tuple[bool, str]:
    """(build fusedclip._host?, why). torch_version defaults to the importable torch's; tests pass it in."""
    env = dict(os.environ if env is None else env)
    if _flag(env, "FUSEDCLIP_SKIP_HOST_EXT"):
        return False, "FUSEDCLIP_SKIP_HOST_EXT is set"
    if torch_version == "detect":
        try:
            import torch

            torch_version = torch.__version__
        except ImportError:
            torch_version = None
    if not torch_version:
        return False, "torch is not importable at build time (install with --no-build-isolation)"
    cxx = (env.get("CXX") or "c++").split()[0]  # the compiler torch's BuildExtension runs
    found = shutil.which(cxx, path=env.get("PATH"))
    if found is None:
        return False, f"no C++ compiler: {cxx} is not on PATH (set CXX)"
    return True, f"torch {torch_version}, C++ compiler {found}"


def _host_extension():
    import torch
    from torch.utils.cpp_extension import CppExtension

    # torch.__version__ as one bare token (see arch_token): the loader refuses a build for another torch.
    version = "-DFUSEDCLIP_TORCH_VERSION=" + arch_token(torch.__version__)
    # -fopenmp: cpu_passes.cpp's parallel region is torch's at::parallel_for, in the OpenMP runtime torch loads (Linux;
    # elsewhere, e.g. Apple's clang without it, the extension builds without the region and the per-op path runs).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    return CppExtension(
        name=HOST_EXT,
        sources=[os.path.join("csrc", "host", name) for name in ("signatures.cpp", "cpu_passes.cpp")],
        extra_compile_args=["-O3", *openmp, version],
        extra_link_args=openmp,
    )


def _tolerant(build_ext_class: type) -> type:
    """torch's BuildExtension, except that a failed build of fusedclip._host is reported and skipped."""

    class BuildExtension(build_ext_class):
        def _skip(self, e: Exception) -> None:
            self.skipped = getattr(self, "skipped", set()) | {HOST_EXT}
            stale = self.get_ext_fullpath(HOST_EXT)  # an earlier build's output would be installed with the rest
            if os.path.exists(stale):
                os.remove(stale)
            print(
                f"fusedclip: the optional host extension {HOST_EXT} failed to build ({type(e).__name__}: {e}); "
                "installing without it: the steady-state check runs in Python, more slowly "
                "(`python -m fusedclip info` says which one is used)"
            )

        def build_extensions(self) -> None:
            try:
                super().build_extensions()  # torch checks the compiler here, before any extension is built
            except Exception as e:
                if any(ext.name != HOST_EXT for ext in self.extensions):
                    raise  # the CUDA extension was asked for: its build fails as it always did
                self._skip(e)

        def build_extension(self, ext) -> None:
            if ext.name != HOST_EXT:
                super().build_extension(ext)
                return
            try:
                super().build_extension(ext)
            except Exception as e:  # a compile or link error: fusedclip works without it
                self._skip(e)

        def copy_extensions_to_source(self) -> None:  # an editable install copies only what was built
            skipped = getattr(self, "skipped", set())
            self.extensions = [e for e in self.extensions if e.name not in skipped]
            super().copy_extensions_to_source()

        def get_outputs(self) -> list:
            missing = {self.get_ext_filename(name) for name in getattr(self, "skipped", set())}
            return [o for o in super().get_outputs() if not any(o.endswith(m) for m in missing)]

    return BuildExtension


def _extensions() -> tuple[list, dict]:
    build, why = cuda_build_decision()
    print(f"fusedclip: {'building' if build else 'not building'} the CUDA extension fusedclip._C: {why}")
    ext_modules, cmdclass = _cuda_extension() if build else ([], {})  # first: it settles CUDA_HOME for cpp_extension
    build_host, why = host_build_decision()
    print(f"fusedclip: {'building' if build_host else 'not building'} the host extension {HOST_EXT}: {why}")
    if build_host:
        from torch.utils.cpp_extension import BuildExtension

        ext_modules.append(_host_extension())
        cmdclass = cmdclass or {"build_ext": BuildExtension}
    if cmdclass:
        cmdclass = {"build_ext": _tolerant(cmdclass["build_ext"])}
    return ext_modules, cmdclass


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
