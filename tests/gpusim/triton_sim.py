"""fusedclip's Triton kernels executed in GPGPU-Sim (a simulator, not a GPU), every result against float64.

    python tests/gpusim/triton_sim.py PREFIX    # PREFIX: the simulator kit's prefix (../shared/gpusim/setup.sh)

Each case is a call of the Triton backend itself (TritonBackend: norms, norm_and_coef, scale_, clamp_, the prepared
calls of a kept plan, AGC's unit norms) over tensors staged by sim.py (one arena with guard bytes, misaligned views,
the plan built by fusedclip.backends.plan). Every kernel of fusedclip.triton_kernels is replaced in its module by a
stand-in (`intercepted`) that receives exactly what the backend's launcher passes, `kernel[grid](*args, num_warps=..,
**launch.OPTIONS)`, and:

1. compile (this process; TRITON_INTERPRET must be unset): compiles it, `kernel.warmup(*args, grid=grid, **options)`,
   for sm_70 under the preflight's stand-in driver (tests/triton_preflight.py); each variant's PTX is made acceptable
   to the simulator (simulator_ptx), all are joined into one module (one_module), checked by CUDA 11.8's ptxas and
   put in a fatbin, with a manifest from each launch's key (launch.spec: what Triton specialises on, the constexprs,
   the options) to its variant. The Triton cache (TRITON_CACHE_DIR; the stage keeps one) makes a second compile cheap.
2. run (a fresh process in the simulator's environment and a fresh folder, as the kit's README says): the fatbin is
   what PYTORCH_BIN names, each variant is registered with the simulator's libcudart under its own name; the
   stand-in looks the launch's variant up by its key (a launch that was not compiled fails) and launches it with
   Triton's kernel ABI: the arguments that are neither constexprs nor specialised into constants, then the global and
   profile scratch pointers (NULL: none of our kernels has scratch), blocks of 32 * num_warps threads, the variant's
   shared memory. A CPU tensor argument (a plan table, an output the backend allocated) is mirrored in device memory
   (sim.Staged.device_ptr) and read back after the launch, so the backend's results are CPU tensors when it returns.
   Uninitialized memory is NaN-filled (torch's deterministic mode), so an output the kernels do not write shows.

The simulator calls exit(0) on some of its own errors: success is the last line, "triton-sim: N cases passed",
which the run writes only after every case has been checked (the exit status alone proves nothing); main() checks it
and exits 1 otherwise, with the end of the simulator's log. With FUSEDCLIP_GPUSIM_STATS set, the run writes what it
ran there (run.json: cases, launches by kernel, CPU seconds), which .ci/gpusim-stage.sh prints.
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
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import sim as simlib  # noqa: E402
from fusedclip.backends.plan import DevicePlan  # noqa: E402
from fusedclip.backends.triton_backend import GPU_BLOCK, GPU_CHUNK, TritonBackend  # noqa: E402
from reference import (  # noqa: E402
    assert_rel_close,
    assert_total_close,
    expected_coef,
    expected_scaled,
    expected_tensor_norm,
    random_tensor,
    ref_total_norm,
    same_bits,
)

ARCH = 70
DONE = "triton-sim: {} cases passed"


# ---- PTX for the simulator ---------------------------------------------------------------------------------------


def simulator_ptx(ptx: str, name: str, entry: str, threads: int) -> str:
    """Triton's PTX, rewritten into an equivalent one that CUDA 11.8 and GPGPU-Sim take. Each rewrite stands for a gap
    of the toolchain or the simulator that a case here hit first. What the simulator got wrong is fixed in the
    simulator instead (tests/gpusim/gpgpu-sim-*.patch, README.md): setp.eq/ne.b16/b32 (compared 64 bits), prmt (a
    sign-extended first operand), cvt.f64.f16 (read the half as a float); so are two gaps with a short fix, the
    `.reqntid N` directive and the U suffix of an integer literal (gpgpu-sim-ptx-parser.patch). What stays here is
    what the simulator lacks and a patch could not add simply:

    - `.version 8.7` -> 7.8: CUDA 11.8's ptxas, fatbinary and cuobjdump reject a newer ISA version; what Triton emits
      for sm_70 uses nothing newer (ptxas 11.8 assembles the result: compile_all() checks).
    - `{ %r5 }` -> `%r5`: Triton's loads and stores are inline PTX with a one-element vector operand; the simulator
      takes the braces for a vector and aborts on the write (set_reg: Assertion `reg->uid() > 0' failed).
    - `atom.global.gpu.acq_rel.OP` -> `membar.gl; atom.global.OP; membar.gl` (under the same predicate): the parser
      lacks the memory-model qualifiers (PTX 6.0); fences on both sides keep at least the acquire-release ordering.
    - `abs.f16 d, a` / `abs.f16x2 d, a` -> `and.b16 d, a, 0x7FFF` / `and.b32 d, a, 0x7FFF7FFF`: the simulator has
      abs for integer, f32 and f64 types only (aborts: "type mismatch"); clearing the sign bit is IEEE abs. (Its
      lexer reads .f16x2 as .f16, so a patch of abs would have to tell the two apart first.)
    - `setp.CMP.f16 p, a, b` -> both converted to f32 (exact), then `setp.CMP.f32`; `setp.CMP.f16x2 p|q, a, b` ->
      the halves unpacked, then two of those: the simulator compares no f16 (aborts in CmpOp), and its setp writes
      one predicate only.
    - a jump table (`$L_brx_0: .branchtargets A, B, C; brx.idx %r, $L_brx_0;`, LLVM's switch over the dtype arms)
      -> `setp.eq.u32 %pbrx, %r, 0; @%pbrx bra A; ...; bra C;`: the simulator's brx is ptxplus's (a register
      holding a PC) and its parser has no .branchtargets list, nor its reconvergence analysis indirect branches (an
      index out of range is undefined in PTX, so the last target may take it).
    - the entry `name` renamed `entry`: every variant of a kernel is called the same, and the simulator keeps one
      symbol table for all the PTX it loads."""
    version = re.search(r"^\.version (\d+)\.(\d+)$", ptx, re.MULTILINE)
    assert version and (int(version[1]), int(version[2])) >= (7, 8), "unexpected PTX version line"
    ptx = ptx.replace(version[0], ".version 7.8", 1)
    reqntid = re.findall(r"^\.reqntid (\d+)$", ptx, re.MULTILINE)
    assert reqntid == [str(threads)], f"{name}: .reqntid {reqntid}, launched with {threads} threads"
    ptx = re.sub(r"\{\s*(%\w+)\s*\}", r"\1", ptx)
    ptx = re.sub(r"^(\s*)setp\.(\w+)\.f16x2\s+(%\w+)\|(%\w+),\s*(%\w+),\s*(%\w+);", _f16x2_compare, ptx,
                 flags=re.MULTILINE)
    ptx = re.sub(r"^(\s*)setp\.(\w+)\.f16\s+(%\w+),\s*(%\w+),\s*(%\w+);",
                 r"\1cvt.f32.f16 %fcmp0, \4;\n\1cvt.f32.f16 %fcmp1, \5;\n\1setp.\2.f32 \3, %fcmp0, %fcmp1;", ptx,
                 flags=re.MULTILINE)
    ptx = re.sub(r"\babs\.f16x2\s+(%\w+),\s*(%\w+);", r"and.b32 \1, \2, 0x7FFF7FFF;", ptx)
    ptx = re.sub(r"\babs\.f16\s+(%\w+),\s*(%\w+);", r"and.b16 \1, \2, 0x7FFF;", ptx)
    ptx = re.sub(r"^(\s*)(@!?%p\d+\s+)?atom\.global\.gpu\.acq_rel\.(.*)$",
                 r"\1\2membar.gl;\n\1\2atom.global.\3\n\1\2membar.gl;", ptx, flags=re.MULTILINE)
    ptx = re.sub(r"^(\s*)(\$L_brx_\d+): \.branchtargets\s*([^;]*);\s*\n\s*brx\.idx\s+(%\w+),\s*\2;", _branches, ptx,
                 flags=re.MULTILINE)
    # the registers these rewrites use
    scratch = ".reg .pred %pbrx;\n.reg .f32 %fcmp<2>;\n.reg .b16 %hcmp<4>;\n"
    ptx = re.sub(r"^(\.visible \.entry [^{]*\{\n)", lambda m: m[1] + scratch, ptx, count=1, flags=re.MULTILINE)
    assert "brx" not in ptx.replace("%pbrx", ""), f"{name}: a jump table left"
    return re.sub(rf"\b{re.escape(name)}(?=\b|_param_)", entry, ptx)


def one_module(ptxs: list[str]) -> str:
    """The variants' PTX as one module: one header, each module-level declaration once (every variant declares
    `.extern .shared ... global_smem[]`), then every entry. One module is one ptxas run, here and in the simulator,
    which assembles each module it registers (32 modules cost it 9 s, one 6 s)."""
    header: list[str] | None = None
    declarations: list[str] = []
    entries = []
    for ptx in ptxs:
        head, entry, body = ptx.partition("\n.visible .entry ")
        assert entry, "no entry in a variant's PTX"
        lines = [line for line in head.splitlines() if line.strip() and not line.lstrip().startswith("//")]
        this = [line for line in lines if line.startswith((".version", ".target", ".address_size"))]
        assert header in (None, this), f"variants for other targets: {header}, {this}"
        header = this
        declarations += [line for line in lines if line not in this and line not in declarations]
        entries.append(entry.lstrip("\n") + body)
    return "\n".join([*header, *declarations, "", *entries])


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


# ---- the launches, as the backend makes them ---------------------------------------------------------------------


def our_kernels() -> dict[str, tuple[dict, str]]:
    """Every Triton kernel of fusedclip.triton_kernels: "module:name" -> (the module's namespace, the name)."""
    import triton_preflight

    return {key: (sys.modules[key.split(":")[0]].__dict__, key.split(":")[1])
            for key in triton_preflight.our_kernels()}


OnLaunch = Callable[[str, object, tuple, tuple, dict], None]  # (kernel "module:name", JITFunction, grid, args, options)


class _StandIn:
    """In place of a kernel in its module: launch.Launcher finds another object there than the kernel it wraps, so it
    launches the way Triton's API does, `kernel[grid](*args, **options)`, and that lands in `on_launch`."""

    def __init__(self, key: str, kernel: object, on_launch: OnLaunch) -> None:
        self.key, self.kernel, self.on_launch = key, kernel, on_launch

    def __getitem__(self, grid: tuple) -> Callable:
        return lambda *args, **options: self.on_launch(self.key, self.kernel, tuple(grid), args, options)


@contextmanager
def intercepted(on_launch: OnLaunch):
    """Every launch of our kernels goes to `on_launch` instead."""
    kernels = our_kernels()
    saved = {key: namespace[name] for key, (namespace, name) in kernels.items()}
    for key, (namespace, name) in kernels.items():
        namespace[name] = _StandIn(key, saved[key], on_launch)
    try:
        yield
    finally:
        for key, (namespace, name) in kernels.items():
            namespace[name] = saved[key]


def launch_key(key: str, kernel: object, args: tuple, options: dict) -> str:
    """What picks the compiled variant of a launch (launch.py: finer than Triton's own key, never coarser)."""
    from fusedclip.triton_kernels.launch import _constexpr_flags, spec

    flags = _constexpr_flags(kernel)
    return repr((key, sorted(options.items()), [a if c else spec(a) for a, c in zip(args, flags)]))


# ---- the cases ---------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """Tensors staged with their plan (chunk elements a program; `block`: the backend's), a call of the backend over
    the plan that returns what it computed (CPU tensors, by name), and a check of those against float64
    (`check(results, after)`, `after`: the tensors as they are in device memory afterwards)."""

    name: str
    tensors: list[Tensor]
    chunk: int
    block: int
    call: Callable[[TritonBackend, DevicePlan], dict]
    check: Callable[[dict, list[Tensor]], None]
    shifts: list[int] | None = None
    unit_rows: list[int] | None = None


FOUR = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _mixed(seed: int, dtypes=FOUR[:3], sizes=(5003, 1, 0, 777, 2 * 1024 + 37, 3, 1500)) -> list[Tensor]:
    """Odd sizes across several chunks, a 1-element and an empty tensor, magnitudes 1e-2..1e2."""
    gen = torch.Generator().manual_seed(seed)
    return [random_tensor((n,), dtypes[i % len(dtypes)], gen=gen, scale=10.0 ** (i % 5 - 2)) for i, n in
            enumerate(sizes)]


def _shifts(tensors: list[Tensor], k: int) -> list[int]:
    return [(i + k) % 4 for i in range(len(tensors))]


def _check_total(name: str, tensors: list[Tensor], p: float, total: Tensor) -> None:
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    assert_total_close(total.reshape(()), ref_total_norm(tensors, p), acc, f"{name}: total")


def _check_norms(name: str, tensors: list[Tensor], p: float, norms: Tensor) -> None:
    """Per-tensor norms against torch's in float64 (an empty tensor's: the fold's identity); max, min and counts
    exactly."""
    ref = torch.tensor([expected_tensor_norm(t, p) for t in tensors], dtype=torch.float64)
    if math.isinf(p) or p == 0:
        torch.testing.assert_close(norms.double(), ref.to(norms.dtype).double(), rtol=0, atol=0, equal_nan=True,
                                   msg=f"{name}: per-tensor norms")
    else:
        assert_rel_close(norms, ref, 1e-5 if norms.dtype == torch.float32 else 1e-12, f"{name}: per-tensor norms")


def _check_coef(name: str, total: Tensor, coef: Tensor, max_norm: float) -> None:
    """torch's clamp(max_norm / (total + 1e-6), max=1) of the returned total, as the kernel evaluates it: the same
    bits."""
    want = expected_coef(total.reshape(()), max_norm)
    assert same_bits(coef, want), f"{name}: coefficient {coef.tolist()}, expected {want.item()} (total {total})"


def _check_scaled(name: str, tensors: list[Tensor], coefs: list[float], coef_dtype: torch.dtype,
                  after: list[Tensor]) -> None:
    """Each tensor times its coefficient as the kernel computes it (torch's opmath, rounded once to the tensor's
    dtype), the same bits; a coefficient of 1 leaves the tensor as it was."""
    for i, (t, c, a) in enumerate(zip(tensors, coefs, after)):
        want = t if c == 1.0 else expected_scaled(t, c, coef_dtype)
        assert same_bits(a, want), (f"{name}: tensor {i} ({t.dtype}, {t.numel()}) differs from the product in "
                                    f"{int((a != want).sum())} places")


def _unchanged(name: str, tensors: list[Tensor], after: list[Tensor]) -> None:
    for i, (t, a) in enumerate(zip(tensors, after)):
        assert same_bits(t, a), f"{name}: the norm changed tensor {i}"


def _norm_case(name: str, tensors: list[Tensor], p: float, chunk: int = 1024, block: int = 512,
               max_norm: float = 0.5) -> Case:
    """norms() per tensor, then norm_and_coef(): the same total, bit for bit (the finalize's sums do not depend on
    whether per-tensor values are wanted), and the coefficient."""

    def call(b, plan):
        total, norms = b.norms(None, p, True, plan=plan)
        total2, coef = b.norm_and_coef(None, p, max_norm, plan=plan)
        return {"total": total, "norms": norms, "total2": total2, "coef": coef}

    def check(r, after):
        _check_total(name, tensors, p, r["total"])
        _check_norms(name, tensors, p, r["norms"])
        assert same_bits(r["total"], r["total2"]), f"{name}: total {r['total']}, then {r['total2']}"
        _check_coef(name, r["total2"], r["coef"], max_norm)
        _unchanged(name, tensors, after)

    return Case(name, tensors, chunk, block, call, check, shifts=_shifts(tensors, 0))


def _prepared_clip_case(name: str, tensors: list[Tensor], p: float, chunk: int, block: int,
                        max_norm: float) -> Case:
    """A kept plan's calls (fusedclip.fastpath): prepare_norm twice (the ticket is back to zero after each, the bits
    the same; the slabs' values over the partials, or for p = 0 the tiles' counts in tensor_vals), then
    prepare_clip_norm: the total, the coefficient in the plan's scratch, every tensor scaled by it."""

    def call(b, plan):
        norm = b.prepare_norm(plan, p)
        first, second = norm(), norm()
        ticket_after = plan.scratch().ticket.clone()
        total = b.prepare_clip_norm(plan, p, max_norm)()
        return {"first": first, "second": second, "ticket": ticket_after, "total": total,
                "coef": plan.scratch().coef.clone()}

    def check(r, after):
        _check_total(name, tensors, p, r["first"])
        assert same_bits(r["first"], r["second"]), f"{name}: total {r['first']}, then {r['second']}"
        assert int(r["ticket"]) == 0, f"{name}: the ticket is {int(r['ticket'])} after a call"
        assert same_bits(r["total"], r["first"]), f"{name}: the clip's total {r['total']}"
        _check_coef(name, r["total"], r["coef"], max_norm)
        c = float(r["coef"][0])
        assert c < 1.0, f"{name}: coefficient {c}: nothing to scale"
        _check_scaled(name, tensors, [c] * len(tensors), r["coef"].dtype, after)

    return Case(name, tensors, chunk, block, call, check, shifts=_shifts(tensors, 1))


def _scale_case(name: str, tensors: list[Tensor], coef: Tensor, per_tensor: bool, chunk: int = 4096,
                block: int = 512) -> Case:
    def call(b, plan):
        (b.scale_per_tensor_ if per_tensor else b.scale_)(None, coef.clone(), plan=plan)
        return {}

    def check(r, after):
        coefs = coef.tolist() if per_tensor else [coef.item()] * len(tensors)
        _check_scaled(name, tensors, coefs, coef.dtype, after)

    return Case(name, tensors, chunk, block, call, check, shifts=_shifts(tensors, 1))


def _clamp_case(name: str, tensors: list[Tensor], clip_value: float, prepared: bool, chunk: int = 4096,
                block: int = 512) -> Case:
    def call(b, plan):
        if prepared:
            b.prepare_clamp(plan, clip_value)()
        else:
            b.clamp_(None, clip_value, plan=plan)
        return {}

    def check(r, after):
        for i, (t, a) in enumerate(zip(tensors, after)):
            assert same_bits(a, t.clamp(-clip_value, clip_value)), f"{name}: tensor {i} ({t.dtype})"

    return Case(name, tensors, chunk, block, call, check, shifts=_shifts(tensors, 2))


def _units_case(name: str) -> Case:
    """AGC's unit plans (plan._build_units): every row is a "tensor". Unit norms, then a coefficient per unit."""
    gen = torch.Generator().manual_seed(12)
    tensors = [random_tensor((37, 13), torch.float32, gen=gen), random_tensor((5, 301), torch.bfloat16, gen=gen),
               random_tensor((9, 7), torch.float16, gen=gen), random_tensor((3, 67), torch.float32, gen=gen)]
    units = [r for t in tensors for r in t]
    coefs = torch.rand(len(units), generator=gen, dtype=torch.float64).float() * 1.5
    coefs[::4] = 1.0  # skipped units

    def call(b, plan):
        norms = b._unit_norms_on(None, plan, 2.0)
        b._scale_units_on(None, plan, coefs.clone())
        return {"norms": norms}

    def check(r, after):
        _check_norms(name, units, 2.0, r["norms"])
        _check_scaled(name, units, coefs.tolist(), coefs.dtype, [u for a in after for u in a])

    return Case(name, tensors, 64, 64, call, check, unit_rows=[t.shape[0] for t in tensors])


def cases() -> list[Case]:
    """Seeded, so that the compile and the run make the same launches."""
    out = [_norm_case(f"norm p={p}", _mixed(1), p) for p in (2.0, 1.0, float("inf"), float("-inf"), 0.0, 3.0)]
    out.append(_norm_case("norm p=2 four dtypes (float64 accumulation)", _mixed(2, FOUR), 2.0))
    out.append(_norm_case("norm p=3 all float64", _mixed(6, (torch.float64,)), 3.0))
    with_nan = _mixed(3)
    with_nan[3][100] = float("nan")
    out.append(_norm_case("norm p=inf NaN", with_nan, float("inf")))
    # Many chunks for few elements: 64-element chunks, slabs of 64 partials (3 of them), 3 finalize tiles.
    small = [0, 1, 700, 0, 63, 64, 65, 2500, 0, 0, 5, 129, 3000, 2, 0, 0, 17, 1100, 33, 0]
    many = _mixed(8, FOUR[:3], small)
    out.append(_norm_case("norm p=2 3 slabs, 3 tiles", many, 2.0, 64, 64, max_norm=1e3))
    out.append(_norm_case("norm p=0 3 tiles", many, 0.0, 64, 64))
    # One empty tensor at most: two have the same address (0), and a plan listing an address twice is not kept.
    kept = [n or 3 * i + 1 for i, n in enumerate(small)]
    kept[0] = 0
    for p in (2.0, 0.0):  # the slabs over the partials, the tiles' counts in tensor_vals
        out.append(_prepared_clip_case(f"prepared norm and clip p={p}, 3 slabs", _mixed(9, FOUR, kept), p, 64, 64,
                                       0.25))
    mixed = _mixed(4, FOUR)
    out.append(_scale_case("scale global", mixed, torch.tensor([0.3721], dtype=torch.float32), False))
    coefs = torch.linspace(0.1, 1.9, len(mixed), dtype=torch.float64)
    coefs[2] = 1.0  # a coefficient of exactly 1: that tensor is skipped
    out.append(_scale_case("scale per-tensor float64", mixed, coefs, True))
    out.append(_clamp_case("clamp", _mixed(5, FOUR), 0.05, False))
    out.append(_clamp_case("prepared clamp", _mixed(10, FOUR), 0.3, True))
    out.append(_units_case("AGC unit norms and scale"))
    # The shipped configuration (TritonBackend on a GPU): 65,536-element chunks, 2,048-element blocks.
    gen = torch.Generator().manual_seed(7)
    big = [random_tensor((n,), d, gen=gen) for n, d in ((70001, torch.float32), (9001, torch.bfloat16),
                                                         (4099, torch.float16))]
    out.append(_norm_case("norm p=2 shipped chunk and block", big, 2.0, GPU_CHUNK, GPU_BLOCK))
    out.append(_scale_case("scale shipped chunk and block", big, torch.tensor([0.61], dtype=torch.float32), False,
                           GPU_CHUNK, GPU_BLOCK))
    return out


# ---- 1. compile --------------------------------------------------------------------------------------------------


def compile_all(prefix: str, out_dir: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") != "1", "compile with TRITON_INTERPRET unset"
    import triton_preflight
    from triton import knobs
    from triton.runtime.driver import driver

    knobs.compilation.disable_line_info = True  # the parser takes no debug sections
    variants: dict[str, dict] = {}  # Triton's hash -> variant
    keys: dict[str, str] = {}  # launch key -> the variant's entry name

    def on_launch(key, kernel, grid, args, options):
        compiled = kernel.warmup(*args, grid=grid, **options)
        md = compiled.metadata
        if md.hash not in variants:
            assert md.global_scratch_size == 0 and md.profile_scratch_size == 0, "scratch is not passed"
            entry = f"{md.name}_v{len(variants)}"
            # The parameters in the PTX: neither constexpr nor specialised into a constant (an int of 1).
            types = list(compiled.src.signature.values())
            constants = {k[0] for k in compiled.src.constants}
            passed = [i for i, ty in enumerate(types) if ty != "constexpr" and i not in constants]
            variants[md.hash] = {
                "entry": entry, "kernel": key, "passed": passed, "params": [types[i] for i in passed],
                "threads": 32 * md.num_warps, "shared": md.shared,
                "ptx": simulator_ptx(compiled.asm["ptx"], md.name, entry, 32 * md.num_warps),
            }
        keys[launch_key(key, kernel, args, options)] = variants[md.hash]["entry"]

    t0 = triton_preflight._cpu_seconds()
    previous = driver._active
    driver.set_active(triton_preflight._stand_in_driver(ARCH))
    try:
        with intercepted(on_launch):
            for case in cases():
                _, _, plan = simlib.arrange(case.tensors, case.chunk, shifts=case.shifts, unit_rows=case.unit_rows)
                case.call(TritonBackend(case.chunk, case.block), plan)
    finally:
        driver.set_active(previous)
    os.makedirs(out_dir, exist_ok=True)
    tools = Path(prefix) / "cuda11" / "bin"
    path = os.path.join(out_dir, "kernels.ptx")
    with open(path, "w") as f:
        f.write(one_module([v.pop("ptx") for v in variants.values()]))
    subprocess.run([tools / "ptxas", f"-arch=sm_{ARCH}", path, "-o", os.devnull], check=True)
    subprocess.run([tools / "fatbinary", f"--create={out_dir}/kernels.fatbin", "-64",
                    f"--image3=kind=ptx,sm={ARCH},file={path}"], check=True)
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump({"variants": list(variants.values()), "keys": keys}, f, indent=1)
    print(f"triton-sim: {len(variants)} variants compiled for sm_70 and checked by ptxas 11.8 in "
          f"{triton_preflight._cpu_seconds() - t0:.0f} CPU s", flush=True)


# ---- 2. run, inside the simulator --------------------------------------------------------------------------------

_CTYPES = {"i1": ctypes.c_int8, "i8": ctypes.c_int8, "i16": ctypes.c_int16, "i32": ctypes.c_int32,
           "i64": ctypes.c_int64, "u32": ctypes.c_uint32, "u64": ctypes.c_uint64, "fp32": ctypes.c_float,
           "fp64": ctypes.c_double}


class TritonDevice(simlib.Device):
    """The simulator's libcudart with the compiled variants registered by name from the fatbin."""

    def __init__(self, fatbin: str, entries: list[str], log_path: str) -> None:
        super().__init__(log_path)
        os.environ["PYTORCH_BIN"] = fatbin  # where the simulator reads PTX from (with cuobjdump), at registration
        rt, vp = self.rt, ctypes.c_void_p
        # getattr: a name starting with two underscores would be mangled inside a class
        register_fatbin, self._register_function = (getattr(rt, f) for f in ("__cudaRegisterFatBinary",
                                                                              "__cudaRegisterFunction"))
        register_fatbin.restype = vp
        register_fatbin.argtypes = [vp]
        self._register_function.argtypes = [vp, vp, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int] + [vp] * 5
        rt.cuLaunchKernel.argtypes = [vp] + [ctypes.c_uint] * 7 + [vp, vp, vp]
        # The simulator ignores the fatbin handed to it (it reads PYTORCH_BIN): any buffer will do.
        self._fatbin_arg = ctypes.create_string_buffer(64)
        # A kernel's host-side handle is any unique address: a buffer holding its name.
        self._host_funs = {entry: ctypes.create_string_buffer(entry.encode()) for entry in entries}
        t0 = time.perf_counter()
        with self.quiet():
            self._handle = register_fatbin(self._fatbin_arg)
            for entry, handle in self._host_funs.items():  # the first one has the simulator parse the PTX
                self._register_function(self._handle, handle, entry.encode(), entry.encode(), -1, *[None] * 5)
        self.stats.load_seconds = time.perf_counter() - t0

    def launch_variant(self, variant: dict, grid: tuple, values: list) -> None:
        """Triton's ABI: the passed arguments in order, then the global and profile scratch pointers."""
        args = [ctypes.c_void_p(v) if ty.startswith("*") else _CTYPES[ty](v)
                for ty, v in zip(variant["params"], values)]
        args += [ctypes.c_void_p(0), ctypes.c_void_p(0)]
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]

        def launch_and_wait() -> int:
            rc = self.rt.cuLaunchKernel(self._host_funs[variant["entry"]], gx, gy, gz, variant["threads"], 1, 1,
                                        variant["shared"], None, params, None)
            return rc or self.rt.cudaDeviceSynchronize()

        self.launch(variant["kernel"].split(":")[1].strip("_").removesuffix("_kernel"), launch_and_wait)


def run_all(build_dir: str) -> None:
    with open(os.path.join(build_dir, "manifest.json")) as f:
        manifest = json.load(f)
    torch.use_deterministic_algorithms(True, warn_only=True)  # torch.empty fills NaN: an unwritten output shows
    report = os.dup(1)

    def say(text: str) -> None:
        ctypes.CDLL(None).fflush(None)
        os.write(report, (text + "\n").encode())

    by_entry = {v["entry"]: v for v in manifest["variants"]}
    dev = TritonDevice(os.path.join(build_dir, "kernels.fatbin"), list(by_entry),
                       os.environ.get(simlib.LOG_ENV, "triton-sim.log"))
    staged: list[simlib.Staged] = []  # the last one is the case being run

    def on_launch(key, kernel, grid, args, options):
        launch = launch_key(key, kernel, args, options)
        assert launch in manifest["keys"], f"a launch that the compile did not make: {launch}"
        variant = by_entry[manifest["keys"][launch]]
        st = staged[-1]
        values = [st.device_ptr(a) if isinstance(a, Tensor) else a for a in (args[i] for i in variant["passed"])]
        dev.launch_variant(variant, grid, values)
        st.sync()

    costs, failed = {}, []
    all_cases = cases()
    with intercepted(on_launch):
        for case in all_cases:
            st = simlib.stage(dev, case.tensors, case.chunk, shifts=case.shifts, unit_rows=case.unit_rows)
            staged.append(st)
            before = dev.stats.launch_seconds
            try:
                results = case.call(TritonBackend(case.chunk, case.block), st.plan)
                case.check(results, st.read_back())
                say(f"  ok  {case.name}")
            except AssertionError as e:  # the next cases still run: every failure is reported
                failed.append(case.name)
                say(f"  FAILED  {case.name}: {e}")
            finally:
                st.free()
            costs[case.name] = dev.stats.launch_seconds - before
    out = os.environ.get("FUSEDCLIP_GPUSIM_STATS")
    if out:
        s = dev.stats
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "run.json"), "w") as f:
            json.dump({"cases": len(all_cases), "failed": len(failed), "variants": len(by_entry),
                       "launches": s.launches, "launch_seconds": round(s.launch_seconds, 2),
                       "load_seconds": round(s.load_seconds, 2), "by_kernel": s.by_kernel,
                       "costliest": sorted(costs.items(), key=lambda kv: -kv[1])[:5]}, f)
    say(DONE.format(len(all_cases)) if not failed else f"triton-sim: {len(failed)} of {len(all_cases)} cases failed")
    os.dup2(dev._log.fileno(), 1)  # what the simulator prints at exit goes to its log too


def main(prefix: str) -> int:
    with tempfile.TemporaryDirectory(prefix="fusedclip-triton-sim-") as work:
        build = os.path.join(work, "build")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_CACHE_DIR", os.path.join(work, "triton-cache"))
        subprocess.run([sys.executable, __file__, "--compile", prefix, build], env=env, check=True)
        run_dir = os.path.join(work, "run")
        os.makedirs(run_dir)
        for cfg in (Path(prefix) / "config").iterdir():
            (Path(run_dir) / cfg.name).write_bytes(cfg.read_bytes())
        env.setdefault(simlib.LOG_ENV, os.path.join(run_dir, "triton-sim.log"))
        script = f'source "{prefix}/runenv.sh" && exec "{sys.executable}" "{__file__}" --run "{build}"'
        proc = subprocess.run(["bash", "-c", script], cwd=run_dir, env=env, capture_output=True, text=True,
                              check=False)
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        if proc.returncode != 0 or not proc.stdout.strip().endswith(DONE.format(len(cases()))):
            log = Path(env[simlib.LOG_ENV])
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
