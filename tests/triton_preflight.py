"""GPU preflight for the Triton kernels on a machine without a GPU (design.md section 6b).

- `RECORDER` notes the specialisation of every launch of a kernel of fusedclip.triton_kernels: the kernel, what
  Triton specialises its arguments on (dtype and 16-byte alignment of a tensor, int width and the 1 / multiple-of-16
  cases of an int), the constexprs and the launch options (num_warps). conftest installs it for the whole session.
- `compile_variants()` compiles recorded launches ahead of time for one GPU target: `kernel.warmup(...)` under a
  stand-in driver whose target is that GPU binds the arguments as a real launch would, then Triton lowers to PTX
  and assembles a cubin with its bundled ptxas. It runs in a fresh process: once TRITON_INTERPRET is set, the
  interpreter has replaced triton.language's helpers (tl.sum, ...) in this one, and they no longer compile.
- `ptx_loops()` / `ptx_arithmetic()` / `resource_usage()` read back what the compiler made: which global loads and
  stores sit in which loop (LLVM writes its loop analysis into the PTX as comments on each basic block), fused
  multiply-adds and approximate instructions, local memory, registers.

Run as a script, this file is that worker: `python triton_preflight.py RECORDS.json ARCH OUT.json`.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Any

KERNEL_PACKAGE = "fusedclip.triton_kernels"


# ---- recording -----------------------------------------------------------------------------------------------------


def our_kernels() -> dict[str, Any]:
    """Every Triton kernel defined in fusedclip.triton_kernels, by "module:name": the jit functions named *_kernel (the
    others are helpers the kernels call, compiled into theirs)."""
    import importlib
    import pkgutil

    package = importlib.import_module(KERNEL_PACKAGE)
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}")
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            jit = type(obj).__name__ in ("JITFunction", "InterpretedFunction")
            if jit and fn.__module__ == module.__name__ and name.endswith("_kernel"):
                found[f"{module.__name__}:{name}"] = obj
    return found


def _constexpr_params(fn) -> set[str]:
    import triton.language as tl

    return {
        name for name, p in inspect.signature(fn).parameters.items()
        if p.annotation is tl.constexpr or p.annotation in ("tl.constexpr", "constexpr")
    }


def encode(value: Any, exact: bool) -> dict:
    """A JSON form of a launch argument. `exact` False: only what Triton specialises a runtime argument on."""
    import torch
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned16": value.data_ptr() % 16 == 0}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        if exact:
            return {"int": value}
        width = "i32" if -(2**31) <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return {"int": width, "one": value == 1, "div16": value % 16 == 0}
    if isinstance(value, float):
        return {"float": value}
    if isinstance(value, tl.dtype):
        return {"tl_dtype": str(value)}
    if value is None:
        return {"none": True}
    raise TypeError(f"the launch recorder does not know how to describe a {type(value).__name__} argument")


class LaunchRecorder:
    """Wraps each kernel's `run` (what `kernel[grid](...)` calls) to note every distinct specialisation launched."""

    def __init__(self) -> None:
        self.records: dict[str, dict] = {}  # specialisation key -> one launch with that specialisation
        self.installed = False
        self.why_not = ""

    def install(self) -> bool:
        """Start recording; False where triton or the kernels cannot be imported (why_not says why)."""
        if self.installed:
            return True
        try:
            kernels = our_kernels()
        except Exception as e:  # noqa: BLE001  (no triton, or a broken one: the Triton backend is unavailable too)
            self.why_not = f"{type(e).__name__}: {e}"
            return False
        for name, kernel in kernels.items():
            kernel.run = self._recording(name, kernel, kernel.run)
        self.installed = True
        return True

    def _recording(self, name: str, kernel, run):
        params = list(inspect.signature(kernel.fn).parameters)
        constexprs = _constexpr_params(kernel.fn)
        # JITFunction keeps do_not_specialize as an attribute, InterpretedFunction among its jit kwargs.
        plain = getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize")
        plain = {params[p] if isinstance(p, int) else p for p in plain or ()}

        def recorded_run(*args, grid, warmup, **kwargs):
            self.note(name, params, constexprs, plain, args, kwargs)
            return run(*args, grid=grid, warmup=warmup, **kwargs)

        return recorded_run

    def note(self, name: str, params: list, constexprs: set, plain: set, args: tuple, kwargs: dict) -> None:
        """Keep the launch if its specialisation is new. The key is Triton's own: constexprs by value, an int by
        width and the 1 / multiple-of-16 cases (by width alone when it is not specialised), a tensor by dtype and
        16-byte alignment."""
        bound = dict(zip(params, args))
        bound.update((k, v) for k, v in kwargs.items() if k in params)
        options = {k: v for k, v in kwargs.items() if k not in params}
        key_args = {}
        for k, v in bound.items():
            described = encode(v, exact=k in constexprs)
            if k in plain and "one" in described:
                described = {"int": described["int"]}
            key_args[k] = described
        key = json.dumps({"kernel": name, "options": options, "args": key_args}, sort_keys=True)
        if key not in self.records:
            self.records[key] = {
                "kernel": name, "args": {k: encode(v, exact=True) for k, v in bound.items()}, "options": options,
            }


RECORDER = LaunchRecorder()


# ---- reading PTX and cubins --------------------------------------------------------------------------------------

_BLOCK_START = re.compile(r"^\s*(?:\$L__(BB\d+_\d+):|// %bb\.\d+:)")
_OWN_HEADER = re.compile(r"=>This (?:Inner )?Loop Header")
_IN_LOOP = re.compile(r"in Loop: Header=(BB\d+_\d+)")
_SHARED = re.compile(r"^\s*(@!?%p\d+\s+)?((ld|st)\.shared|bar\.sync)")  # a layout conversion's traffic
_FMA = re.compile(r"^\s*(?:@!?%p\d+\s+)?fma\.", re.M)  # fused multiply-adds, whatever the type
_APPROX = re.compile(r"^\s*(?:@!?%p\d+\s+)?(\w+)\.approx\b", re.M)  # ex2.approx..., lg2.approx..., rcp.approx...
_GLOBAL_ACCESS = re.compile(r"^\s*(@!?%p\d+\s+)?(ld|st)\.global((?:\.[\w:]+)*)\s")


def access_bits(modifiers: str) -> int:
    """Bits one `ld.global` / `st.global` moves, from its modifiers (".v4.b32" -> 128)."""
    lanes, bits = 1, 0
    for m in modifiers.split(".")[1:]:
        if re.fullmatch(r"v\d+", m):
            lanes = int(m[1:])
        elif re.fullmatch(r"[bfus]\d+", m):
            bits = int(m[1:])
    return lanes * bits


def ptx_loops(ptx: str) -> dict[str | None, dict]:
    """Global memory accesses per innermost loop (by LLVM's loop header; None: outside every loop).

    Each entry: wide_loads / wide_stores (128-bit, unpredicated), narrow_loads / narrow_stores (anything else),
    masked_loads / masked_stores (the predicated ones among those), shared (shared-memory accesses and barriers,
    what a layout conversion costs), and `dtype`, the element type the loop's wide loads read, told apart by the
    instructions the loop holds (64-bit vectors: float64; bf16 / f16 instructions; else float32)."""
    loops: dict[str | None, dict] = {}
    texts: dict[str | None, list[str]] = {}
    header: str | None = None
    for line in ptx.splitlines():
        start = _BLOCK_START.match(line)
        if start:
            own = _OWN_HEADER.search(line)
            inside = _IN_LOOP.search(line)
            header = start.group(1) if own else (inside.group(1) if inside else None)
            continue
        texts.setdefault(header, []).append(line)
        entry = loops.setdefault(header, Counter())
        if _SHARED.match(line):
            entry["shared"] += 1
        access = _GLOBAL_ACCESS.match(line)
        if not access:
            continue
        kind = "loads" if access.group(2) == "ld" else "stores"
        bits = access_bits(access.group(3))
        if access.group(1):
            entry[f"masked_{kind}"] += 1
        entry[f"wide_{kind}" if bits == 128 and not access.group(1) else f"narrow_{kind}"] += 1
        if bits == 128 and ".v2." in access.group(3) + ".":
            entry["wide_b64"] += 1
    out = {}
    for h, counts in loops.items():
        text = "\n".join(texts.get(h, []))
        if counts["wide_b64"]:
            dtype = "float64"
        elif re.search(r"\bbf16|\.bf16", text):
            dtype = "bfloat16"
        elif re.search(r"\.f16(x2)?\b", text):
            dtype = "float16"
        else:
            dtype = "float32"
        out[h] = {**counts, "dtype": dtype}
    return out


def ptx_arithmetic(ptx: str) -> dict:
    """What the float arithmetic compiled to: `fma`, the number of fused multiply-adds (any type), and `approx`, the
    number of each approximate instruction ({"ex2": 64, "rcp": 8}: ex2.approx.*, rcp.approx.*)."""
    return {"fma": len(_FMA.findall(ptx)), "approx": dict(Counter(_APPROX.findall(ptx)))}


def resource_usage(cubin: bytes, sass: bool) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the cubin's function, from Triton's bundled cuobjdump; with `sass`, also the
    number of 128-bit global loads and stores in the SASS (LDG128 / STG128; a disassembly costs about 0.5 s)."""
    from triton import knobs

    if "cuobjdump" not in _TOOLS:
        _TOOLS["cuobjdump"] = knobs.nvidia.cuobjdump.path
    tool = _TOOLS["cuobjdump"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
        found = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage.stdout)}
        if sass:
            text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
            found["LDG128"] = len(re.findall(r"\bLDG\.E\.128\b", text))
            found["STG128"] = len(re.findall(r"\bSTG\.E\.128\b", text))
    return found


_TOOLS: dict[str, str] = {}  # resolving a tool's path runs it (--version): once is enough


# ---- compiling (in a fresh process) ------------------------------------------------------------------------------


def compile_variants(records: list[dict], arch: int, timeout: float = 1200, cache_dir: str | None = None,
                     libcuda_dir: str | None = None) -> subprocess.Popen:
    """Start a worker that compiles `records` for sm_`arch` (and disassembles the SASS of those marked "sass");
    `collect()` its result. By default into a cache of its own, removed by collect(): every run really lowers and
    assembles each variant. With `cache_dir`, into that Triton cache, which is kept (bench/lease_kit.py makes the
    lease's cache so); with `libcuda_dir` too (a folder holding a libcuda.so.1 to link against and the `cc` to link
    with), each variant's launcher and Triton's cuda_utils are built into it as well, as a first launch on the GPU
    would."""
    fd, path = tempfile.mkstemp(suffix=".json", prefix="fusedclip-launches-")
    with os.fdopen(fd, "w") as f:
        json.dump(records, f)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = cache_dir or tempfile.mkdtemp(prefix="fusedclip-triton-cache-")
    if libcuda_dir:
        env.update(TRITON_LIBCUDA_PATH=libcuda_dir, CC=os.path.join(libcuda_dir, "cc"))
    out, log = path + f".sm{arch}.out.json", path + f".sm{arch}.log"
    with open(log, "w") as log_file:  # a file, not a pipe: a worker printing a failed kernel's PTX never blocks
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), path, str(arch), out],
            env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    # The cache is removed with the worker's files unless it was given.
    proc.fusedclip_paths = (path, out, log, None if cache_dir else env["TRITON_CACHE_DIR"])  # type: ignore[attr-defined]
    proc.fusedclip_timeout = timeout  # type: ignore[attr-defined]
    return proc


def collect(proc: subprocess.Popen) -> dict:
    """The worker's result: {"arch", "variants": [...], "failures": [...]}; raises with its output if it died."""
    import shutil

    path, out, log, cache = proc.fusedclip_paths  # type: ignore[attr-defined]
    try:
        try:
            proc.wait(timeout=proc.fusedclip_timeout)  # type: ignore[attr-defined]
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            with open(log) as f:
                raise RuntimeError(f"the compile worker failed (exit {proc.returncode}):\n{f.read()[-6000:]}")
        with open(out) as f:
            return json.load(f)
    finally:
        for p in (path, out, log):
            if os.path.exists(p):
                os.remove(p)
        if cache:
            shutil.rmtree(cache, ignore_errors=True)


def discard(proc: subprocess.Popen) -> None:
    """Stop a worker whose result is no longer wanted (another failed first) and remove its files."""
    import shutil

    if proc.poll() is None:
        proc.kill()
        proc.wait()
    *files, cache = proc.fusedclip_paths  # type: ignore[attr-defined]
    for p in files:
        if os.path.exists(p):
            os.remove(p)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


def _rebuild(arg: dict):
    """A launch argument that Triton specialises as the recorded one was."""
    import torch
    import triton.language as tl

    if "tensor" in arg:
        dtype = getattr(torch, arg["tensor"])
        buf = torch.empty(64, dtype=dtype)  # the CPU allocator aligns to 64 bytes
        t = buf if arg["aligned16"] else buf[1:]
        assert (t.data_ptr() % 16 == 0) == arg["aligned16"]
        return t
    if "tl_dtype" in arg:
        return tl.dtype(arg["tl_dtype"])
    if "none" in arg:
        return None
    (value,) = arg.values()
    return value


def _stand_in_driver(arch: int):
    """A driver for a GPU that is not there: the target to compile for, device 0, stream 0."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandInDriver(DriverBase):
        @classmethod
        def is_active(cls):
            return False

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError("nothing is launched")

        def get_benchmarker(self):
            raise NotImplementedError("nothing is launched")

    return StandInDriver()


def _cpu_seconds() -> float:
    """CPU time of this process and of the children it has waited for (ptxas, cuobjdump)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _launcher_source(compiled) -> str:
    """The C source of the launcher Triton's CUDA driver builds for `compiled` (as CudaLauncher.__init__ does)."""
    from triton.backends.nvidia.driver import make_launcher

    src = compiled.src
    constants = {(src.fn.arg_names.index(k),) if isinstance(k, str) else k: v for k, v in src.constants.items()}
    return make_launcher(constants, dict(src.signature), getattr(compiled.metadata, "tensordesc_meta", None))


def _build_launcher(compiled) -> None:
    """Build the launcher of `compiled` (None: Triton's cuda_utils module) into the Triton cache, as the first launch
    on a GPU would: gcc, linked against the libcuda.so.1 in TRITON_LIBCUDA_PATH. The build lands in the cache before
    Triton loads it; loading it needs the real libcuda, so here it fails, and that is expected."""
    from triton.backends.nvidia.driver import CudaLauncher, CudaUtils

    try:
        CudaUtils() if compiled is None else CudaLauncher(compiled.src, compiled.metadata)
    except ImportError:
        pass


def launcher_cached(compiled) -> bool:
    """Whether the Triton cache holds the launcher a first launch of `compiled` would otherwise build (its key is
    the launcher's C source and the platform, as in triton.runtime.build.compile_module_from_src)."""
    import hashlib
    import sysconfig

    from triton.runtime.build import platform_key
    from triton.runtime.cache import get_cache_manager

    key = hashlib.sha256((_launcher_source(compiled) + platform_key()).encode("utf-8")).hexdigest()
    name = "__triton_launcher" + sysconfig.get_config_var("EXT_SUFFIX")
    return get_cache_manager(key).get_file(name) is not None


def lookup(records: list[dict], arch: int | None = None) -> list[dict]:
    """Look each recorded launch up in the Triton cache (TRITON_CACHE_DIR) as its first launch would, with the real
    driver, or with `arch` under the stand-in driver: [{"kernel", "cache_hit", "launcher_cached"}]. A miss compiles
    the variant (into the cache) as the launch would. Run it in a process that has not launched these kernels (they
    would come from the process's own kernel cache) and without TRITON_INTERPRET."""
    from triton import knobs
    from triton.runtime.driver import driver

    kernels = our_kernels()
    hits: list[bool] = []
    previous_listener, knobs.compilation.listener = knobs.compilation.listener, (
        lambda *, cache_hit, **_: hits.append(cache_hit))
    previous = driver._active
    if arch is not None:
        driver.set_active(_stand_in_driver(arch))
    found = []
    try:
        for record in records:
            hits.clear()
            args = {k: _rebuild(v) for k, v in record["args"].items()}
            compiled = kernels[record["kernel"]].warmup(grid=(1,), **args, **record["options"])
            # No compile() call at all: the kernel came from this process's own kernel cache (None: not looked up).
            found.append({"kernel": record["kernel"], "cache_hit": all(hits) if hits else None,
                          "launcher_cached": launcher_cached(compiled)})
    finally:
        knobs.compilation.listener = previous_listener
        driver.set_active(previous)
    return found


def _worker(records_path: str, arch: int, out_path: str) -> None:
    from triton.runtime.driver import driver

    with open(records_path) as f:
        records = json.load(f)
    kernels = our_kernels()
    previous = driver._active  # restored below; None means "create the default on next use"
    driver.set_active(_stand_in_driver(arch))
    variants: dict[int, dict] = {}
    failures = []
    launchers = bool(os.environ.get("TRITON_LIBCUDA_PATH"))
    if launchers:
        _build_launcher(None)
    try:
        for record in records:
            kernel = kernels[record["kernel"]]
            args = {k: _rebuild(v) for k, v in record["args"].items()}  # by name: Triton binds them as a launch
            cpu = _cpu_seconds()
            try:
                compiled = kernel.warmup(grid=(1,), **args, **record["options"])
            except Exception as e:  # noqa: BLE001  (every failure is reported, with the launch that caused it)
                failures.append({**record, "error": f"{type(e).__name__}: {e}"[-4000:]})
                continue
            if id(compiled) in variants:
                continue
            if launchers:
                _build_launcher(compiled)
            ptx = compiled.asm["ptx"]
            variants[id(compiled)] = {
                **record,
                "loops": {str(k): v for k, v in ptx_loops(ptx).items()},
                "ptx_local": bool(re.search(r"\.local\b", ptx)),
                **ptx_arithmetic(ptx),
                "usage": resource_usage(compiled.asm["cubin"], sass=record.get("sass", False)),
                "cpu_seconds": _cpu_seconds() - cpu,  # compile, ptxas and the checks
            }
    finally:
        driver.set_active(previous)
    result = {
        "arch": arch,
        "variants": list(variants.values()),
        "failures": failures,
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
