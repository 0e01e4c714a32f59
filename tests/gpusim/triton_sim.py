"""fusedclip's Triton kernels executed in GPGPU-Sim (a simulator, not a GPU), every result against float64.

    python tests/gpusim/triton_sim.py PREFIX    # PREFIX: the simulator kit's prefix (../shared/gpusim/setup.sh)

1. compile (this process; TRITON_INTERPRET must be unset): every launch of CASES compiled by Triton for sm_70 under
   the preflight's stand-in driver (tests/triton_preflight.py), the PTX of each variant made acceptable to the
   simulator (simulator_ptx) and checked by CUDA 11.8's ptxas, all variants wrapped into one fatbin.
2. run (a fresh process in the simulator's environment and a fresh folder, as the kit's README says): the fatbin is
   what PYTORCH_BIN names, each variant is registered with the simulator's libcudart under its own name and
   launched with Triton's kernel ABI: the arguments that are not constexprs, then the global and profile scratch
   pointers (NULL: none of our kernels needs scratch), blocks of 32 * num_warps threads, the variant's shared memory.
   The cases stage tensors with the kernel backends' plan code (fusedclip.backends.plan) and build each launch with
   the kernel modules' own argument helpers, so that what runs is what the backend launches.

The simulator calls exit(0) on some of its own errors: success is the last line, "triton-sim: N cases passed",
which the run writes only after every case has been checked (the exit status alone proves nothing); main() checks it
and exits 1 otherwise, with the end of the simulator's log.

Each rewrite in simulator_ptx stands for a gap or bug of the simulator that a case here hit first; a fix of the
simulator (tests/gpusim/gpgpu-sim-*.patch) would make its rewrite unnecessary. Costs (2 shared cores): the compile
about 20 s of CPU (15 variants: Triton, then ptxas 11.8), the run about 10 s of CPU. The stage runs it after the
CUDA kernels' runs: `"$PY" tests/gpusim/triton_sim.py "$PREFIX" || die "the Triton kernels in the simulator"`.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from fusedclip.backends import plan as plan_mod
from fusedclip.backends.triton_backend import GPU_BLOCK, GPU_CHUNK
from reference import assert_rel_close, assert_total_close, random_tensor, ref_tensor_norm, ref_total_norm

ARCH = 70
GUARD = 0xA5  # the byte around every staged tensor: a write outside a tensor shows as a changed guard byte
POISON = -12345.0  # what an output holds before a launch: never a value the kernels write
_ALIGN = 64
DONE = "triton-sim: {} cases passed"


# ---- PTX for the simulator ---------------------------------------------------------------------------------------


def simulator_ptx(ptx: str, name: str, entry: str, threads: int) -> str:
    """Triton's PTX, rewritten into an equivalent one that CUDA 11.8 and GPGPU-Sim's parser take.

    - `.version 8.7` -> 7.8: CUDA 11.8's ptxas, fatbinary and cuobjdump reject a newer ISA version; what Triton emits
      for sm_70 uses nothing newer (ptxas 11.8 assembles the result: compile() checks).
    - `.reqntid N` dropped: the simulator's parser has no such directive (a syntax error). It only states the block
      size, which the launch gives anyway (asserted here against num_warps).
    - `{ %r5 }` -> `%r5`: Triton's loads and stores are inline PTX with a one-element vector operand; the simulator
      takes the braces for a vector and aborts on the write (set_reg: Assertion `reg->uid() > 0' failed).
    - `atom.global.gpu.acq_rel.OP` -> `membar.gl; atom.global.OP; membar.gl` (under the same predicate): the parser
      lacks the memory-model qualifiers (PTX 6.0); fences on both sides keep at least the acquire-release ordering.
    - `0x7632U` -> `0x7632`: the lexer aborts on the unsigned suffix of an integer literal ("U modifier not
      implemented"); the value is the same.
    - `abs.f16 d, a` / `abs.f16x2 d, a` -> `and.b16 d, a, 0x7FFF` / `and.b32 d, a, 0x7FFF7FFF`: the simulator has
      abs for integer, f32 and f64 types only (aborts: "type mismatch"); clearing the sign bit is IEEE abs.
    - `setp.eq.b32` / `setp.ne.b32` (and .b16) -> `.u32` (`.u16`): the simulator's CmpOp lacks the `break` after its
      B16 and B32 cases and falls through to B64, comparing 64 bits of which the upper half is stale (a ticket
      compare in the finalize came out wrong). Equality of the bits is the same under either type.
    - `setp.CMP.f16 p, a, b` -> both converted to f32 (exact), then `setp.CMP.f32`; `setp.CMP.f16x2 p|q, a, b` ->
      the halves unpacked, then two of those: the simulator compares no f16 (aborts in CmpOp).
    - `cvt.f64.f16 d, a` -> `cvt.f32.f16` then `cvt.f64.f32` (both exact): the simulator's conversion table sends
      f16 -> f64 to f2x, which reads the half's 16 bits as a float32 (a 0.04 came out 1.5e-41).
    - `prmt.b32 d, a, b, 0x7632` (two float32 -> the upper halves, packed bf16) -> shr / and / or: the simulator
      builds the 64-bit source as `a.s32 | b << 32`, sign-extending a, so a negative first value turned the second
      into 0xFFFF (NaN). Only this selector is rewritten (asserted: no other prmt).
    - a jump table (`$L_brx_0: .branchtargets A, B, C; brx.idx %r, $L_brx_0;`, LLVM's switch over the dtype arms)
      -> `setp.eq.u32 %pbrx, %r, 0; @%pbrx bra A; ...; bra C;`: the simulator has no brx.idx (an index out of
      range is undefined in PTX, so the last target may take it).
    - the entry `name` renamed `entry`: every variant of a kernel is called the same, and the simulator keeps one
      symbol table for all the PTX it loads."""
    version = re.search(r"^\.version (\d+)\.(\d+)$", ptx, re.MULTILINE)
    assert version and (int(version[1]), int(version[2])) >= (7, 8), "unexpected PTX version line"
    ptx = ptx.replace(version[0], ".version 7.8", 1)
    reqntid = re.findall(r"^\.reqntid (\d+)$", ptx, re.MULTILINE)
    assert reqntid == [str(threads)], f"{name}: .reqntid {reqntid}, launched with {threads} threads"
    ptx = re.sub(r"^\.reqntid \d+\n", "", ptx, flags=re.MULTILINE)
    ptx = re.sub(r"\{\s*(%\w+)\s*\}", r"\1", ptx)
    ptx = re.sub(r"\b(0x[0-9a-fA-F]+|\d+)U\b", r"\1", ptx)
    ptx = re.sub(r"\bsetp\.(eq|ne)\.b(16|32)\b", r"setp.\1.u\2", ptx)
    ptx = re.sub(r"^(\s*)setp\.(\w+)\.f16x2\s+(%\w+)\|(%\w+),\s*(%\w+),\s*(%\w+);", _f16x2_compare, ptx,
                 flags=re.MULTILINE)
    ptx = re.sub(r"^(\s*)setp\.(\w+)\.f16\s+(%\w+),\s*(%\w+),\s*(%\w+);",
                 r"\1cvt.f32.f16 %fcmp0, \4;\n\1cvt.f32.f16 %fcmp1, \5;\n\1setp.\2.f32 \3, %fcmp0, %fcmp1;", ptx,
                 flags=re.MULTILINE)
    ptx = re.sub(r"^(\s*)cvt\.f64\.f16\s+(%\w+),\s*(%\w+);",
                 r"\1cvt.f32.f16 %fcmp0, \3;\n\1cvt.f64.f32 \2, %fcmp0;", ptx, flags=re.MULTILINE)
    ptx = re.sub(r"^(\s*)prmt\.b32\s+(%\w+),\s*(%\w+),\s*(%\w+),\s*0x7632;",
                 r"\1shr.u32 %prmt0, \3, 16;\n\1and.b32 %prmt1, \4, 0xFFFF0000;\n\1or.b32 \2, %prmt0, %prmt1;", ptx,
                 flags=re.MULTILINE)
    assert "prmt." not in ptx, f"{name}: a prmt with another selector"
    ptx = re.sub(r"\babs\.f16x2\s+(%\w+),\s*(%\w+);", r"and.b32 \1, \2, 0x7FFF7FFF;", ptx)
    ptx = re.sub(r"\babs\.f16\s+(%\w+),\s*(%\w+);", r"and.b16 \1, \2, 0x7FFF;", ptx)
    ptx = re.sub(r"^(\s*)(@!?%p\d+\s+)?atom\.global\.gpu\.acq_rel\.(.*)$",
                 r"\1\2membar.gl;\n\1\2atom.global.\3\n\1\2membar.gl;", ptx, flags=re.MULTILINE)
    ptx = re.sub(r"^(\s*)(\$L_brx_\d+): \.branchtargets\s*([^;]*);\s*\n\s*brx\.idx\s+(%\w+),\s*\2;", _branches, ptx,
                 flags=re.MULTILINE)
    # the registers these rewrites use
    scratch = ".reg .pred %pbrx;\n.reg .f32 %fcmp<2>;\n.reg .b16 %hcmp<4>;\n.reg .b32 %prmt<2>;\n"
    ptx = re.sub(r"^(\.visible \.entry [^{]*\{\n)", lambda m: m[1] + scratch, ptx, count=1, flags=re.MULTILINE)
    assert "brx" not in ptx.replace("%pbrx", ""), f"{name}: a jump table left"
    return re.sub(rf"\b{re.escape(name)}(?=\b|_param_)", entry, ptx)


def _f16x2_compare(m: re.Match) -> str:
    indent, cmp, p, q, a, b = m.groups()
    lines = [f"mov.b32 {{%hcmp0, %hcmp1}}, {a};", f"mov.b32 {{%hcmp2, %hcmp3}}, {b};"]
    for pred, x, y in ((p, 0, 2), (q, 1, 3)):
        lines += [f"cvt.f32.f16 %fcmp0, %hcmp{x};", f"cvt.f32.f16 %fcmp1, %hcmp{y};",
                  f"setp.{cmp}.f32 {pred}, %fcmp0, %fcmp1;"]
    return "\n".join(indent + line for line in lines)


def _branches(m: re.Match) -> str:
    indent, _, targets, index = m.groups()
    labels = [t.strip() for t in targets.split(",")]
    out = [f"{indent}setp.eq.u32 %pbrx, {index}, {i};\n{indent}@%pbrx bra {label};"
           for i, label in enumerate(labels[:-1])]
    return "\n".join(out + [f"{indent}bra {labels[-1]};"])


# ---- the cases ---------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    kernel: object  # a JITFunction
    grid: tuple
    args: tuple
    num_warps: int


@dataclass
class Case:
    """Tensors staged with their plan, the launches a backend call makes over them, and a check of the result.
    `launches(plan, out)` gets the plan's tables (CPU) and `out`, this case's output tensors by name (CPU, created by
    `outputs(plan)`); `check(tensors, plan, out, after)` gets them back from the device with the tensors after."""

    name: str
    tensors: list[Tensor]
    chunk: int
    block: int
    outputs: Callable[[plan_mod.DevicePlan], dict[str, Tensor]]
    launches: Callable[[plan_mod.DevicePlan, dict[str, Tensor], int], list[Launch]]
    check: Callable[..., None]
    shifts: list[int] | None = None


FOUR = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _mixed(seed: int, dtypes=FOUR[:3]) -> list[Tensor]:
    """Odd sizes across several chunks, a 1-element and an empty tensor, magnitudes 1e-2..1e2."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [5003, 1, 0, 777, 2 * 1024 + 37, 3, 1500]
    return [random_tensor((n,), dtypes[i % len(dtypes)], gen=gen, scale=10.0 ** (i % 5 - 2)) for i, n in
            enumerate(sizes)]


def _norm_case(name: str, tensors: list[Tensor], p: float, chunk: int = 1024, block: int = 512) -> Case:
    from fusedclip.triton_kernels import multi_tensor_norm as mtn

    max_norm = 0.5

    def outputs(plan):
        acc = plan.acc_dtype
        return {"partials": torch.full((plan.num_chunks,), POISON, dtype=acc),
                "tensor_vals": torch.full((plan.num_tensors,), POISON, dtype=acc),
                "norms": torch.full((plan.num_tensors,), POISON, dtype=acc),
                "total": torch.full((1,), POISON, dtype=acc), "coef": torch.full((1,), POISON, dtype=acc)}

    def launches(plan, out, blk):
        (g1, a1), (g2, a2) = mtn._launches(
            plan.meta, plan.chunk_tensor, plan.chunk_start, plan.tensor_chunks, plan.ticket, plan.num_tensors,
            plan.num_chunks, plan.chunk_size, plan.acc_dtype, p, out["partials"], out["tensor_vals"], out["norms"],
            out["total"], out["coef"], True, max_norm, blk)
        return [Launch(mtn._reduce_kernel, g1, a1, 4), Launch(mtn._finalize_kernel, g2, a2, 4)]

    def check(tensors, plan, out, after):
        acc = plan.acc_dtype
        ref = ref_total_norm(tensors, p)
        assert_total_close(out["total"][0], ref, acc, f"{name}: total")
        # Per-tensor: an empty tensor's -inf norm is undefined (torch raises), so not compared.
        keep = torch.tensor([t.numel() > 0 or p != -math.inf for t in tensors])
        per = torch.tensor([ref_tensor_norm(t, p) for t in tensors], dtype=torch.float64)[keep]
        norms = out["norms"][keep]
        if math.isinf(p) or p == 0:
            torch.testing.assert_close(norms.double(), per.to(acc).double(), rtol=0, atol=0, equal_nan=True,
                                       msg=f"{name}: per-tensor norms")
        else:
            assert_rel_close(norms, per, 1e-5 if acc == torch.float32 else 1e-12, f"{name}: per-tensor norms")
        # torch's clamp(max_norm / (total + 1e-6), max=1) of the returned total (NaN stays NaN)
        coef = ((1.0 / (out["total"].double() + 1e-6)).to(acc).double() * max_norm).clamp(max=1.0)
        if coef.isnan().all():
            assert out["coef"].isnan().all(), f"{name}: coefficient {out['coef']}, expected NaN"
        else:
            assert_rel_close(out["coef"], coef, 2 * torch.finfo(acc).eps, f"{name}: coefficient")
        for t, a in zip(tensors, after):
            assert torch.equal(t.view(torch.uint8), a.view(torch.uint8)), f"{name}: the norm changed a tensor"

    return Case(name, tensors, chunk, block, outputs, launches, check, shifts=[i % 3 for i in range(len(tensors))])


def _scale_case(name: str, tensors: list[Tensor], coef: Tensor, per_tensor: bool, chunk: int = 4096,
                block: int = 512) -> Case:
    from fusedclip.triton_kernels import scale

    def launches(plan, out, blk):
        return [Launch(scale._scale_kernel, (plan.num_chunks,),
                       scale._args(plan.meta, plan.chunk_tensor, plan.chunk_start, plan.num_tensors, plan.chunk_size,
                                   out["coef"], per_tensor, blk), 4)]

    def check(tensors, plan, out, after):
        for i, (t, a) in enumerate(zip(tensors, after)):
            c = coef[i] if per_tensor else coef[0]
            math_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32  # torch's opmath, rounded once
            expected = (t.to(math_dtype) * c.to(math_dtype)).to(t.dtype)
            assert torch.equal(a.view(torch.uint8), expected.view(torch.uint8)), (
                f"{name}: tensor {i} ({t.dtype}, {t.numel()}) differs from torch's product in "
                f"{int((a != expected).sum())} places")

    return Case(name, tensors, chunk, block, lambda plan: {"coef": coef.clone()}, launches, check,
                shifts=[(i + 1) % 4 for i in range(len(tensors))])


def _clamp_case(name: str, tensors: list[Tensor], clip_value: float, chunk: int = 4096, block: int = 512) -> Case:
    from fusedclip.triton_kernels import clamp

    def launches(plan, out, blk):
        return [Launch(clamp._clamp_kernel, (plan.num_chunks,),
                       clamp._args(plan.meta, plan.chunk_tensor, plan.chunk_start, plan.num_tensors, plan.chunk_size,
                                   clip_value, blk), 4)]

    def check(tensors, plan, out, after):
        for i, (t, a) in enumerate(zip(tensors, after)):
            expected = t.clamp(-clip_value, clip_value)
            assert torch.equal(a.view(torch.uint8), expected.view(torch.uint8)), f"{name}: tensor {i} ({t.dtype})"

    return Case(name, tensors, chunk, block, lambda plan: {}, launches, check,
                shifts=[(i + 2) % 4 for i in range(len(tensors))])


def cases() -> list[Case]:
    """Seeded, so the compile and the run build the same launches."""
    out = [_norm_case(f"norm p={p}", _mixed(1), p) for p in (2.0, 1.0, float("inf"), float("-inf"), 0.0, 3.0)]
    out.append(_norm_case("norm p=2 four dtypes (float64 accumulation)", _mixed(2, FOUR), 2.0))
    out.append(_norm_case("norm p=3 all float64", _mixed(6, (torch.float64,)), 3.0))
    with_nan = _mixed(3)
    with_nan[3][100] = float("nan")
    out.append(_norm_case("norm p=inf NaN", with_nan, float("inf")))
    mixed = _mixed(4, FOUR)
    out.append(_scale_case("scale global", mixed, torch.tensor([0.3721], dtype=torch.float32), False))
    coefs = torch.linspace(0.1, 1.9, len(mixed), dtype=torch.float64)
    coefs[2] = 1.0  # a coefficient of exactly 1: that tensor is skipped
    out.append(_scale_case("scale per-tensor float64", mixed, coefs, True))
    out.append(_clamp_case("clamp", _mixed(5, FOUR), 0.05))
    # The shipped configuration (TritonBackend on a GPU): 65,536-element chunks, 2,048-element blocks.
    gen = torch.Generator().manual_seed(7)
    big = [random_tensor((n,), d, gen=gen) for n, d in ((70001, torch.float32), (9001, torch.bfloat16),
                                                         (4099, torch.float16))]
    out.append(_norm_case("norm p=2 shipped chunk and block", big, 2.0, GPU_CHUNK, GPU_BLOCK))
    out.append(_scale_case("scale shipped chunk and block", big, torch.tensor([0.61], dtype=torch.float32), False,
                           GPU_CHUNK, GPU_BLOCK))
    return out


# ---- staging (shared by the compile and the run) -----------------------------------------------------------------


def stage_host(case: Case) -> tuple[Tensor, list[int], plan_mod.DevicePlan]:
    """The case's tensors in one host arena (guard bytes around each, tensor i shifts[i] elements past a 64-byte
    boundary) and their plan, built by the backends' code over the arena's views."""
    shifts = case.shifts or [0] * len(case.tensors)
    offsets, size = [], 0
    for t, shift in zip(case.tensors, shifts):
        size = -(-(size + _ALIGN) // _ALIGN) * _ALIGN + shift * t.element_size()
        offsets.append(size)
        size += t.numel() * t.element_size()
    host = torch.full((size + _ALIGN,), GUARD, dtype=torch.uint8)
    views = []
    for t, off in zip(case.tensors, offsets):
        views.append(host[off : off + t.numel() * t.element_size()].view(t.dtype))
        views[-1].copy_(t.reshape(-1))
    return host, offsets, plan_mod._build(views, case.chunk)


def kernel_block(case: Case) -> int:
    """The block the backend would pass (TritonBackend: no wider than a chunk)."""
    return max(2, min(case.block, 1 << max(0, (case.chunk - 1).bit_length())))


# ---- 1. compile --------------------------------------------------------------------------------------------------


def compile_all(prefix: str, out_dir: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") != "1", "compile with TRITON_INTERPRET unset"
    import triton_preflight
    from triton import knobs
    from triton.runtime.driver import driver

    knobs.compilation.disable_line_info = True  # the parser takes no debug sections
    previous = driver._active
    driver.set_active(triton_preflight._stand_in_driver(ARCH))
    variants: dict[str, dict] = {}  # Triton's hash -> variant
    order = []  # per case, per launch: the variant's entry name
    try:
        for case in cases():
            _, _, plan = stage_host(case)
            names = []
            for launch in case.launches(plan, case.outputs(plan), kernel_block(case)):
                compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, num_warps=launch.num_warps)
                md = compiled.metadata
                if md.hash not in variants:
                    assert md.global_scratch_size == 0 and md.profile_scratch_size == 0, "scratch is not passed"
                    entry = f"{md.name}_v{len(variants)}"
                    # The parameters in the PTX: neither constexpr nor specialised into a constant (an int of 1).
                    types = list(compiled.src.signature.values())
                    constants = {k[0] for k in compiled.src.constants}
                    passed = [i for i, ty in enumerate(types) if ty != "constexpr" and i not in constants]
                    variants[md.hash] = {
                        "entry": entry, "passed": passed, "params": [types[i] for i in passed],
                        "threads": 32 * md.num_warps, "shared": md.shared,
                        "ptx": simulator_ptx(compiled.asm["ptx"], md.name, entry, 32 * md.num_warps),
                    }
                names.append(variants[md.hash]["entry"])
            order.append(names)
    finally:
        driver.set_active(previous)
    os.makedirs(out_dir, exist_ok=True)
    tools = Path(prefix) / "cuda11" / "bin"
    images = []
    for v in variants.values():
        path = os.path.join(out_dir, v["entry"] + ".ptx")
        with open(path, "w") as f:
            f.write(v.pop("ptx"))
        subprocess.run([tools / "ptxas", f"-arch=sm_{ARCH}", path, "-o", os.devnull], check=True)
        images.append(f"--image3=kind=ptx,sm={ARCH},file={path}")
    subprocess.run([tools / "fatbinary", f"--create={out_dir}/kernels.fatbin", "-64", *images], check=True)
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump({"variants": list(variants.values()), "order": order}, f, indent=1)


# ---- 2. run, inside the simulator --------------------------------------------------------------------------------

_CTYPES = {"i1": ctypes.c_int8, "i8": ctypes.c_int8, "i16": ctypes.c_int16, "i32": ctypes.c_int32,
           "i64": ctypes.c_int64, "u32": ctypes.c_uint32, "u64": ctypes.c_uint64, "fp32": ctypes.c_float,
           "fp64": ctypes.c_double}


class Device:
    """The simulator's libcudart through ctypes: memory, and Triton kernels registered by name from the fatbin."""

    def __init__(self, fatbin: str) -> None:
        os.environ["PYTORCH_BIN"] = fatbin  # where the simulator reads PTX from (with cuobjdump), at registration
        rt = self.rt = ctypes.CDLL("libcudart.so")  # the simulator's: runenv.sh puts it first on LD_LIBRARY_PATH
        vp = ctypes.c_void_p
        # getattr: a name starting with two underscores would be mangled inside a class
        register_fatbin, self._register_function = (getattr(rt, f) for f in ("__cudaRegisterFatBinary",
                                                                              "__cudaRegisterFunction"))
        register_fatbin.restype = vp
        register_fatbin.argtypes = [vp]
        self._register_function.argtypes = [vp, vp, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int] + [vp] * 5
        rt.cudaMalloc.argtypes = [ctypes.POINTER(vp), ctypes.c_size_t]
        rt.cudaFree.argtypes = [vp]
        rt.cudaMemcpy.argtypes = [vp, vp, ctypes.c_size_t, ctypes.c_int]
        rt.cuLaunchKernel.argtypes = [vp] + [ctypes.c_uint] * 7 + [vp, vp, vp]
        # The simulator ignores the fatbin handed to it (it reads PYTORCH_BIN): any buffer will do.
        self._fatbin_arg = ctypes.create_string_buffer(64)
        self._handle = register_fatbin(self._fatbin_arg)
        self._host_funs: dict[str, ctypes.Array] = {}

    def register(self, entry: str) -> None:
        """A kernel's host-side handle is any unique address: a buffer holding its name."""
        name = entry.encode()
        self._host_funs[entry] = ctypes.create_string_buffer(name)
        self._register_function(self._handle, self._host_funs[entry], name, name, -1, *[None] * 5)

    def upload(self, t: Tensor) -> int:
        t = t.contiguous()
        ptr = ctypes.c_void_p()
        assert self.rt.cudaMalloc(ctypes.byref(ptr), max(t.numel() * t.element_size(), 1)) == 0, "cudaMalloc"
        assert self.rt.cudaMemcpy(ptr, t.data_ptr(), t.numel() * t.element_size(), 1) == 0, "cudaMemcpy H2D"
        return ptr.value

    def download(self, ptr: int, like: Tensor) -> Tensor:
        out = torch.empty_like(like).contiguous()
        assert self.rt.cudaMemcpy(out.data_ptr(), ptr, out.numel() * out.element_size(), 2) == 0, "cudaMemcpy D2H"
        return out

    def free(self, ptr: int) -> None:
        assert self.rt.cudaFree(ptr) == 0, "cudaFree"

    def launch(self, variant: dict, grid: tuple, values: list) -> None:
        """Triton's ABI: the passed arguments in order, then the global and profile scratch pointers."""
        args = [ctypes.c_void_p(v) if ty.startswith("*") else _CTYPES[ty](v)
                for ty, v in zip(variant["params"], values)]
        args += [ctypes.c_void_p(0), ctypes.c_void_p(0)]
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        rc = self.rt.cuLaunchKernel(self._host_funs[variant["entry"]], gx, gy, gz, variant["threads"], 1, 1,
                                    variant["shared"], None, params, None)
        assert rc == 0, f"cuLaunchKernel {variant['entry']}: {rc}"
        assert self.rt.cudaDeviceSynchronize() == 0, f"{variant['entry']}: cudaDeviceSynchronize"


def run_case(dev: Device, case: Case, variants: list[dict]) -> None:
    host, offsets, plan = stage_host(case)
    out = case.outputs(plan)
    arena = dev.upload(host)
    owned = [arena]
    meta = plan.meta.clone()
    meta[0] += arena - host.data_ptr()  # addresses into the device arena
    device_of = {id(plan.meta): dev.upload(meta)}  # a (CPU) table or output -> its device copy
    owned.append(device_of[id(plan.meta)])
    try:
        for launch, variant in zip(case.launches(plan, out, kernel_block(case)), variants):
            values = []
            for i in variant["passed"]:
                a = launch.args[i]
                if isinstance(a, Tensor):
                    if id(a) not in device_of:
                        device_of[id(a)] = dev.upload(a)
                        owned.append(device_of[id(a)])
                    a = device_of[id(a)]
                values.append(a if isinstance(a, float) else int(a))
            dev.launch(variant, launch.grid, values)
        got = {k: dev.download(device_of[id(t)], t) if id(t) in device_of else t for k, t in out.items()}
        after_arena = dev.download(arena, host)
        outside = torch.ones(host.numel(), dtype=torch.bool)
        after = []
        for t, off in zip(case.tensors, offsets):
            nbytes = t.numel() * t.element_size()
            outside[off : off + nbytes] = False
            after.append(after_arena[off : off + nbytes].view(t.dtype).view(t.shape))
        changed = outside & (after_arena != host)
        assert not bool(changed.any()), f"{case.name}: {int(changed.sum())} bytes written outside every tensor"
        case.check(case.tensors, plan, got, after)
    finally:
        for ptr in owned:
            dev.free(ptr)


def run_all(build_dir: str) -> None:
    with open(os.path.join(build_dir, "manifest.json")) as f:
        manifest = json.load(f)
    by_entry = {v["entry"]: v for v in manifest["variants"]}
    report = os.dup(1)
    with open("triton-sim.log", "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)  # the simulator prints pages per launch (C stdio): into the log

        def say(text: str) -> None:
            ctypes.CDLL(None).fflush(None)
            os.write(report, (text + "\n").encode())

        dev = Device(os.path.join(build_dir, "kernels.fatbin"))
        for entry in by_entry:
            dev.register(entry)
        all_cases = cases()
        assert len(all_cases) == len(manifest["order"]), "the manifest is of other cases: compile again"
        for case, entries in zip(all_cases, manifest["order"]):
            run_case(dev, case, [by_entry[e] for e in entries])
            say(f"  ok  {case.name}")
        say(DONE.format(len(all_cases)))


def main(prefix: str) -> int:
    with tempfile.TemporaryDirectory(prefix="fusedclip-triton-sim-") as work:
        build = os.path.join(work, "build")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = os.path.join(work, "triton-cache")
        subprocess.run([sys.executable, __file__, "--compile", prefix, build], env=env, check=True)
        run_dir = os.path.join(work, "run")
        os.makedirs(run_dir)
        for cfg in (Path(prefix) / "config").iterdir():
            (Path(run_dir) / cfg.name).write_bytes(cfg.read_bytes())
        script = f'source "{prefix}/runenv.sh" && exec "{sys.executable}" "{__file__}" --run "{build}"'
        proc = subprocess.run(["bash", "-c", script], cwd=run_dir, env=env, capture_output=True, text=True,
                              check=False)
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        if proc.returncode != 0 or not proc.stdout.strip().endswith(DONE.format(len(cases()))):
            log = Path(run_dir) / "triton-sim.log"
            tail = log.read_text(errors="replace").splitlines()[-30:] if log.exists() else []
            print("\n".join(["--- the simulator's log, last lines:", *tail]), file=sys.stderr)
            print(f"triton-sim: FAILED (exit {proc.returncode})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--compile":
        compile_all(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "--run":
        run_all(sys.argv[2])
    else:
        sys.exit(main(os.path.abspath(sys.argv[1])))
