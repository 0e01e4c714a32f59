"""GPU preflight without a GPU (design.md section 6b): every Triton kernel specialisation the backends launch
compiles to a cubin for sm_80 and sm_90, and the compiled code is what we meant: 128-bit global loads (and stores,
where a kernel writes) in the hot loops for every dtype, no local memory.

What is compiled: every specialisation launched during this session (conftest records each launch; this module runs
last), plus a matrix this module drives itself through the backend's entry points with the GPU configuration, so
that it is complete when run on its own. Alignment of the data is found at run time (each chunk peels a head up to
its first 16-byte boundary, see triton_kernels/addressing.py), so misaligned views need no variant of their own; the
matrix mixes them in all the same, so that a launch with them is compiled too.
"""

from __future__ import annotations

import os
import resource
import time
from collections import Counter

import fusedclip
import pytest
import torch
import triton_preflight
from fusedclip import backends
from reference import NORM_TYPES, random_tensor

triton_backend = pytest.importorskip("fusedclip.backends.triton_backend")
if "triton" not in fusedclip.available_backends():
    pytest.skip(f"triton backend unavailable: {backends.unavailable_reasons().get('triton')}", allow_module_level=True)

from fusedclip.triton_kernels import addressing  # noqa: E402  (triton is there)

pytestmark = pytest.mark.slow  # about a minute of CPU; CI runs it (deselect locally with -m "not slow")

ARCHS = (80, 90)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NORM_L2, NORM_P = addressing.NORM_L2.value, addressing.NORM_P.value
REDUCE = "fusedclip.triton_kernels.multi_tensor_norm:_reduce_kernel"
DATA_KERNELS = {  # kernels that stream gradient memory, and whether they write it back
    REDUCE: False,
    "fusedclip.triton_kernels.scale:_scale_kernel": True,
    "fusedclip.triton_kernels.clamp:_clamp_kernel": True,
}
WIDE_DTYPES = {"float32", "float16", "bfloat16", "float64"}


def _views(dtypes, seed):
    """Per dtype: sizes around the GPU block, each as its own (aligned) tensor and as a view one element in."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, dtype in enumerate(dtypes):
        for n in (1, 7, triton_backend.GPU_BLOCK + 3):
            out.append(random_tensor((n,), dtype, DEVICE, gen, scale=1.0 + i))
            out.append(random_tensor((n + 1,), dtype, DEVICE, gen)[1:])  # misaligned by one element
    return out


def drive_gpu_configuration() -> None:
    """Every launcher path of the backend, with the chunk and block a GPU uses, for both accumulation dtypes."""
    b = triton_backend.TritonBackend(chunk_size=triton_backend.GPU_CHUNK, block=triton_backend.GPU_BLOCK)
    for seed, dtypes in enumerate([(torch.float32, torch.float16, torch.bfloat16), (torch.float64, torch.bfloat16)]):
        grads = _views(dtypes, seed)
        for p in NORM_TYPES:
            b.norms(grads, p, per_tensor=False)
            b.norms(grads, p, per_tensor=True)
            b.norm_and_coef(grads, p, 1.0)
        b.norm_and_coef(grads, 2.0, 0.0)  # max_norm 0: its bit pattern is a 32-bit int, another specialisation
        for coef_dtype in (torch.float32, torch.float64):
            b.scale_(grads, torch.tensor(0.5, dtype=coef_dtype, device=DEVICE))
            b.scale_per_tensor_(grads, torch.full((len(grads),), 0.5, dtype=coef_dtype, device=DEVICE))
        b.clamp_(grads, 0.3)
        rows = [g.reshape(1, -1) for g in grads]
        dims = [(1,)] * len(rows)
        coefs = b.unit_norms(rows, dims, 2.0)
        b.scale_units_(rows, dims, torch.full_like(coefs, 0.5))


@pytest.fixture(scope="module")
def compiled() -> dict[int, dict]:
    if not triton_preflight.RECORDER.installed:
        pytest.fail(f"the launch recorder is not installed: {triton_preflight.RECORDER.why_not}")
    drive_gpu_configuration()
    records = [dict(r) for r in triton_preflight.RECORDER.records.values()]
    for name in DATA_KERNELS:  # SASS (half a second a cubin) for one GPU-configuration variant of each data kernel
        first = next(r for r in records if r["kernel"] == name and _block(r) == triton_backend.GPU_BLOCK)
        first["sass"] = True
    # The control of test_fp_fusion_is_off: the float32 L2 reduce of the GPU configuration, with fusion on.
    l2 = next(r for r in records if r["kernel"] == REDUCE and _norm(r) == NORM_L2
              and _block(r) == triton_backend.GPU_BLOCK and r["args"]["ACC"] == {"tl_dtype": "fp32"})
    records.append({**l2, "options": {**l2["options"], "enable_fp_fusion": True}, "sass": False})
    # Worker processes side by side: one per arch, up to 4 where the machine has the cores (the records split; each
    # worker imports torch and triton, some hundreds of MB).
    per_arch = max(1, min(len(records), 4, (os.cpu_count() or 2) // len(ARCHS)))
    before, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    workers = [(arch, triton_preflight.compile_variants(records[i::per_arch], arch))
               for arch in ARCHS for i in range(per_arch)]
    results = {arch: {"variants": [], "failures": []} for arch in ARCHS}
    try:
        for arch, worker in workers:
            got = triton_preflight.collect(worker)
            results[arch]["variants"] += got["variants"]
            results[arch]["failures"] += got["failures"]
    except BaseException:
        for _, worker in workers:
            triton_preflight.discard(worker)
        raise
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    print(f"\n{len(records)} launch specialisations; {cpu:.1f} s CPU, {time.perf_counter() - wall:.1f} s wall in "
          f"{len(workers)} worker processes (compile, ptxas, cuobjdump)")
    for arch, result in results.items():
        kernels = Counter(v["kernel"].split(":")[1] for v in result["variants"])
        regs = max((v["usage"]["REG"] for v in result["variants"]), default=0)
        print(f"sm_{arch}: {len(result['variants'])} variants {dict(kernels)}, at most {regs} registers a thread")
    return results


def _block(variant: dict) -> int:
    return variant["args"]["BLOCK"]["int"]


def _norm(variant: dict) -> int | None:
    """The norm kind (triton_kernels/addressing.py) of a norm kernel's variant; None for the other kernels."""
    return variant["args"].get("NORM", {}).get("int")


def _fp_fusion(variant: dict) -> bool | None:
    return variant["options"].get("enable_fp_fusion")


def test_every_launched_variant_compiles_for_sm80_and_sm90(compiled):
    for arch, result in compiled.items():
        assert not result["failures"], f"sm_{arch}: " + "\n\n".join(
            f"{f['kernel']} {f['args']} {f['options']}:\n{f['error']}" for f in result["failures"]
        )
        kernels = {v["kernel"] for v in result["variants"]}
        assert kernels == set(triton_preflight.our_kernels()), f"sm_{arch}: some kernel was never launched"


def test_hot_loops_use_128_bit_loads_and_stores(compiled):
    """For every data kernel launched with blocks wide enough for a 16-byte vector per thread of the narrowest
    type: among its loops (LLVM's loop analysis, written into the PTX), one per dtype whose loads, unpredicated,
    are all 128-bit (stores too, for the kernels that write), with no shared-memory traffic; the head/tail accesses are
    masked. For one such variant of each kernel, the SASS holds LDG.E.128 (and STG.E.128)."""
    assert triton_backend.GPU_BLOCK >= 8 * 32 * 4, "the GPU block is too small for 16-byte vectors (4 warps)"
    checked = set()
    for arch, result in compiled.items():
        for v in result["variants"]:
            writes = DATA_KERNELS.get(v["kernel"])
            if writes is None or _block(v) < 8 * 32 * v["options"].get("num_warps", 4):
                continue
            what = f"sm_{arch} {v['kernel']} {v['args']}"
            wide = {h: loop for h, loop in v["loops"].items() if loop.get("wide_loads")}
            assert "None" not in wide, f"{what}: 128-bit loads outside any loop"
            assert sorted(loop["dtype"] for loop in wide.values()) == sorted(WIDE_DTYPES), f"{what}: {v['loops']}"
            for loop in wide.values():
                # The reduce's loop may also hold the masked head/tail loads (a branch per step); nothing unmasked
                # in a hot loop may be narrower than 128 bits, and no layout conversion may pass through shared memory.
                assert loop.get("narrow_loads", 0) == loop.get("masked_loads", 0), f"{what}: narrow loads: {loop}"
                assert not loop.get("shared"), f"{what}: shared memory in a hot loop: {loop}"
                if writes:
                    assert loop.get("wide_stores") == loop["wide_loads"] and not loop.get("narrow_stores"), (
                        f"{what}: the hot loop does not store 128 bits at a time: {loop}"
                    )
            checked.add((arch, v["kernel"]))
            if v.get("sass"):
                assert v["usage"]["LDG128"] > 0, f"{what}: no LDG.E.128 in the SASS"
                assert v["usage"]["STG128"] > 0 or not writes, f"{what}: no STG.E.128 in the SASS"
                checked.add((arch, v["kernel"], "sass"))
    every = {(a, k) for a in ARCHS for k in DATA_KERNELS}
    assert every | {(a, k, "sass") for a, k in every} == checked, "some data kernel was not checked"


def test_no_local_memory(compiled):
    """No spills (nor any local array): a spill in a streaming loop costs more than the loop's own traffic."""
    for arch, result in compiled.items():
        for v in result["variants"]:
            assert not v["ptx_local"], f"sm_{arch} {v['kernel']}: .local in the PTX"
            assert v["usage"]["LOCAL"] == 0, f"sm_{arch} {v['kernel']} {v['args']}: {v['usage']}"


def test_fp_fusion_is_off(compiled):
    """Every launch sets enable_fp_fusion=False (triton_kernels/launch.py: Triton's default changes with its version
    and with TRITON_DEFAULT_FP_FUSION), and the compiler honours it: no fma in the PTX of any variant but the p-norms',
    whose fmas are libdevice's own (its float64 exp2 / log2). The control, the float32 L2 reduce compiled with fusion
    on, does fuse (its x * x + acc), so the count would see a variant compiled with fusion."""
    for arch, result in compiled.items():
        controls = []
        for v in result["variants"]:
            what = f"sm_{arch} {v['kernel']} {v['args']} {v['options']}"
            if _fp_fusion(v) is True:
                controls.append(v)
                continue
            assert _fp_fusion(v) is False, f"{what}: launched without enable_fp_fusion=False"
            if _norm(v) != NORM_P:
                assert v["fma"] == 0, f"{what}: {v['fma']} fma"
        assert [(c["kernel"], _norm(c)) for c in controls] == [(REDUCE, NORM_L2)], f"sm_{arch}: the control"
        assert controls[0]["fma"] > 0, f"sm_{arch}: the control (fusion on) has no fma"


def test_p_norms_use_no_approximate_exp2_or_log2(compiled):
    """The p-norm variants (reduce and finalize, float32 and float64 accumulation) evaluate |x|^p and the root in
    float64 (libdevice): no ex2.approx / lg2.approx, float32 instructions that are approximate and flush results
    below 2^-126 to zero, in their PTX."""
    seen = set()
    for arch, result in compiled.items():
        for v in result["variants"]:
            if _norm(v) == NORM_P:
                assert not {"ex2", "lg2"} & set(v["approx"]), f"sm_{arch} {v['kernel']} {v['args']}: {v['approx']}"
                seen.add((arch, v["kernel"], v["args"]["ACC"]["tl_dtype"]))
    assert len(seen) == len(ARCHS) * 2 * 2, f"p-norm variants compiled: {sorted(seen)}"


# ---- the PTX reader itself --------------------------------------------------------------------------------------

_PTX_SAMPLE = """
\tld.global.b64 { %rd1 }, [ %rd2 + 0 ];
$L__BB0_2:                              // =>This Inner Loop Header: Depth=1
\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd3 + 0 ];
\tcvt.f32.bf16 %r5, %rs1;
// %bb.3:                               //   in Loop: Header=BB0_2 Depth=1
\tst.global.v4.b32 [ %rd3 + 0 ], { %r1, %r2, %r3, %r4 };
\tbar.sync \t0;
\t@%p1 bra \t$L__BB0_2;
$L__BB0_4:                              // =>This Inner Loop Header: Depth=1
\t@%p2 ld.global.L1::evict_last.b16 { %rs2 }, [ %rd4 + 0 ];
\tld.global.v2.b64 { %rd5, %rd6 }, [ %rd7 + 0 ];
$L__BB0_5:
\t@%p3 st.global.v4.b32 [ %rd8 + 0 ], { %r1, %r2, %r3, %r4 };
"""


def test_ptx_arithmetic_counts_fma_and_approximate_instructions():
    sample = "\tfma.rn.f32 \t%r1, %r2, %r3, %r4;\n\t@%p1 fma.rn.f64 \t%fd1, %fd2, %fd3, %fd4;\n" \
             "\tex2.approx.ftz.f32 \t%r5, %r6;\n\tlg2.approx.f32 \t%r7, %r8;\n\trcp.approx.ftz.f64 \t%fd5, %fd6;\n" \
             "\tmul.rn.f32 \t%r9, %r1, %r1;\n\t// fma.rn.f32 in a comment\n"
    assert triton_preflight.ptx_arithmetic(sample) == {"fma": 2, "approx": {"ex2": 1, "lg2": 1, "rcp": 1}}


def test_ptx_reader_places_accesses_in_their_loops():
    loops = triton_preflight.ptx_loops(_PTX_SAMPLE)
    assert loops["BB0_2"]["wide_loads"] == 1 and loops["BB0_2"]["wide_stores"] == 1
    assert loops["BB0_2"]["dtype"] == "bfloat16" and loops["BB0_2"]["shared"] == 1
    assert loops["BB0_4"]["narrow_loads"] == 1 and loops["BB0_4"]["masked_loads"] == 1
    assert loops["BB0_4"]["wide_loads"] == 1 and loops["BB0_4"]["dtype"] == "float64"
    assert loops[None]["narrow_loads"] == 1  # before any loop
    assert loops[None]["narrow_stores"] == 1 and loops[None]["masked_stores"] == 1  # predicated: never wide
    assert triton_preflight.access_bits(".v4.b32") == 128 and triton_preflight.access_bits(".b16") == 16

