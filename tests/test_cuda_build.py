"""CPU-machine proof for the CUDA backend, no GPU needed:
- the pure-CUDA kernels compile with nvcc for sm_80 and sm_90 through the CMake target, warnings (ptxas spills
  included) as errors;
- their SASS is what we meant: 128-bit global loads (and stores, for scale/clamp) in the hot loop of every dtype,
  nothing in local memory;
- the torch binding parses against the installed torch's headers with a plain toolkit (no cuBLAS/cuSPARSE/cuSOLVER);
- setup.py finds the toolkit (a wrapper `nvcc` included) and decides the build correctly; CMake configures with a
  plain toolkit and the installed torch;
- without the extension (or without a GPU) the "cuda" backend is absent with a clear reason.
Building and importing the extension against the CUDA build of torch is .ci/torch-cuda-build.sh's job."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import fusedclip
from fusedclip import backends

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "csrc" / "kernels"
ARCHS = ("sm_80", "sm_90")


@functools.cache
def _setup():
    spec = importlib.util.spec_from_file_location("fusedclip_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs under __main__
    return module


CUDA_HOME = _setup().find_cuda_home()[0]
NVCC = str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else None
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="needs a CUDA toolkit (nvcc)")
needs_cmake = pytest.mark.skipif(NVCC is None or shutil.which("cmake") is None, reason="needs nvcc and cmake")


def _cuobjdump() -> str | None:
    """The toolkit's cuobjdump, else the one Triton bundles (a plain toolkit may lack it; CI has Triton)."""
    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "cuobjdump").exists():
        return str(Path(CUDA_HOME) / "bin" / "cuobjdump")
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


CUOBJDUMP = _cuobjdump()
needs_cuobjdump = pytest.mark.skipif(CUOBJDUMP is None, reason="needs cuobjdump (the toolkit's or Triton's)")


def _clean_env(**extra: str) -> dict:
    """This environment without the CUDA toolkit hints a developer may have set, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "CUDACXX", "CUDAARCHS")}
    env.update(extra)
    return env


def _cmake_configure(build: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), *args],
        check=False, capture_output=True, text=True, env=env, timeout=300,
    )


# ---- the kernels: compile, SASS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernels_build(tmp_path_factory):
    """The fusedclip_kernels CMake target, built once for this module: (build dir, build log)."""
    build = tmp_path_factory.mktemp("kernels") / "build"
    env = _clean_env(CUDA_HOME=CUDA_HOME)
    cfg = _cmake_configure(build, "-DFUSEDCLIP_TORCH=OFF", env=env)
    assert cfg.returncode == 0, f"cmake configure failed:\n{cfg.stdout}\n{cfg.stderr}"
    out = subprocess.run(
        ["cmake", "--build", str(build), "--target", "fusedclip_kernels", "-j2", "--", "VERBOSE=1"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"fusedclip_kernels failed to build:\n{log[-8000:]}"
    return build, log


@needs_cmake
def test_kernels_compile_for_sm80_sm90_without_warnings(kernels_build):
    build, log = kernels_build
    # Both archs were compiled optimised, with warnings (ptxas spills and local memory too) promoted to errors,
    # and nothing warned anyway.
    for arch in ARCHS:
        compiled = f"code=[compute_{arch[3:]},{arch}]" in log or f"code={arch}" in log
        assert compiled, f"{arch} not compiled:\n{log[-4000:]}"
    assert "--Werror=all-warnings" in log and "-Werror" in log and "-O3" in log
    assert "--warn-on-spills" in log and "--warn-on-local-memory-usage" in log
    warnings = [ln for ln in log.splitlines() if re.search(r"\bwarning\s*(#|:|\()", ln, re.IGNORECASE)]
    assert not warnings, "\n".join(warnings)
    assert list(build.rglob("libfusedclip_kernels.a")), "no static library produced"


LDG128 = re.compile(r"\bLDG\.E(\.[A-Z0-9]+)*\.128\b")  # LDG.E.128, LDG.E.128.CONSTANT, LDG.E.EF.128, ...
STG128 = re.compile(r"\bSTG\.E(\.[A-Z0-9]+)*\.128\b")
LOCAL = re.compile(r"\b(LDL|STL)(\.[A-Z0-9]+)*\b")
_KINDS = {"0": "L1", "1": "L2", "2": "inf", "3": "-inf", "4": "zero", "5": "p"}
_ACC = {"f": "float", "d": "double"}


def _kernel_name(mangled: str) -> str:
    m = re.search(r"norm_kernelI([fd])Li(\d)E", mangled)
    if m:
        return f"norm_kernel<{_ACC[m.group(1)]}, {_KINDS[m.group(2)]}>"
    m = re.search(r"scale_kernelI([fd])E", mangled)
    if m:
        return f"scale_kernel<{_ACC[m.group(1)]}>"
    m = re.search(r"(clamp_kernel)", mangled)
    return m.group(1) if m else mangled


def _sass(path: Path) -> dict[tuple[str, str], str]:
    """{(arch, kernel): its SASS} of an object file, fatbin or cubin."""
    out = subprocess.run([CUOBJDUMP, "-sass", str(path)], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    kernels: dict[tuple[str, str], list[str]] = {}
    arch = name = None
    for line in out.stdout.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:  # a new section (an ELF or PTX image of one arch); its kernels follow
            arch, name = m.group(1), None
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = _kernel_name(m.group(1))
            kernels[(arch, name)] = []
        elif name is not None:
            kernels[(arch, name)].append(line)
    return {k: "\n".join(v) for k, v in kernels.items()}


NORM_KERNELS = {f"norm_kernel<{a}, {k}>" for a in _ACC.values() for k in _KINDS.values()}
WRITE_KERNELS = {"scale_kernel<float>", "scale_kernel<double>", "clamp_kernel"}


def _check_sass(kernels: dict[tuple[str, str], str], vectorised: bool = True, local: bool = True) -> list[str]:
    """What is wrong with these kernels' SASS: a missing kernel or arch, no 128-bit global load (norm, scale,
    clamp) or store (scale, clamp), or (with local=True) any local-memory access. With vectorised=False, any
    128-bit access is wrong (the control)."""
    problems = []
    for arch in ARCHS:
        for name in sorted(NORM_KERNELS | WRITE_KERNELS):
            sass = kernels.get((arch, name))
            if sass is None:
                problems.append(f"{arch} {name}: not in the SASS")
                continue
            wide = [bool(LDG128.search(sass))] + ([bool(STG128.search(sass))] if name in WRITE_KERNELS else [])
            if vectorised and not all(wide):
                problems.append(f"{arch} {name}: no 128-bit global {'load' if not wide[0] else 'store'}")
            if not vectorised and any(wide):
                problems.append(f"{arch} {name}: a 128-bit access where no dtype is compiled")
            access = LOCAL.search(sass) if local else None
            if access:
                problems.append(f"{arch} {name}: local memory ({access.group(0)})")
    return problems


@needs_cmake
@needs_cuobjdump
def test_built_kernels_use_128bit_global_memory_and_no_local_memory(kernels_build):
    """The objects of the real build (every dtype compiled in): each kernel, for sm_80 and sm_90."""
    build, _ = kernels_build
    kernels = {}
    for obj in sorted(build.rglob("*.cu.o")):
        kernels.update(_sass(obj))
    problems = _check_sass(kernels)
    assert not problems, "\n".join(problems)


def _built_extensions() -> list[Path]:
    """Built extensions to check: the importable fusedclip._C (a setup.py build), and those named in
    FUSEDCLIP_EXTENSION_FILES (os.pathsep-separated: .ci/torch-cuda-build.sh names its CMake build there)."""
    files = [Path(p) for p in os.environ.get("FUSEDCLIP_EXTENSION_FILES", "").split(os.pathsep) if p]
    spec = importlib.util.find_spec("fusedclip._C")
    if spec is not None and spec.origin:
        files.append(Path(spec.origin))
    return files


@needs_cuobjdump
@pytest.mark.parametrize("path", _built_extensions() or [None], ids=lambda p: f"{p.parent.name}/{p.name}" if p else "")
def test_built_extension_uses_128bit_global_memory_and_no_local_memory(path):
    """The kernels inside a built fusedclip._C (its own build flags: torch's for setup.py), for sm_80 and sm_90."""
    if path is None:
        pytest.skip("no built fusedclip._C here (.ci/torch-cuda-build.sh builds and checks one)")
    assert path.exists(), path
    problems = _check_sass(_sass(path))
    assert not problems, f"{path}:\n" + "\n".join(problems)


# Probe builds: the same sources with one dtype's path compiled in (FUSEDCLIP_SASS_PROBE_DTYPE, common.cuh), so a
# 128-bit access in a kernel's SASS can only be that dtype's hot loop. "none" compiles no dtype: the control that
# shows nothing else (tables, partials) produces one. Local memory is checked on the real build's objects above
# (and ptxas fails that build on any), not here: a probe is a different program, with its own register allocation.
PROBES = {"float32": 0, "float16": 1, "bfloat16": 2, "none": 99}


@pytest.fixture(scope="module")
def probe_sass(tmp_path_factory) -> dict[str, dict[tuple[str, str], str]]:
    out_dir = tmp_path_factory.mktemp("probes")
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]

    def compile_one(job: tuple[str, str]) -> tuple[str, Path]:
        probe, source = job
        target = out_dir / f"{probe}-{source}.fatbin"
        cmd = [NVCC, "-O3", "-std=c++17", "-fatbin", *gencode, f"-DFUSEDCLIP_SASS_PROBE_DTYPE={PROBES[probe]}",
               "-diag-suppress=177", f"-I{KERNELS}", str(KERNELS / source), "-o", str(target)]  # 177: unused
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stderr[-4000:]}"
        return probe, target

    jobs = [(p, s) for p in PROBES for s in ("norm.cu", "elementwise.cu")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        built = list(pool.map(compile_one, jobs))
    sass: dict[str, dict[tuple[str, str], str]] = {p: {} for p in PROBES}
    for probe, target in built:
        sass[probe].update(_sass(target))
    return sass


@needs_nvcc
@needs_cuobjdump
@pytest.mark.parametrize("probe", list(PROBES))
def test_each_dtype_hot_loop_uses_128bit_global_memory(probe, probe_sass):
    problems = _check_sass(probe_sass[probe], vectorised=probe != "none", local=False)
    assert not problems, "\n".join(problems)


# ---- the torch binding -----------------------------------------------------------------------------------------


def _torch_include() -> Path:
    return Path(torch.__file__).parent / "include"


def test_binding_includes_no_cuda_library_headers():
    """ATen/cuda/* (CUDAContext.h and friends) pull in cuBLAS/cuSPARSE/cuSOLVER headers, which a plain toolkit
    lacks: the binding uses c10/cuda and the CUDA runtime API only."""
    for source in sorted((ROOT / "csrc").glob("*.cpp")):
        includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', source.read_text())
        bad = [i for i in includes if i.startswith("ATen/cuda/") or re.match(r"(cublas|cusparse|cusolver)", i)]
        assert not bad, f"{source.name} includes {bad}"


@pytest.mark.skipif(NVCC is None or shutil.which("g++") is None, reason="needs g++ and the CUDA headers of nvcc")
@pytest.mark.skipif(not (_torch_include() / "c10" / "cuda" / "CUDAStream.h").exists(), reason="torch lacks c10/cuda")
@pytest.mark.parametrize("source", ["ops.cpp", "module.cpp"])
def test_binding_parses_against_installed_torch_headers(tmp_path, source):
    """Syntax and API names against the plain toolkit's headers (no cuBLAS/cuSPARSE/cuSOLVER stubs): catches renamed
    torch APIs, typos and a header that needs more than the toolkit has. The CPU build of torch lacks the one
    generated CUDA header, c10/cuda/impl/cuda_cmake_macros.h: that alone is stubbed, and only there."""
    inc = _torch_include()
    stubs = tmp_path / "stubs"
    macros = Path("c10") / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not (inc / macros).exists():
        (stubs / macros).parent.mkdir(parents=True)
        (stubs / macros).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror"]
    for d in (inc, inc / "torch" / "csrc" / "api" / "include", Path(CUDA_HOME) / "include",
              sysconfig.get_paths()["include"], stubs):
        cmd += ["-isystem", str(d)]
    cmd += ["-I", str(KERNELS), "-DFUSEDCLIP_CUDA_ARCHS=8.0_9.0+PTX", str(ROOT / "csrc" / source)]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (
        f"{source} does not compile against torch {torch.__version__}'s headers:\n{out.stderr[-6000:]}"
    )


# ---- setup.py and CMake: finding the toolkit, deciding the build ------------------------------------------------


def _fake_toolkit(root: Path) -> Path:
    """A directory that passes for a toolkit root (bin/nvcc, include/cuda_runtime.h); its nvcc answers a dry run
    the way the real one does."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "#$ TOP={root}/bin/.." >&2\n')
    nvcc.chmod(0o755)
    return root


def _wrapper(bin_dir: Path, target: Path) -> Path:
    """An `nvcc` in bin_dir that only execs the real one (as /usr/local/bin/nvcc does on some machines)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_find_cuda_home(tmp_path):
    setup = _setup()
    kit = _fake_toolkit(tmp_path / "cuda-13.0")
    other = _fake_toolkit(tmp_path / "other")
    no_path = str(tmp_path / "empty")
    assert setup.find_cuda_home({"CUDA_HOME": str(kit), "CUDA_PATH": str(other), "PATH": no_path})[0] == str(kit)
    assert setup.find_cuda_home({"CUDA_PATH": str(other), "PATH": no_path})[0] == str(other)
    # A CUDA_HOME that is no toolkit is reported, not silently replaced by another one.
    home, why = setup.find_cuda_home({"CUDA_HOME": str(tmp_path), "PATH": str(kit / "bin")})
    assert home is None and "CUDA_HOME" in why and "cuda_runtime.h" in why
    # nvcc on PATH: its own toolkit. A wrapper script elsewhere (its parent is no toolkit): what nvcc reports.
    assert setup.find_cuda_home({"PATH": str(kit / "bin")})[0] == str(kit)
    wrapper = _wrapper(tmp_path / "usr-local" / "bin", kit / "bin" / "nvcc")
    assert setup.find_cuda_home({"PATH": str(wrapper.parent)})[0] == str(kit)
    assert setup._nvcc_top(str(wrapper)) == str(kit)
    # A symlink to nvcc: its real location.
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "nvcc").symlink_to(kit / "bin" / "nvcc")
    assert setup.find_cuda_home({"PATH": str(tmp_path / "links")})[0] == str(kit)


@needs_nvcc
def test_find_cuda_home_through_a_wrapper_of_the_real_nvcc(tmp_path):
    """The case seen on the build machines: `nvcc` on PATH is a script in /usr/local/bin that execs the toolkit's."""
    wrapper = _wrapper(tmp_path / "bin", Path(NVCC))
    home, why = _setup().find_cuda_home({"PATH": f"{wrapper.parent}:/usr/bin:/bin"})
    assert home is not None and Path(home).resolve() == Path(CUDA_HOME).resolve(), why


def test_setup_decision():
    setup = _setup()
    assert setup.cuda_build_decision({}, torch_cuda=None, cuda_home="/x")[0] is False
    assert setup.cuda_build_decision({}, torch_cuda="13.0", cuda_home=None)[0] is False
    assert setup.cuda_build_decision({}, torch_cuda="13.0", cuda_home="/x")[0] is True
    build, why = setup.cuda_build_decision({"FUSEDCLIP_SKIP_CUDA": "1"}, torch_cuda="13.0", cuda_home="/x")
    assert build is False and "FUSEDCLIP_SKIP_CUDA" in why
    build, why = setup.cuda_build_decision({"FUSEDCLIP_FORCE_CUDA": "1"}, torch_cuda=None, cuda_home=None)
    assert build is True and "FUSEDCLIP_FORCE_CUDA" in why
    # Skip wins over force; "0" is not set.
    both = {"FUSEDCLIP_SKIP_CUDA": "1", "FUSEDCLIP_FORCE_CUDA": "1"}
    assert setup.cuda_build_decision(both, "13.0", "/x")[0] is False
    assert setup.cuda_build_decision({"FUSEDCLIP_FORCE_CUDA": "0"}, None, "/x")[0] is False
    # The reason names what is missing.
    assert "CUDA_HOME" in setup.cuda_build_decision({"CUDA_HOME": "/nonexistent", "PATH": ""}, "13.0")[1]
    assert setup.arch_token("8.0;9.0+PTX") == "8.0_9.0+PTX"
    assert setup.arch_token("7.5 8.6") == "7.5_8.6"


def test_setup_decision_on_this_machine():
    """What a plain install here does: with this torch, build exactly when torch has CUDA and a toolkit is found."""
    setup = _setup()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSEDCLIP_")}
    build, why = setup.cuda_build_decision(env)
    assert build == bool(torch.version.cuda and setup.find_cuda_home(env)[0]), why
    assert setup.cuda_build_decision({"FUSEDCLIP_SKIP_CUDA": "1"})[0] is False


def test_setup_py_install_skips_extension_when_told(tmp_path):
    """A real (non-editable) install with FUSEDCLIP_SKIP_CUDA=1 is pure Python and the package imports."""
    target = tmp_path / "site"
    env = dict(os.environ, FUSEDCLIP_SKIP_CUDA="1", FUSEDCLIP_SKIP_HOST_EXT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
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
    assert not list(pkg.glob("_host*")), "host extension built although FUSEDCLIP_SKIP_HOST_EXT=1"


def test_host_extension_decision():
    setup = _setup()
    assert setup.host_build_decision({"FUSEDCLIP_SKIP_HOST_EXT": "1"}, "2.13.0")[0] is False
    assert setup.host_build_decision({"PATH": os.environ.get("PATH", "")}, None)[0] is False  # no torch
    build, why = setup.host_build_decision({"PATH": "", "CXX": "no-such-c++"}, "2.13.0")
    assert build is False and "no-such-c++" in why
    compiler = Path(sys.executable)  # any executable on PATH stands for a compiler here
    build, why = setup.host_build_decision({"PATH": str(compiler.parent), "CXX": compiler.name}, "2.13.0")
    assert build is True and "2.13.0" in why


def test_a_failed_host_extension_build_does_not_fail_the_install(tmp_path):
    """A compiler that fails: the install goes on without fusedclip._host (an earlier build's output left in build/
    is not installed either) and says why. (What fusedclip does without it: tests/test_host_overhead.py.)"""
    cxx = tmp_path / "broken-c++"
    cxx.write_text("#!/bin/sh\necho 'broken-c++: refusing to compile' >&2\nexit 1\n")
    cxx.chmod(0o755)
    source = tmp_path / "src"  # without this checkout's build outputs (an editable install's _host, build/)
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "*.so", "*.egg-info", "__pycache__"))
    (source / "build" / "lib" / "fusedclip").mkdir(parents=True, exist_ok=True)
    stale = source / "build" / "lib" / "fusedclip" / ("_host" + sysconfig.get_config_var("EXT_SUFFIX"))
    stale.write_text("an earlier build's output: must not be installed")
    target = tmp_path / "site"
    env = dict(os.environ, FUSEDCLIP_SKIP_CUDA="1", CXX=str(cxx), PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("FUSEDCLIP_SKIP_HOST_EXT", None)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-v",
         "--target", str(target), str(source)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "fusedclip._host failed to build" in out.stdout + out.stderr
    assert not list((target / "fusedclip").glob("_host*"))


@needs_cmake
@pytest.mark.parametrize("found_by", ["CUDA_HOME", "wrapper on PATH"])
def test_cmake_configures_with_installed_torch_and_a_plain_toolkit(tmp_path, found_by):
    """CMake with the installed torch and the plain toolkit, named by CUDA_HOME alone or found as a wrapper `nvcc`
    on PATH (whose parent is no toolkit): it configures, keeps our archs (torch's config resets them, and without
    TORCH_CUDA_ARCH_LIST picks compute_50, which CUDA 13 dropped), builds Release, and defines fusedclip_C exactly
    when this torch has CUDA."""
    bin_dir = tmp_path / "bin"
    _wrapper(bin_dir, Path(NVCC))
    env = _clean_env(PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
    if found_by == "CUDA_HOME":
        env["CUDA_HOME"] = CUDA_HOME
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    build = tmp_path / "build"
    cfg = _cmake_configure(
        build, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython3_EXECUTABLE={sys.executable}", env=env
    )
    log = cfg.stdout + cfg.stderr
    assert cfg.returncode == 0, f"cmake configure failed:\n{log[-8000:]}"
    assert "fusedclip: CUDA toolkit" in log and "(archs 80;90)" in log, log[-4000:]
    assert "compute_50" not in log
    cache = (build / "CMakeCache.txt").read_text()
    assert "CMAKE_BUILD_TYPE:STRING=Release" in cache
    root = re.search(r"fusedclip: CUDA toolkit (\S+)", log).group(1)
    assert Path(root).resolve() == Path(CUDA_HOME).resolve(), log[-4000:]
    defines_ext = "building the torch extension target fusedclip_C" in log
    assert defines_ext == bool(torch.version.cuda), log[-4000:]
    if torch.version.cuda:
        assert "Added CUDA NVCC flags for: -gencode;arch=compute_80,code=sm_80;-gencode;arch=compute_90" in log


# ---- without the extension or a GPU ------------------------------------------------------------------------------


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
