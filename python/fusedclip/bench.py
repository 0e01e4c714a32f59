"""`python -m fusedclip bench`: stock torch against every available fusedclip backend on a real model's shapes.

Each implementation starts from the same gradients (copied from one master set outside the timed region) and
is checked against a float64 reference before it is timed. Two cases:
  clip    every timed call clips (max_norm follows the shrinking norm, so the coefficient stays below 1)
  noclip  max_norm far above the norm: coefficient 1, where fusedclip's kernels skip the scale pass
Bytes counted per call are what the clip must move: 3B when it clips (read, read + write), B when not; each
timed call's total is read back (after its timing) to know which happened. The copy bandwidth that the
"% of copy bandwidth" compares against is measured on buffers 4x the last-level cache; a parameter set that fits
in that cache gets no such percentage (its speed is the cache's). The median is reported with the min-max spread.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from . import __version__, backends, fastpath
from .clip import clip_grad_norm_, clip_grad_value_, get_total_norm, multi_tensor_norm
from .clipper import GradClipper
from .patching import TORCH_ORIGINALS
from .presets import PRESETS, Preset

stock_clip = TORCH_ORIGINALS["clip_grad_norm_"]  # torch's own, even while patch_torch() is in effect

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DECAY = 0.97  # per timed call, in the clip case


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Impl:
    name: str
    fn: Callable[[list[Tensor], list[Tensor], float], Tensor]  # (params, grads, max_norm) -> total


class BenchError(Exception):
    """A bad or impossible request: the command line prints the message (one line, no traceback), exit status 2."""


def implementations(device: torch.device, only: Optional[list[str]]) -> list[Impl]:
    impls = [
        Impl("torch foreach", lambda params, grads, m: stock_clip(params, m, foreach=True)),
        Impl("torch loop", lambda params, grads, m: stock_clip(params, m, foreach=False)),
    ]
    why_not: dict[str, str] = {f"fusedclip {n}": why for n, why in backends.unavailable_reasons().items()}
    for name in backends.available_backends():
        label = f"fusedclip {name}"
        if name == "triton" and device.type != "cuda" and not (only and label in only):
            continue  # the Triton interpreter is a correctness tool, far too slow to time by default
        try:
            backends.select(name, device)
        except (RuntimeError, ValueError) as e:
            why_not[label] = str(e)
            continue
        impls.append(Impl(label, lambda params, grads, m, n=name: clip_grad_norm_(params, m, backend=n)))
    if only:
        have = {i.name for i in impls}
        for name in only:
            if name in have:
                continue
            if name in why_not:
                raise BenchError(f"--impl {name!r} cannot run on {device} here: {why_not[name]}")
            known = ["torch foreach", "torch loop"] + [f"fusedclip {n}" for n in backends.BACKEND_NAMES]
            raise BenchError(f"--impl {name!r} is not an implementation; choose from {', '.join(map(repr, known))}")
        impls = [i for i in impls if i.name in only]
    return impls


def parse_device(device_name: Optional[str]) -> torch.device:
    """cpu or cuda[:N], checked before anything is allocated (a CPU build of torch has no CUDA at all)."""
    if device_name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise BenchError(f"--device {device_name!r} is not a device; use cpu or cuda[:N]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise BenchError(f"--device {device_name}: no CUDA device here (torch {torch.__version__}, {build})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BenchError(f"--device {device_name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise BenchError(f"--device {device_name}: the benchmark runs on cpu or cuda[:N]")
    return device


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def make_grads(preset: Preset, dtype: torch.dtype, device: torch.device, seed: int) -> list[Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype, device=device) for s in preset.shapes]


def shell_params(grads: list[Tensor]) -> list[torch.nn.Parameter]:
    """Parameters that carry `grads` without storing weights (stock torch needs parameters, not tensors)."""
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.empty(1, dtype=g.dtype, device=g.device).expand(g.shape), requires_grad=True)
        p.grad = g
        params.append(p)
    return params


def reference_total(grads: list[Tensor]) -> float:
    """float64 global L2 norm, one tensor at a time (no float64 copy of the whole set)."""
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes(device: torch.device) -> Optional[int]:
    """The largest cache between the processor and memory: the GPU's L2, or the CPU's highest-level cache."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or None
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            level = int((index / "level").read_text())
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        sizes.append((level, size))
    return max(sizes)[1] if sizes else None


def copy_bandwidth(device: torch.device, cache_bytes: Optional[int], reps: int) -> tuple[float, int]:
    """Device-to-device copy bandwidth in GB/s (read + write counted) and the bytes per copy: each buffer 4x the
    last-level cache (at least 64 MiB, at most 1 GiB), so the figure is memory's, not the cache's."""
    nbytes = min(max(4 * (cache_bytes or 0), 64 << 20), 1 << 30)
    n = nbytes // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    times = [timed(lambda: dst.copy_(src), device) for _ in range(reps + 2)][2:]
    return 2 * n * 4 / statistics.median(times) / 1e9, n * 4


class _L2Flush:
    def __init__(self, device: torch.device) -> None:
        self.buf = torch.empty(256 << 20, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call, end to end (host overhead included)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def check(impl: Impl, master: list[Tensor], work: list[Tensor], params: list, max_norm: float, ref: float) -> dict:
    """One call from the master gradients, compared with float64: total and every clipped value."""
    for w, m in zip(work, master):
        w.copy_(m)
    total = impl.fn(params, work, max_norm)
    got = float(total)
    total_err = abs(got - ref) / ref
    coef = min(max_norm / (got + 1e-6), 1.0)
    grad_err = 0.0
    for w, m in zip(work, master):
        expected = m.double() * coef
        err = ((w.double() - expected).abs() / expected.abs().clamp(min=torch.finfo(m.dtype).tiny)).max()
        grad_err = max(grad_err, float(err))
    eps = torch.finfo(master[0].dtype).eps
    total_tol = max(1e-5, 2 * torch.finfo(total.dtype).eps)
    return {
        "total": got,
        "total_dtype": str(total.dtype).replace("torch.", ""),
        "total_rel_err": total_err,
        "coef": coef,
        "grad_max_rel_err": grad_err,
        "matched": total_err <= total_tol and grad_err <= 2 * eps + total_err,
    }


# ---- contention: `bench --busy N` ------------------------------------------------------------------------------------
#
# Training on CPU rarely has the cores to itself (data-loading workers, a second job). --busy N times the comparison
# while N other processes each spin on a core: pure Python loops, no memory traffic, so what they take away is CPU
# time, which shows how each implementation's threads cope with a core that is taken from them mid-call. They are
# started after the copy bandwidth is measured and before the checks, and killed by pid when the timing ends (or on
# an exception or Ctrl-C). Each also ends by itself at a hard deadline, or as soon as the benchmark's process is
# gone (its parent changes), so none outlives a benchmark that was killed outright.
BUSY_LIMIT_S = 600.0
_BUSY_LOOP = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C in the terminal: end quietly, with the benchmark
end, parent = time.monotonic() + float(sys.argv[1]), os.getppid()
sys.stdout.write("spinning\\n")
sys.stdout.close()
while time.monotonic() < end and os.getppid() == parent:
    for _ in range(20000):
        pass
"""


@contextlib.contextmanager
def busy_processes(count: int, limit_s: float = BUSY_LIMIT_S) -> Iterator[dict]:
    """`count` processes spinning on the CPU while the block runs (none for 0); yields what the record says of
    them, `alive_until_end` filled in when the block ends (False: one ran out of time before the benchmark did)."""
    state: dict = {"processes": count}
    if count == 0:
        yield state
        return
    state.update(
        limit_s=limit_s,
        what="pure-Python spin loops (CPU time only, no memory traffic), one process each, ordinary priority",
    )
    spinners: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            spinners.append(subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BUSY_LOOP, str(limit_s)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            ))
        for p in spinners:  # each says once it spins: the timing starts under the load asked for
            if p.stdout is None or not p.stdout.readline():
                raise BenchError(f"--busy: a busy process ended before it started spinning (exit status {p.wait()})")
        yield state
        state["alive_until_end"] = all(p.poll() is None for p in spinners)
        if not state["alive_until_end"]:
            warn(f"--busy: a busy process reached its {limit_s:g} s limit before the timing ended; raise --busy-limit")
    finally:
        for p in spinners:
            p.kill()  # by pid; a no-op for one that has ended
        for p in spinners:
            p.wait()
            if p.stdout is not None:
                p.stdout.close()


SPREAD_WARN = 0.10  # (max - min) / median above which the timings of one implementation disagree


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def run(
    preset_name: str = "gpt2",
    dtype_name: str = "float32",
    device_name: Optional[str] = None,
    max_norm: Optional[float] = None,
    reps: int = 10,
    warmup: int = 2,
    cases: tuple[str, ...] = ("clip", "noclip"),
    cold: bool = False,
    only: Optional[list[str]] = None,
    seed: int = 0,
    busy: int = 0,
    busy_limit: float = BUSY_LIMIT_S,
) -> dict:
    """The comparison of every implementation on one preset; `busy` other processes spin on the CPU while it is
    timed (see busy_processes)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None  # before anything of ours runs
    preset = PRESETS[preset_name]
    dtype = DTYPES[dtype_name]
    device = parse_device(device_name)
    nbytes = preset.params * dtype.itemsize
    need = 2 * nbytes + (256 << 20)
    if need > free_memory(device):
        raise BenchError(
            f"preset {preset.name} in {dtype_name} needs about {need / 2**30:.1f} GiB on {device} (two gradient sets), "
            f"only {free_memory(device) / 2**30:.1f} GiB free; pick a smaller --preset or --dtype"
        )
    if cold and device.type != "cuda":
        warn(f"--cold flushes a GPU's L2 cache between calls; on {device} it does nothing")
        cold = False
    impls = implementations(device, only)
    progress(
        f"fusedclip bench: {preset.name} ({preset.tensors} tensors, {preset.params / 1e6:.1f}M params, "
        f"{nbytes / 1e6:.0f} MB {dtype_name}) on {device}; {len(impls)} implementations, cases {', '.join(cases)}"
    )
    master = make_grads(preset, dtype, device, seed)
    work = [torch.empty_like(m) for m in master]
    params = shell_params(work)
    progress("  float64 reference and copy bandwidth ...")
    ref = reference_total(master)
    cache = last_level_cache_bytes(device)
    bandwidth, copy_bytes = copy_bandwidth(device, cache, reps)
    in_cache = cache is not None and nbytes <= cache
    if in_cache:
        warn(
            f"the gradients ({nbytes / 2**20:.1f} MiB) fit in the {(cache or 0) / 2**20:.0f} MiB last-level cache: "
            "'% of copy bandwidth' compares cache speed with memory speed and is not reported"
        )
    flush = _L2Flush(device) if cold else (lambda: None)

    results = []
    with busy_processes(busy, busy_limit) as contention:
        for case in cases:
            base = ref * 0.5 if max_norm is None else max_norm
            if case == "noclip":
                base = ref * 1e6
            rows = []
            for impl in impls:
                progress(f"  {case:6s} check  {impl.name} against float64 ...")
                rows.append({"case": case, "impl": impl.name, **check(impl, master, work, params, base, ref)})
            # Round robin over the implementations on one working set, so that drift in the machine's state (other
            # load, clocks, caches) falls on all of them alike. In the clip case max_norm follows the norm down.
            for w, m in zip(work, master):
                w.copy_(m)
            norm_now = ref
            times: list[list[float]] = [[] for _ in impls]
            clipped: list[int] = [0 for _ in impls]
            for k in range(warmup + reps):
                progress(f"  {case:6s} round {k + 1}/{warmup + reps}" + (" (warm-up)" if k < warmup else ""))
                for i, impl in enumerate(impls):
                    m = base if (case == "noclip" or max_norm is not None) else norm_now * DECAY
                    flush()
                    out: list[Tensor] = []
                    t = timed(lambda: out.append(impl.fn(params, work, m)), device)
                    total = float(out[0])  # read after the timed region: did this call clip?
                    if case == "clip" and max_norm is None:
                        norm_now = m  # the clip left the norm at (just under) m
                    if k >= warmup:
                        times[i].append(t)
                        clipped[i] += m / (total + 1e-6) < 1
            torch_med = None
            for row, ts, n_clipped in zip(rows, times, clipped):
                med = statistics.median(ts)
                if row["impl"] == "torch foreach":
                    torch_med = med
                # The bytes a call must move: 3B when it clips (read; read + write), B when it need not.
                moved = (n_clipped * 3 * nbytes + (len(ts) - n_clipped) * nbytes) / len(ts)
                spread = (max(ts) - min(ts)) / med
                row.update(
                    median_ms=med * 1e3,
                    min_ms=min(ts) * 1e3,
                    max_ms=max(ts) * 1e3,
                    spread=spread,
                    clipped_calls=n_clipped,
                    timed_calls=len(ts),
                    bytes_moved=moved,
                    GBps=moved / med / 1e9,
                    pct_of_copy_bandwidth=None if in_cache else 100 * moved / med / 1e9 / bandwidth,
                )
                if spread > SPREAD_WARN:
                    warn(
                        f"{case} {row['impl']}: timings range {row['min_ms']:.3f}-{row['max_ms']:.3f} ms around a "
                        f"median of {row['median_ms']:.3f} ms ({spread:.0%} apart): the machine may be busy; rerun or "
                        "add --reps"
                    )
            for row in rows:
                row["speedup_vs_torch_foreach"] = torch_med / (row["median_ms"] / 1e3) if torch_med else None
            if case == "clip" and any(r["clipped_calls"] < r["timed_calls"] for r in rows):
                counts = ", ".join(f"{r['impl']} {r['clipped_calls']}/{r['timed_calls']}" for r in rows)
                why = f" (--max-norm {max_norm:g}, total norm {ref:.4g})" if max_norm is not None else ""
                warn(
                    f"--case clip: not every timed call clipped{why}: {counts}. The bytes counted follow what "
                    "happened; leave --max-norm out to have every call clip"
                )
            results += rows

    return {
        "schema": 2,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "environment": environment(device),
        "preset": {
            "name": preset.name,
            "description": preset.description,
            "tensors": preset.tensors,
            "params": preset.params,
            "dtype": dtype_name,
            "bytes": nbytes,
        },
        "settings": {
            "reps": reps,
            "warmup": warmup,
            "cold_l2": cold,
            "max_norm": max_norm,
            "decay": DECAY,
            "timing": "cuda events around the Python call" if device.type == "cuda" else "perf_counter",
            "statistic": "median",
        },
        "load_average_at_start": list(load) if load is not None else None,
        "busy": contention,
        "copy_bandwidth_GBps": bandwidth,
        "copy_bytes": copy_bytes,
        "last_level_cache_bytes": cache,
        "fits_in_cache": in_cache,
        "results": results,
    }


def environment(device: torch.device) -> dict:
    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "fusedclip": __version__,
        "backends": backends.available_backends(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device.type == "cuda":
        try:
            env["driver"] = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                )
                .stdout.strip()
                .splitlines()[0]
            )
        except Exception:
            env["driver"] = None
    return env


def _git_commit() -> Optional[str]:
    """HEAD of the checkout fusedclip runs from, '+dirty' when tracked files other than the records changed."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)bench/results"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=here,
        )
        commit = head.stdout.strip()
        return commit + ("+dirty" if status.stdout.strip() else "") if commit else None
    except Exception:
        return None


def _case_label(rows: list[dict], case: str) -> str:
    """The case as it happened: a clip case some of whose calls found nothing to clip says so."""
    if case != "clip":
        return case
    worst = min(rows, key=lambda r: r.get("clipped_calls", r.get("timed_calls", 0)))
    if "clipped_calls" in worst and worst["clipped_calls"] < worst["timed_calls"]:
        return f"clip ({worst['clipped_calls']}/{worst['timed_calls']} calls clipped)"
    return case


def _busy_label(record: dict) -> str:
    """', N busy processes' for a record timed under contention (bench --busy), else ''."""
    n = (record.get("busy") or {}).get("processes", 0)
    return f", {n} busy process{'es' if n > 1 else ''}" if n else ""


def format_table(record: dict) -> str:
    head = ["case", "implementation", "median ms", "min-max ms", "vs torch", "GB/s", "% copy bw", "total err", "exact"]
    rows = []
    for case in dict.fromkeys(r["case"] for r in record["results"]):
        in_case = [r for r in record["results"] if r["case"] == case]
        label = _case_label(in_case, case)
        for r in in_case:
            ratio = r.get("speedup_vs_torch_foreach")
            pct = r.get("pct_of_copy_bandwidth")
            rows.append(
                [
                    label,
                    r["impl"],
                    f"{r['median_ms']:.3f}",
                    f"{r['min_ms']:.3f}-{r['max_ms']:.3f}" + (" !" if r.get("spread", 0) > SPREAD_WARN else ""),
                    f"{ratio:.2f}x" if ratio else "-",
                    f"{r['GBps']:.1f}",
                    f"{pct:.0f}%" if pct is not None else "in cache",
                    f"{r['total_rel_err']:.1e}",
                    "yes" if r["matched"] else "NO",
                ]
            )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    p = record["preset"]
    env = record["environment"]
    cache = record.get("last_level_cache_bytes")
    title = (
        f"{p['name']}: {p['tensors']} tensors, {p['params'] / 1e6:.1f}M params, {p['dtype']}, "
        f"{p['bytes'] / 1e6:.0f} MB on {env['device']} ({env['device_name']}); "
        f"copy bandwidth {record['copy_bandwidth_GBps']:.1f} GB/s"
        + (f" (last-level cache {cache / 2**20:.0f} MiB)" if cache else "")
        + f"; torch {env['torch']}"
        + _busy_label(record)
    )
    notes = []
    if record.get("fits_in_cache"):
        notes.append("the gradients fit in the last-level cache: no % of (memory) copy bandwidth is given")
    if any(r.get("spread", 0) > SPREAD_WARN for r in record["results"]):
        notes.append(f"! timings more than {SPREAD_WARN:.0%} apart (max - min against the median): a busy machine?")
    return title + "\n" + "\n".join(lines + notes)


def markdown_table(records: list[tuple[str, dict]]) -> str:
    """A README table of (path, record) pairs: one row per preset, case and fusedclip implementation."""
    lines = [
        "| record | machine | preset | case | implementation | median ms (min-max) | stock torch foreach ms "
        "| speed-up | total error: fusedclip / torch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path, rec in records:
        env, p = rec["environment"], rec["preset"]
        machine = f"{env['device_name']} ({env['device']}, {env.get('cpu_count')} cores), torch {env['torch']}"
        machine += _busy_label(rec)
        for case in dict.fromkeys(r["case"] for r in rec["results"]):
            rows = [r for r in rec["results"] if r["case"] == case]
            stock = next(r for r in rows if r["impl"] == "torch foreach")
            label = _case_label(rows, case)
            for r in rows:
                if not r["impl"].startswith("fusedclip"):
                    continue
                lines.append(
                    f"| `{path}` | {machine} | {p['name']} {p['dtype']} | {label} | {r['impl']} | "
                    f"{r['median_ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f}) | {stock['median_ms']:.2f} | "
                    f"{r['speedup_vs_torch_foreach']:.2f}x | "
                    f"{r['total_rel_err']:.0e} / {stock['total_rel_err']:.0e} |"
                )
    return "\n".join(lines)


def markdown_host_table(records: list[tuple[str, dict]], sizes: Optional[list[int]] = None) -> str:
    """A README table of host records (bench --host): one row per tensor count, mode and entry point, each
    fusedclip backend's median host time per call with its ratio to the stock path and its fast-path hit rate.
    `sizes`: only these tensor counts."""
    lines = []
    for path, rec in records:
        env, st = rec["environment"], rec["settings"]
        impls = [i for i in dict.fromkeys(r["impl"] for r in rec["results"]) if i != STOCK]
        lines += [
            f"`{path}`: {env['device_name']} ({env['device']}, {env.get('cpu_count')} cores), torch {env['torch']}, "
            f"commit {rec.get('git_commit')}; launches {st['launches'].split(':')[0]}; fast path: {st['fast_path']}",
            "",
            "| tensors | mode | path | stock torch us | " + " | ".join(f"{i} us (vs stock, fast path)" for i in impls)
            + " |",
            "| --- | --- | --- | --- | " + " | ".join("---" for _ in impls) + " |",
        ]
        keys = dict.fromkeys((r["tensors"], r["mode"], r["path"]) for r in rec["results"] if r["impl"] != STOCK)
        for count, mode, entry in keys:
            if sizes and count not in sizes:
                continue
            key = (count, mode, entry)
            mine = {r["impl"]: r for r in rec["results"] if (r["tensors"], r["mode"], r["path"]) == key}
            first = next(iter(mine.values()))
            stock = first["stock_median_us"]
            cells = []
            for i in impls:
                r = mine.get(i)
                if r is None:
                    cells.append("-")
                    continue
                hit = r["fast_path_hit_rate"]
                cells.append(f"{r['median_us']:.0f} ({r['ratio_to_stock']:.3f}x, {hit:.0%})" if hit is not None
                             else f"{r['median_us']:.0f} ({r['ratio_to_stock']:.3f}x)")
            stock_cell = f"{stock:.0f} ({first['stock_path']})" if first["stock_path"] != entry else f"{stock:.0f}"
            lines.append(f"| {count} | {mode} | {entry} | {stock_cell} | " + " | ".join(cells) + " |")
        reuse = sorted({(r["tensors"], r["mode"]): r["address_reuse"] for r in rec["results"]
                        if r["mode"] == "fresh" and r["address_reuse"] is not None}.items())
        if reuse:
            lines += ["", "fresh: new gradients at the old addresses in " + ", ".join(
                f"{a:.0%} of steps ({n} tensors)" for (n, _), a in reuse if not sizes or n in sizes)]
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def write_record(record: dict, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)  # never leave a half-written record behind


# ---- host overhead: `python -m fusedclip bench --host` ---------------------------------------------------------------
#
# What a call costs the host (the CPU thread that makes it), with tensors so small that their compute is nothing:
# thread CPU time (time.thread_time_ns) of each call, median of many, stock torch timed round robin with fusedclip
# in the same run. On CPU the kernel backends run with their launches replaced by no-ops (the Triton backend's
# stubbed_launches(); the CUDA backend needs a GPU), so what is left is our host work; the torch backend and stock
# torch run for real (their compute on 1-element tensors is small next to their host work). On a GPU every
# launch is real: the time is the host's share of an asynchronous call.
#
# Modes:
#   kept   the gradients stay in place between calls;
#   fresh  before each call every .grad is set to None (zero_grad(set_to_none=True)), then new gradients are made in
#          reverse parameter order, as backward makes them, at the addresses the old ones had, as torch's CUDA caching
#          allocator hands them back in a steady loop. On every device the benchmark stands in for that allocator
#          (each new .grad is a new tensor over the memory the previous one had), so that the mode means the same
#          wherever it runs, whatever else the allocator serves between calls (`address_reuse` is 1 by construction);
#   moved  new gradients before each call at addresses no earlier call saw (on every device: views of an arena at
#          an offset that grows by 16 bytes per call), so that every call must find that its gradients moved and
#          rebuild its plan: no kept plan and no plan cache can know them. `address_reuse` is 0 by construction.
HOST_SIZES = (148, 2000, 10000)
HOST_MODES = ("kept", "fresh", "moved")
STOCK = "stock torch"
stock_value = TORCH_ORIGINALS["clip_grad_value_"]
stock_total_norm = TORCH_ORIGINALS["get_total_norm"]


class _Pair(torch.nn.Module):
    """A layer's worth of parameters (weight and bias), so that model.parameters() walks a module tree."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__()
        for i, p in enumerate(params):
            self.register_parameter(f"p{i}", p)


class HostSet:
    """`count` parameters of `numel` elements in a model of two-parameter modules, with gradients."""

    ARENA_SPARE = 1024  # calls of `moved` one arena serves before the next (a new allocation) takes over

    def __init__(self, count: int, numel: int, dtype: torch.dtype, device: torch.device, seed: int) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        self.masters = [torch.randn(numel, generator=gen, dtype=dtype, device=device) for _ in range(count)]
        self.params = [torch.nn.Parameter(torch.empty(numel, dtype=dtype, device=device)) for _ in range(count)]
        self.model = torch.nn.ModuleList(_Pair(self.params[i : i + 2]) for i in range(0, count, 2))
        # The stand-in for a caching allocator (see the modes above): the memory each `fresh` .grad is made in.
        self.blocks = [m.clone() for m in self.masters]
        # `moved`: gradient i of a call at arena[offset + i * stride], the offset 16 bytes further at each call.
        self.step = max(1, 16 // self.masters[0].element_size()) if count else 1
        self.stride = -(-numel // self.step) * self.step
        self.arena: Optional[Tensor] = None
        self.offset = 0
        self.grads: list[Tensor] = []
        self.new_grads("fresh")

    def new_grads(self, mode: str) -> None:
        """Replace every .grad: set_to_none first, then new tensors in reverse parameter order; `fresh`: in the memory
        the old ones had, `moved`: at addresses no earlier call had."""
        if mode not in ("fresh", "moved"):
            raise ValueError(f"mode must be 'fresh' or 'moved', got {mode!r}")
        for p in self.params:
            p.grad = None
        self.grads = []
        at = self._next_offset() if mode == "moved" else 0
        for i in reversed(range(len(self.params))):
            m = self.masters[i]
            if mode == "moved":
                g = self.arena[at + i * self.stride : at + i * self.stride + m.numel()]  # type: ignore[index]
            else:
                block = self.blocks[i]
                g = torch.empty(0, dtype=m.dtype, device=m.device).set_(block.untyped_storage(), 0, block.shape)
            g.copy_(m)
            self.params[i].grad = g
        self.grads = [p.grad for p in self.params]

    def _next_offset(self) -> int:
        """The element offset of this `moved` call in the arena: one step past the last call's, in a new arena (made
        while the old one is alive, so at other addresses) when this one is used up."""
        if self.arena is None or self.offset == self.ARENA_SPARE * self.step:
            m = self.masters[0]
            self.arena = torch.empty(len(self.masters) * self.stride + self.ARENA_SPARE * self.step, dtype=m.dtype,
                                     device=m.device)
            self.offset = 0
        self.offset += self.step
        return self.offset

    def addresses(self) -> list[int]:
        return [g.data_ptr() for g in self.grads]


@dataclass
class HostPath:
    path: str  # the public entry point (and how it is called)
    impl: str  # "stock torch" or "fusedclip <backend>"
    stock: str  # the stock path it is compared with
    make: Callable[[HostSet], Callable[[], object]]  # the call, bound to a parameter set


def host_paths(backend_names: list[str]) -> list[HostPath]:
    norm_list, norm_gen = "clip_grad_norm_ (list)", "clip_grad_norm_ (model.parameters())"
    out = [
        HostPath(norm_list, STOCK, norm_list, lambda s: lambda: stock_clip(s.params, 1.0)),
        HostPath(norm_gen, STOCK, norm_gen, lambda s: lambda: stock_clip(s.model.parameters(), 1.0)),
        HostPath("clip_grad_value_", STOCK, "clip_grad_value_", lambda s: lambda: stock_value(s.params, 1.0)),
        HostPath("get_total_norm", STOCK, "get_total_norm", lambda s: lambda: stock_total_norm(s.grads)),
    ]
    for name in backend_names:
        impl = f"fusedclip {name}"
        out += [
            HostPath(norm_list, impl, norm_list, lambda s, n=name: lambda: clip_grad_norm_(s.params, 1.0, backend=n)),
            HostPath(
                norm_gen, impl, norm_gen,
                lambda s, n=name: lambda: clip_grad_norm_(s.model.parameters(), 1.0, backend=n),
            ),
            HostPath("GradClipper", impl, norm_list, lambda s, n=name: GradClipper(s.params, 1.0, backend=n)),
            HostPath(
                "clip_grad_value_", impl, "clip_grad_value_",
                lambda s, n=name: lambda: clip_grad_value_(s.params, 1.0, backend=n),
            ),
            HostPath(
                "multi_tensor_norm", impl, "get_total_norm",
                lambda s, n=name: lambda: multi_tensor_norm(s.grads, backend=n),
            ),
            HostPath(
                "get_total_norm", impl, "get_total_norm", lambda s, n=name: lambda: get_total_norm(s.grads, backend=n)
            ),
        ]
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def host_backends(device: torch.device, only: Optional[list[str]]) -> tuple[list[str], dict[str, str]]:
    """The fusedclip backends to time on `device` (names), and why the others are left out."""
    names, why_not = [], {}
    for name in backends.BACKEND_NAMES:
        if only and name not in only:
            continue
        try:
            backends.select(name, device)
        except (RuntimeError, ValueError) as e:
            why_not[name] = str(e)
            continue
        names.append(name)
    return names, why_not


def run_host(
    sizes: tuple[int, ...] = HOST_SIZES,
    modes: tuple[str, ...] = HOST_MODES,
    device_name: Optional[str] = None,
    reps: Optional[int] = None,
    warmup: int = 3,
    numel: int = 1,
    only: Optional[list[str]] = None,
    seed: int = 0,
) -> dict:
    """The host-overhead record (see above). `reps` None: enough calls per size for a stable median."""
    import contextlib
    import gc

    device = parse_device(device_name)
    stub = device.type == "cpu"
    launches = "real"
    context: contextlib.AbstractContextManager = contextlib.nullcontext()
    if stub:
        try:
            from .backends import triton_backend

            context = triton_backend.stubbed_launches()
            launches = "stubbed: every Triton kernel launch is a no-op after its host work (CPU, no interpreter)"
        except backends.BackendUnavailable as e:
            launches = f"no kernel backend here ({e})"
    results: list[dict] = []
    # One intra-op thread: a host-time figure is the calling thread's work. With more, an op past torch's
    # parallel grain (a plan build's tables at 2,000 tensors) starts an OpenMP region, and on a busy machine the
    # calling thread's spin-wait for the pool (milliseconds here) would be charged to whichever path ran it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with context, contextlib.ExitStack() as restore:
        restore.callback(torch.set_num_threads, threads)
        names, why_not = host_backends(device, only)
        paths = host_paths(names)
        progress(
            f"fusedclip bench --host: {', '.join(map(str, sizes))} tensors of {numel} element(s) on {device}; "
            f"backends {', '.join(names) or 'none'}; launches {launches.split(':')[0]}"
        )
        for count in sizes:
            n_reps = reps if reps is not None else max(30, min(300, 300_000 // count))
            for mode in modes:
                state = HostSet(count, numel, torch.float32, device, seed)
                calls = [p.make(state) for p in paths]
                times: list[list[float]] = [[] for _ in paths]
                hits = [0 for _ in paths]
                misses = [0 for _ in paths]
                reused = steps = 0
                progress(f"  {count} tensors, {mode}: {len(paths)} paths x ({warmup} + {n_reps}) calls ...")
                gc.collect()
                gc.disable()  # a collection inside a timed call would be charged to whichever path it hit
                try:
                    for k in range(warmup + n_reps):
                        for i, call in enumerate(calls):
                            if mode != "kept":
                                before = state.addresses()
                                state.new_grads(mode)
                                if k >= warmup:  # the warm-up reaches the steady state
                                    reused += before == state.addresses()
                                    steps += 1
                            h0, m0 = fastpath.stats.hits, fastpath.stats.misses
                            sync(device)
                            t0 = time.thread_time_ns()
                            call()
                            t1 = time.thread_time_ns()
                            sync(device)
                            h1, m1 = fastpath.stats.hits, fastpath.stats.misses
                            if k >= warmup:
                                times[i].append((t1 - t0) / 1e3)
                                hits[i] += h1 - h0
                                misses[i] += m1 - m0
                        gc.collect()
                finally:
                    gc.enable()
                medians = {}
                for path, ts in zip(paths, times):
                    if path.impl == STOCK:
                        medians[path.path] = statistics.median(ts)
                for i, (path, ts) in enumerate(zip(paths, times)):
                    med = statistics.median(ts)
                    stock_med = medians.get(path.stock)
                    attempts = hits[i] + misses[i]
                    results.append({
                        "path": path.path,
                        "impl": path.impl,
                        "stock_path": path.stock,
                        "tensors": count,
                        "mode": mode,
                        "calls": len(ts),
                        "median_us": med,
                        "min_us": min(ts),
                        "p10_us": _percentile(ts, 0.1),
                        "p90_us": _percentile(ts, 0.9),
                        "max_us": max(ts),
                        "stock_median_us": stock_med,
                        "ratio_to_stock": med / stock_med if stock_med else None,
                        "fast_path_hit_rate": hits[i] / attempts if attempts else None,
                        "address_reuse": reused / steps if steps else None,
                    })
    return {
        "schema": 1,
        "kind": "host",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "environment": environment(device),
        "settings": {
            "sizes": list(sizes),
            "modes": list(modes),
            "numel_per_tensor": numel,
            "dtype": "float32",
            "reps": reps,
            "warmup": warmup,
            "launches": launches,
            "timing": "time.thread_time_ns around each call (CPU time of the calling thread), round robin; "
            "garbage collection off while timing; torch.set_num_threads(1) while timing",
            "statistic": "median",
            "fast_path": "per-call check in " + fastpath.describe(),
        },
        "left_out": why_not,
        "results": results,
    }


def format_host_table(record: dict) -> str:
    head = ["tensors", "mode", "path", "implementation", "median us", "p10-p90 us", "vs stock", "fast path"]
    rows = []
    for r in record["results"]:
        ratio = r.get("ratio_to_stock")
        hit = r.get("fast_path_hit_rate")
        rows.append([
            str(r["tensors"]), r["mode"], r["path"], r["impl"], f"{r['median_us']:.1f}",
            f"{r['p10_us']:.1f}-{r['p90_us']:.1f}", f"{ratio:.3f}x" if ratio is not None else "-",
            f"{hit:.0%}" if hit is not None else "-",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    env, s = record["environment"], record["settings"]
    title = (
        f"host time per call on {env['device']} ({env['device_name']}), torch {env['torch']}; launches: "
        f"{s['launches']}; fast path: {s['fast_path']}"
    )
    notes = []
    for mode in ("fresh", "moved"):
        reuse = sorted({r["tensors"]: r["address_reuse"] for r in record["results"] if r["mode"] == mode}.items())
        if reuse:
            notes.append(f"{mode}: the new gradients had the old ones' addresses in " + ", ".join(
                f"{a:.0%} of steps ({n} tensors)" for n, a in reuse if a is not None))
    return title + "\n" + "\n".join(lines + notes)


# ---- host overhead of a mixture-of-experts layout: `python -m fusedclip bench --host --moe` ------------------------
#
# Expert-parallel training in torchtitan's layout, on gloo ranks spawned here (CPU): dense weights FSDP-sharded over
# a "fsdp" mesh, grouped expert weights over a 2-D ("efsdp", "ep") mesh, both cut from one world mesh. Each rank holds
# DTensor gradients of a few elements (their compute is nothing: what is timed is host work) and times, in
# interleaved rounds, torchtitan's clip_grad_norm_(..., ep_enabled=True) (two stock get_total_norm calls, a
# full_tensor per mesh, two clip_grads_with_norm_ calls) against fusedclip's clip_grad_norm_ and GradClipper over
# the same gradients (kept in place: the steady state of a loop whose allocator hands back the same addresses).
# On CPU the Triton backend's launches are stubbed (see run_host); the torch backend runs for real. The figure is
# the calling thread's CPU time per call; gloo runs its collectives on its own threads, which is not counted for
# either side (torchtitan issues two or more collectives a call, fusedclip one).
MOE_LAYERS = 384  # 13 tensors a layer (4 attention, 2 norms, router, 3 grouped experts, 3 shared expert) + 3 = 4,995
MOE_WORLD, MOE_EP = 4, 2
TORCHTITAN_INSTALL = "pip install torchtitan==0.3.0 spmd_types==0.2.3 --no-deps && pip install tyro==1.0.17"


def moe_host_grads(layers: int, ep: int, seed: int = 0) -> list[torch.nn.Parameter]:
    """This rank's parameters of the MoE layout, each with a DTensor gradient (call inside a process group)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("world",))
    dense = mesh._unflatten(0, (1, world), ("pp", "fsdp"))["fsdp"]
    sparse = mesh._unflatten(0, (1, world // ep, ep), ("pp", "efsdp", "ep"))["efsdp", "ep"]
    gen = torch.Generator().manual_seed(seed)
    dim, experts, hidden, vocab = 8, 8, 4, 32

    def param(shape: tuple[int, ...], expert: bool) -> torch.nn.Parameter:
        full = torch.randn(shape, generator=gen)
        if expert:  # FSDP over efsdp on dim 1 (torchtitan's Shard(1) when efsdp x ep exceeds the experts), EP on 0
            grad = distribute_tensor(full, sparse, [Shard(1), Shard(0)], src_data_rank=None)
        else:
            grad = distribute_tensor(full, dense, [Shard(0)], src_data_rank=None)
        p = torch.nn.Parameter(DTensor.from_local(torch.zeros_like(grad.to_local()), grad.device_mesh,
                                                  grad.placements, run_check=False))
        p.grad = grad
        return p

    shapes = [((vocab, dim), False)]
    for _ in range(layers):
        shapes += [((dim, dim), False)] * 4 + [((dim,), False)] * 2 + [((experts, dim), False)]
        shapes += [((experts, hidden, dim), True), ((experts, dim, hidden), True), ((experts, hidden, dim), True)]
        shapes += [((hidden, dim), False), ((dim, hidden), False), ((hidden, dim), False)]
    shapes += [((dim,), False), ((vocab, dim), False)]
    return [param(s, e) for s, e in shapes]


def _moe_host_rank(rank: int, world: int, port: int, queue, layers: int, reps: int, warmup: int,
                   only: Optional[list[str]], seed: int) -> None:
    """One rank of run_host_moe: times every path, sends rank 0 the per-rank figures, rank 0 the record's rows."""
    import contextlib
    import gc

    import torch.distributed as dist

    torch.set_num_threads(1)  # as run_host: a host figure is the calling thread's work
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        try:
            from torchtitan.distributed.utils import clip_grad_norm_ as titan_clip
        except ImportError as e:
            raise BenchError(f"--moe compares against torchtitan, which is not importable ({e}): {TORCHTITAN_INSTALL}")
        params = moe_host_grads(layers, MOE_EP, seed)
        # Check first, for real: torchtitan's total and the torch backend's agree (the stubbed Triton launches
        # compute nothing). Then no clip: max_norm far above the total, so the gradients keep their values.
        big = 1e9
        want = float(titan_clip(params, big, ep_enabled=True))
        got = float(clip_grad_norm_(params, big, backend="torch"))
        matched = math.isclose(got, want, rel_tol=1e-5)
        context: contextlib.AbstractContextManager = contextlib.nullcontext()
        try:
            from .backends import triton_backend

            context = triton_backend.stubbed_launches()
            context.__enter__()  # (before host_backends: within it the Triton backend takes CPU tensors)
        except backends.BackendUnavailable:
            context = contextlib.nullcontext()
        names, why_not = host_backends(torch.device("cpu"), only)
        paths: list[tuple[str, str, Callable[[], object]]] = [
            ("clip_grad_norm_", "torchtitan", lambda: titan_clip(params, big, ep_enabled=True)),
        ]
        for name in names:
            clip = lambda n=name: clip_grad_norm_(params, big, backend=n)  # noqa: E731
            paths.append(("clip_grad_norm_", f"fusedclip {name}", clip))
            paths.append(("GradClipper", f"fusedclip {name}", GradClipper(params, big, backend=name)))
        times: list[list[float]] = [[] for _ in paths]
        hits = [0] * len(paths)
        attempts = [0] * len(paths)
        with contextlib.ExitStack() as stack:
            stack.push(context.__exit__)
            gc.collect()
            gc.disable()
            try:
                for k in range(warmup + reps):
                    for j in range(len(paths)):
                        i = (j + k) % len(paths)  # interleaved: each round starts one path further
                        h0, m0 = fastpath.stats.hits, fastpath.stats.misses
                        t0 = time.thread_time_ns()
                        paths[i][2]()
                        t1 = time.thread_time_ns()
                        if k >= warmup:
                            times[i].append((t1 - t0) / 1e3)
                            hits[i] += fastpath.stats.hits - h0
                            attempts[i] += fastpath.stats.hits - h0 + fastpath.stats.misses - m0
                    gc.collect()
            finally:
                gc.enable()
        mine = [
            {"median_us": statistics.median(ts), "p10_us": _percentile(ts, 0.1), "p90_us": _percentile(ts, 0.9),
             "hit_rate": hits[i] / attempts[i] if attempts[i] else None}
            for i, ts in enumerate(times)
        ]
        for i, m in enumerate(mine):  # paired: this path's time over torchtitan's in the same round
            m["paired_ratio_median"] = statistics.median(a / b for a, b in zip(times[i], times[0]))
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            queue.put(("ok", {
                "paths": [(p, impl) for p, impl, _ in paths], "ranks": gathered, "matched": matched,
                "titan_total": want, "fusedclip_total": got, "tensors": len(params), "left_out": why_not,
            }))
        dist.barrier()
    except BaseException as e:  # every rank reports; the parent stops at the first
        queue.put(("error", f"rank {rank}: {type(e).__name__}: {e}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_host_moe(reps: Optional[int] = None, warmup: int = 3, only: Optional[list[str]] = None,
                 layers: int = MOE_LAYERS, world: int = MOE_WORLD, seed: int = 0) -> dict:
    """The MoE host-overhead record (see above): `world` gloo ranks on this machine."""
    import socket

    import torch.multiprocessing as mp

    reps = reps if reps is not None else 30
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    progress(f"fusedclip bench --host --moe: {world} gloo ranks, {layers} layers, ({warmup} + {reps}) rounds ...")
    procs = [
        ctx.Process(target=_moe_host_rank, args=(r, world, port, queue, layers, reps, warmup, only, seed))
        for r in range(world)
    ]
    for proc in procs:
        proc.start()
    try:
        status, out = queue.get(timeout=3600)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    if status != "ok":
        raise BenchError(out)
    results = []
    titan = [r[0]["median_us"] for r in out["ranks"]]
    for i, (path, impl) in enumerate(out["paths"]):
        medians = [r[i]["median_us"] for r in out["ranks"]]
        results.append({
            "path": path,
            "impl": impl,
            "tensors": out["tensors"],
            "per_rank_median_us": medians,
            "per_rank_p10_us": [r[i]["p10_us"] for r in out["ranks"]],
            "per_rank_p90_us": [r[i]["p90_us"] for r in out["ranks"]],
            "median_us": statistics.median(medians),
            "torchtitan_median_us": statistics.median(titan),
            "ratio_to_torchtitan": statistics.median(medians) / statistics.median(titan),
            "paired_ratio_median": statistics.median(r[i]["paired_ratio_median"] for r in out["ranks"]),
            "fast_path_hit_rate": out["ranks"][0][i]["hit_rate"],
        })
    try:
        import torchtitan

        titan_version = getattr(torchtitan, "__version__", None) or _dist_version("torchtitan")
    except ImportError:
        titan_version = None
    return {
        "schema": 1,
        "kind": "host-moe",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "environment": {**environment(torch.device("cpu")), "torchtitan": titan_version},
        "settings": {
            "world": world,
            "layout": f"{layers} MoE layers of 13 tensors + 3 ({out['tensors']} DTensor gradients per rank): dense "
            f"Shard(0) over a {world}-rank 'fsdp' mesh, grouped experts (Shard(1), Shard(0)) over "
            f"('efsdp', 'ep') = ({world // MOE_EP}, {MOE_EP}), both cut from one world mesh; a few elements each",
            "reps": reps,
            "warmup": warmup,
            "launches": "Triton: stubbed (every launch a no-op after its host work); torch backend, torchtitan: real",
            "timing": "time.thread_time_ns around each call on every rank (gloo's own threads not counted), rounds "
            "interleaved (each round starts one path further), garbage collection off, one intra-op thread; "
            "median per rank, then the median over ranks; paired_ratio_median: the median over rounds of each "
            "call's time over torchtitan's in the same round",
            "max_norm": "1e9 (no clip: the gradients keep their values; both sides still run their scale pass)",
            "fast_path": "per-call check in " + fastpath.describe(),
        },
        "check": {"torchtitan_total": out["titan_total"], "fusedclip_torch_total": out["fusedclip_total"],
                  "matched": out["matched"]},
        "left_out": out["left_out"],
        "results": results,
    }


def _dist_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def format_moe_host_table(record: dict) -> str:
    head = ["path", "implementation", "median us (per rank)", "vs torchtitan", "paired", "fast path"]
    rows = []
    for r in record["results"]:
        hit = r.get("fast_path_hit_rate")
        rows.append([
            r["path"], r["impl"], f"{r['median_us']:.0f} ({', '.join(f'{m:.0f}' for m in r['per_rank_median_us'])})",
            f"{r['ratio_to_torchtitan']:.4f}x", f"{r['paired_ratio_median']:.4f}x",
            f"{hit:.0%}" if hit is not None else "-",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    env, s = record["environment"], record["settings"]
    return (
        f"host time per call, {s['world']} gloo ranks on {env['device_name']}, torch {env['torch']}, torchtitan "
        f"{env.get('torchtitan')}; {s['layout']}; launches: {s['launches']}; check: {record['check']}\n"
        + "\n".join(lines)
    )
