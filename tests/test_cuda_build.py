"""CPU-machine proof for the CUDA backend: the pure-CUDA kernels compile with nvcc for sm_80 and sm_90 through the
CMake target (warnings are errors), the torch binding parses against the installed torch headers, setup.py
decides the build correctly, and without the extension the "cuda" backend is absent with a clear reason."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import fusedclip
from fusedclip import backends

ROOT = Path(__file__).resolve().parent.parent


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None or shutil.which("cmake") is None, reason="needs nvcc and cmake")


def _load_setup():
    spec = importlib.util.spec_from_file_location("fusedclip_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs under __main__
    return module


@needs_nvcc
def test_kernels_compile_for_sm80_sm90_without_warnings(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ, CUDACXX=NVCC)
    env.pop("CUDAARCHS", None)
    cfg = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_CUDA_COMPILER={NVCC}", "-DCMAKE_BUILD_TYPE=Release"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert cfg.returncode == 0, f"cmake configure failed:\n{cfg.stdout}\n{cfg.stderr}"
    out = subprocess.run(
        ["cmake", "--build", str(build), "--target", "fusedclip_kernels", "-j2", "--", "VERBOSE=1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"fusedclip_kernels failed to build:\n{log[-8000:]}"
    # Both archs were compiled, with warnings promoted to errors, and nothing warned anyway.
    for arch in ("sm_80", "sm_90"):
        assert f"code=[compute_{arch[3:]},{arch}]" in log or f"code={arch}" in log, (
            f"{arch} not compiled:\n{log[-4000:]}"
        )
    assert "--Werror=all-warnings" in log and "-Werror" in log
    warnings = [ln for ln in log.splitlines() if re.search(r"\bwarning\s*(#|:|\()", ln, re.IGNORECASE)]
    assert not warnings, "\n".join(warnings)
    assert list(build.rglob("libfusedclip_kernels.a")), "no static library produced"


def _torch_include() -> Path:
    return Path(torch.__file__).parent / "include"


# Types the CUDA torch headers mention from cuBLAS/cuSPARSE/cuSOLVER, which an nvcc-only toolkit lacks.
_STUBS = {
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;\n",
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
    "cusolver_common.h": "typedef int cusolverStatus_t;\n",
    "c10/cuda/impl/cuda_cmake_macros.h": "#define C10_CUDA_BUILD_SHARED_LIBS\n",
}


@pytest.mark.skipif(NVCC is None or shutil.which("g++") is None, reason="needs g++ and the CUDA headers of nvcc")
@pytest.mark.skipif(
    not (_torch_include() / "ATen" / "cuda" / "CUDAContext.h").exists(), reason="torch lacks ATen/cuda headers"
)
@pytest.mark.parametrize("source", ["ops.cpp", "module.cpp"])
def test_binding_parses_against_installed_torch_headers(tmp_path, source):
    """Syntax and API names only (a CPU torch cannot link a CUDA extension): catches renamed torch APIs and
    typos in the binding before a GPU machine sees it. Library stubs only supply the handle/status typedefs."""
    stubs = tmp_path / "stubs"
    for name, text in _STUBS.items():
        (stubs / name).parent.mkdir(parents=True, exist_ok=True)
        (stubs / name).write_text(f"#pragma once\n{text}")
    cuda_include = Path(NVCC).resolve().parent.parent / "include"
    inc = _torch_include()
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror"]
    # Our stubs go after the real toolkit headers, so a real cublas_v2.h etc. wins where it exists.
    for d in (inc, inc / "torch" / "csrc" / "api" / "include", cuda_include, sysconfig.get_paths()["include"], stubs):
        cmd += ["-isystem", str(d)]
    cmd += ["-I", str(ROOT / "csrc" / "kernels"), "-DFUSEDCLIP_CUDA_ARCHS=8.0_9.0+PTX", str(ROOT / "csrc" / source)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (
        f"{source} does not compile against torch {torch.__version__}'s headers:\n{out.stderr[-6000:]}"
    )


def test_setup_decision():
    setup = _load_setup()
    assert setup.cuda_build_decision({}, torch_cuda=None, nvcc="/x/nvcc")[0] is False
    assert setup.cuda_build_decision({}, torch_cuda="12.8", nvcc=None)[0] is False
    assert setup.cuda_build_decision({}, torch_cuda="12.8", nvcc="/x/nvcc")[0] is True
    build, why = setup.cuda_build_decision({"FUSEDCLIP_SKIP_CUDA": "1"}, torch_cuda="12.8", nvcc="/x/nvcc")
    assert build is False and "FUSEDCLIP_SKIP_CUDA" in why
    build, why = setup.cuda_build_decision({"FUSEDCLIP_FORCE_CUDA": "1"}, torch_cuda=None, nvcc=None)
    assert build is True and "FUSEDCLIP_FORCE_CUDA" in why
    # Skip wins over force; "0" is not set.
    assert (
        setup.cuda_build_decision({"FUSEDCLIP_SKIP_CUDA": "1", "FUSEDCLIP_FORCE_CUDA": "1"}, "12.8", "/x")[0] is False
    )
    assert setup.cuda_build_decision({"FUSEDCLIP_FORCE_CUDA": "0"}, None, "/x")[0] is False
    assert setup.arch_token("8.0;9.0+PTX") == "8.0_9.0+PTX"
    assert setup.arch_token("7.5 8.6") == "7.5_8.6"


def test_setup_decision_on_this_machine():
    """What a plain install here does: with this torch and nvcc, build exactly when torch has CUDA."""
    setup = _load_setup()
    build, why = setup.cuda_build_decision({k: v for k, v in os.environ.items() if not k.startswith("FUSEDCLIP_")})
    assert build == bool(torch.version.cuda and setup._find_nvcc(dict(os.environ))), why
    assert setup.cuda_build_decision({"FUSEDCLIP_SKIP_CUDA": "1"})[0] is False


def test_setup_py_install_skips_extension_when_told(tmp_path):
    """A real (non-editable) install with FUSEDCLIP_SKIP_CUDA=1 is pure Python and the package imports."""
    target = tmp_path / "site"
    env = dict(os.environ, FUSEDCLIP_SKIP_CUDA="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-build-isolation",
            "--no-deps",
            "--no-index",
            "-q",
            "--target",
            str(target),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    pkg = target / "fusedclip"
    assert (pkg / "backends" / "cuda_backend.py").exists()
    assert not list(pkg.glob("_C*")), "extension built although FUSEDCLIP_SKIP_CUDA=1"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less case")
def test_cuda_backend_absent_with_reason():
    from fusedclip.backends import cuda_backend

    assert "cuda" not in fusedclip.available_backends()
    reason = backends.unavailable_reasons()["cuda"]
    if importlib.util.find_spec("fusedclip._C") is None:
        assert "not built" in reason and "fusedclip._C" in reason
        assert cuda_backend.build_info() is None
    else:
        assert "no CUDA device" in reason
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    before = p.grad.clone()
    with pytest.raises(RuntimeError, match="cuda"):
        fusedclip.clip_grad_norm_([p], 1e-3, backend="cuda")
    assert torch.equal(p.grad, before)
