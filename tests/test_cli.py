"""The command line: bench writes a complete, truthful record; info names every backend."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import fusedclip.fastpath
from fusedclip import __main__ as cli
from fusedclip.presets import PRESETS


def test_presets_match_their_architectures():
    # Parameter counts of the real models these configs describe.
    assert (PRESETS["gpt2"].tensors, PRESETS["gpt2"].params) == (148, 124_439_808)
    assert PRESETS["llama-1b"].params == 1_235_814_400
    assert PRESETS["llama-7b"].params == 6_738_415_616
    assert PRESETS["many-small"].tensors >= 2000


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_writes_record(tmp_path, capsys, dtype):
    out = tmp_path / "sub" / "record.json"
    rc = cli.main(["bench", "--preset", "tiny", "--dtype", dtype, "--device", "cpu", "--reps", "3", "--out", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    impls = {r["impl"] for r in record["results"]}
    assert {"torch foreach", "torch loop", "fusedclip torch"} <= impls
    assert {r["case"] for r in record["results"]} == {"clip", "noclip"}
    assert record["preset"]["tensors"] == PRESETS["tiny"].tensors and record["preset"]["dtype"] == dtype
    assert record["copy_bandwidth_GBps"] > 0 and record["environment"]["torch"]
    for r in record["results"]:
        assert r["matched"], r
        assert r["median_ms"] > 0 and r["GBps"] > 0
        assert r["speedup_vs_torch_foreach"] is not None
        if r["impl"].startswith("fusedclip"):
            assert r["total_dtype"] == "float32"
    table = capsys.readouterr().out
    assert "fusedclip torch" in table and "vs torch" in table
    assert cli.main(["table", str(out)]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| record |") and len(md) == 2 + 2  # header, rule, one row per case
    assert all(str(out) in line and "fusedclip torch" in line for line in md[2:])


def test_bench_refuses_what_does_not_fit(monkeypatch, capsys):
    import fusedclip.bench

    monkeypatch.setattr(fusedclip.bench, "free_memory", lambda device: 1 << 30)
    assert cli.main(["bench", "--preset", "gpt2", "--device", "cpu"]) == 2
    assert "GiB" in capsys.readouterr().err


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--preset", "gpt5"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "--preset", "tiny", "--reps", "0"])
    capsys.readouterr()
    assert cli.main(["bench", "--preset", "tiny", "--device", "cpu", "--impl", "fusedclip cudnn"]) == 2
    err = capsys.readouterr().err
    assert "not an implementation" in err and "'fusedclip torch'" in err
    for device, why in [("gpu", "not a device"), ("meta", "cpu or cuda")]:
        assert cli.main(["bench", "--preset", "tiny", "--device", device]) == 2
        assert why in capsys.readouterr().err


def one_line_error(*args: str, env: dict | None = None) -> str:
    """Run the command line in a fresh process; it must fail with exit status 2 and one line on stderr."""
    clean = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "fusedclip", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**clean, **(env or {})})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the answer of a machine without CUDA")
def test_bench_on_missing_cuda_or_triton_is_a_one_line_error():
    assert "no CUDA device here" in one_line_error("bench", "--preset", "tiny", "--device", "cuda")
    # the --help example, without a GPU or Triton's interpreter
    err = one_line_error("bench", "--preset", "tiny", "--impl", "fusedclip triton")
    assert "'fusedclip triton' cannot run on cpu" in err and "TRITON_INTERPRET=1" in err


def test_bench_help_shows_defaults_and_every_option():
    help_text = subprocess.run(
        [sys.executable, "-m", "fusedclip", "bench", "--help"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    flat = " ".join(help_text.split())
    assert "(default: 10)" in flat and "(default: gpt2)" in flat and "(default: both)" in flat
    assert "--warmup WARMUP untimed calls" in flat and "(default: 2)" in flat
    assert "tiny: GPT-2 layout at toy size" in flat


def test_bench_labels_a_clip_case_that_never_clips(tmp_path, capsys):
    out = tmp_path / "never.json"
    args = ["bench", "--preset", "tiny", "--device", "cpu", "--case", "clip", "--max-norm", "1e9", "--reps", "3"]
    assert cli.main(args + ["--impl", "fusedclip torch", "--impl", "torch foreach", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    record = json.loads(out.read_text())
    nbytes = record["preset"]["bytes"]
    for r in record["results"]:
        assert r["case"] == "clip" and r["clipped_calls"] == 0 and r["timed_calls"] == 3 and r["coef"] == 1.0
        assert r["bytes_moved"] == nbytes  # one read: nothing to clip
    assert "not every timed call clipped" in captured.err
    assert "clip (0/3 calls clipped)" in captured.out
    assert cli.main(["table", str(out)]) == 0
    assert "clip (0/3 calls clipped)" in capsys.readouterr().out


def test_bench_flags_a_working_set_in_cache_and_measures_memory_bandwidth(tmp_path, capsys):
    from fusedclip.bench import last_level_cache_bytes

    out = tmp_path / "tiny.json"
    assert cli.main(["bench", "--preset", "tiny", "--device", "cpu", "--reps", "2", "--cold", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "--cold flushes a GPU's L2" in err and "does nothing" in err
    record = json.loads(out.read_text())
    assert record["settings"]["cold_l2"] is False
    cache = last_level_cache_bytes(torch.device("cpu"))
    if cache is None:
        pytest.skip("this machine does not report its cache sizes")
    assert record["last_level_cache_bytes"] == cache and record["copy_bytes"] >= 4 * cache
    assert record["preset"]["bytes"] < cache and record["fits_in_cache"] is True
    assert all(r["pct_of_copy_bandwidth"] is None for r in record["results"])
    assert "fit in the" in err


def test_bench_reports_spread_and_warns_when_runs_disagree(monkeypatch, tmp_path, capsys):
    import fusedclip.bench

    calls = iter(range(10_000))
    # Every 5th call takes twice as long: the spread is 100% of the median.
    monkeypatch.setattr(fusedclip.bench, "timed", lambda fn, device: (fn(), 2e-3 if next(calls) % 5 == 0 else 1e-3)[1])
    out = tmp_path / "spread.json"
    args = ["bench", "--preset", "tiny", "--device", "cpu", "--reps", "5", "--case", "noclip", "--out", str(out)]
    assert cli.main(args + ["--impl", "torch foreach"]) == 0
    captured = capsys.readouterr()
    (row,) = json.loads(out.read_text())["results"]
    assert row["min_ms"] == 1.0 and row["max_ms"] == 2.0 and row["median_ms"] == 1.0 and row["spread"] == 1.0
    assert "1.000-2.000 !" in captured.out and "apart" in captured.err


def test_info_runs_as_a_module():
    out = subprocess.run(
        [sys.executable, "-m", "fusedclip", "info", "--json"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    info = json.loads(out)
    assert "torch" in info["available_backends"]
    assert set(info["available_backends"]) | set(info["unavailable_backends"]) == {"cuda", "triton", "torch"}
    assert info["host_fast_path"].startswith("on; per-call check in ")
    assert ("C++" in info["host_fast_path"]) == fusedclip.fastpath.uses_extension()


# ---- info: the machine (GPU, driver, sandbox, profiling tools) ----------------------------------------------------

# The lines info wrote before the machine was added, in order: they stay as they were.
INFO_KEYS = ("fusedclip", "python", "torch", "torch_cuda", "cuda_available", "devices", "TRITON_INTERPRET",
             "FUSEDCLIP_BACKEND", "triton", "available_backends", "backends_by_device", "unavailable_backends",
             "auto_backend_cuda", "auto_backend_cpu", "cuda_extension", "host_fast_path")


def test_info_keeps_its_lines_and_adds_the_machine_after_them():
    from fusedclip import info

    data = info.collect()
    assert list(data) == list(INFO_KEYS) + list(info.MACHINE_KEYS)
    expected = []
    for key in INFO_KEYS:
        if key == "unavailable_backends":
            expected += [f"{'backend ' + name:20s} unavailable: {why}" for name, why in data[key].items()]
        else:
            expected.append(f"{key:20s} {data[key]}")
    lines = info.format_info(data).splitlines()
    assert lines[: len(expected)] == expected
    machine = dict(line.split(None, 1) for line in lines[len(expected):])
    assert list(machine) == list(info.MACHINE_KEYS)
    assert machine["kernel"] == data["kernel"] and machine["sandbox"].startswith("kind: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the answer of a machine without a GPU")
def test_info_without_a_gpu_says_so_and_never_fails():
    from fusedclip import info

    found = info.machine(probe_tools=True)
    assert found["kernel"] == __import__("platform").release()
    assert set(found["sandbox"]) == {"kind", "evidence"} and found["sandbox"]["evidence"]
    if shutil.which("nvidia-smi") is None:
        assert found["gpus"] == [] and found["driver"] is None
    for key in ("compute_sanitizer", "ncu"):
        tool = found[key]
        assert set(tool) == {"path", "version", "works", "evidence"}
        assert tool["works"] is False  # absent, or present but no GPU to run the probe kernel on
    assert "none found" in info.format_info({"gpus": []})
    assert info.probe_kernel() == 1  # no driver: a message, exit status 1


@pytest.mark.parametrize("proc_version, dmesg, cmdline, release, kind", [
    ("Linux version 4.4.0 #1 SMP Sun Jan 10 15:06:54 PST 2016", "[    0.000000] Starting gVisor...\n", "", "4.4.0",
     "gvisor"),
    ("Linux version 4.19.0-gvisor", "", "", "4.19.0-gvisor", "gvisor"),
    ("Linux version 6.18.44-fc-v310-gpu", "", "", "6.18.44-fc-v310-gpu", "firecracker"),
    ("Linux version 6.1.0", "", "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5", "6.1.0", "firecracker"),
    ("Linux version 6.1.0-18-amd64", "[ 0.0] Linux version 6.1.0-18-amd64\n", "BOOT_IMAGE=/vmlinuz", "6.1.0-18-amd64",
     None),
    ("Linux version 4.4.0", "", "", "4.4.0", None),  # gVisor's usual release alone is a hint, not evidence
])
def test_sandbox_is_detected_from_what_the_kernel_shows(proc_version, dmesg, cmdline, release, kind):
    from fusedclip import info

    found = info.sandbox(proc_version=proc_version, dmesg=dmesg, cmdline=cmdline, release=release)
    assert found["kind"] == kind, found
    if release == "4.4.0" and kind is None:
        assert "gVisor reports" in found["evidence"]


FAKE_TOOL_OUTPUT = {  # what each tool prints on a machine where it works, and on a gVisor one (KINDS.md)
    ("compute-sanitizer", True): ("========= COMPUTE-SANITIZER\nprobe: the kernel ran\n"
                                  "========= ERROR SUMMARY: 0 errors", 0),
    ("compute-sanitizer", False): ("========= COMPUTE-SANITIZER\n========= Error: Device not supported\n"
                                   "probe: cuMemAlloc failed with CUDA error 999\n========= ERROR SUMMARY: 1 error", 1),
    ("ncu", True): ("==PROF== Connected to process 7\nprobe: the kernel ran\n  probe (1, 1, 1)x(1, 1, 1)\n"
                    "    gpu__time_duration.sum     usecond         1.25", 0),
    ("ncu", False): ("==PROF== Connected to process 7\n==ERROR== Failed to initialize the profiler: "
                     "LibraryNotLoaded\nprobe: the kernel ran", 1),
}


@pytest.mark.parametrize("name, works", list(FAKE_TOOL_OUTPUT))
def test_a_tool_works_only_when_it_ran_the_probe_kernel_cleanly(tmp_path, monkeypatch, name, works):
    from fusedclip import info

    text, rc = FAKE_TOOL_OUTPUT[(name, works)]
    fake = tmp_path / name
    fake.write_text(f"#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'fake {name} 2025.3'; exit 0; fi\n"
                    f"cat <<'EOF'\n{text}\nEOF\nexit {rc}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    found = info.tool(name, probe=True)
    assert found["path"] == str(fake) and found["version"] == f"fake {name} 2025.3"
    assert found["works"] is works, found
    if not works:
        assert ("Device not supported" if name == "compute-sanitizer" else "LibraryNotLoaded") in found["evidence"]
    assert info.tool(name)["works"] is None  # not tried unless asked


@pytest.mark.parametrize("name, text, rc, works", [
    # no refusal printed: not known (the GPU check runs the tool anyway and records its failure)
    ("compute-sanitizer", "========= COMPUTE-SANITIZER\n========= Internal Sanitizer Error: unexpected\n", 1, None),
    ("compute-sanitizer", "========= COMPUTE-SANITIZER\nprobe: the kernel ran\n", 0, None),  # no ERROR SUMMARY
    ("compute-sanitizer", "probe: cuLaunchKernel failed with CUDA error 719\n========= ERROR SUMMARY: 1 error", 1,
     None),
    ("ncu", "==PROF== Connected to process 7\nprobe: the kernel ran\n", 0, None),  # no metric
    ("ncu", "==ERROR== An error occurred while trying to profile.\nprobe: the kernel ran", 9, None),
    # a refusal, or no GPU for the probe: does not work here
    ("ncu", "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission\nprobe: the kernel ran", 1, False),
    ("compute-sanitizer", "probe: no CUDA driver: libcuda.so.1: cannot open shared object file\n", 1, False),
    ("ncu", "probe: cuInit failed with CUDA error 100\n", 1, False),
])
def test_a_tool_does_not_work_only_where_it_says_so(monkeypatch, name, text, rc, works):
    from fusedclip import info

    monkeypatch.setattr(info, "_run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, rc, text, ""))
    found = info.probe_tool(name, f"/x/{name}")
    assert found["works"] is works and found["evidence"].startswith(f"exit {rc}: "), found


def test_the_probe_kernel_assembles_for_sm90():
    triton_knobs = pytest.importorskip("triton").knobs
    ptxas = triton_knobs.nvidia.ptxas.path  # Triton's bundled ptxas: there wherever triton is
    from fusedclip import info

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.ptx")
        with open(src, "w") as f:
            f.write(info.PROBE_PTX)
        run = subprocess.run([ptxas, "-arch=sm_90", src, "-o", os.path.join(tmp, "probe.cubin")],
                             capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (state, ppid, ...; the name may hold spaces and parentheses)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _spinners() -> list[int]:
    """Pids of this process's children that run bench's busy loop (read from /proc)."""
    me, found = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid, cmdline = int(_stat(int(d.name))[1]), (d / "cmdline").read_bytes()
        except OSError:
            continue
        if ppid == me and b"spinning" in cmdline:
            found.append(int(d.name))
    return found


def _cpu_ticks(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[11]) + int(fields[12])  # utime + stime


def _gone(pid: int) -> bool:
    try:
        return _stat(pid)[0] in ("Z", "X")
    except OSError:
        return True


def _until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")


@needs_proc
def test_busy_processes_spin_and_end_with_the_block_even_on_an_exception():
    from fusedclip.bench import busy_processes

    with busy_processes(2, limit_s=60) as state:
        pids = _spinners()
        assert len(pids) == 2
        ticks = {p: _cpu_ticks(p) for p in pids}
        assert _until(lambda: all(_cpu_ticks(p) > ticks[p] for p in pids)), "the busy processes do not spin"
    assert state["processes"] == 2 and state["alive_until_end"] is True
    assert _spinners() == [] and all(_gone(p) for p in pids)
    with pytest.raises(KeyboardInterrupt), busy_processes(1, limit_s=60):  # Ctrl-C during the timing
        pids = _spinners()
        assert len(pids) == 1
        raise KeyboardInterrupt
    assert _spinners() == [] and _gone(pids[0])
    with busy_processes(0) as state:
        assert _spinners() == []
    assert state == {"processes": 0}


@needs_proc
def test_busy_processes_end_by_themselves_at_their_deadline(capsys):
    from fusedclip.bench import busy_processes

    with busy_processes(1, limit_s=0.2) as state:
        (pid,) = _spinners()
        assert _until(lambda: _gone(pid)), "a busy process outlived its deadline"
    assert state["alive_until_end"] is False and "reached its 0.2 s limit" in capsys.readouterr().err


@needs_proc
def test_busy_processes_end_when_the_benchmark_is_killed():
    # os._exit: no finally, no context manager exit (as SIGKILL): the busy process sees its parent gone and ends.
    script = (
        "import os, sys\nsys.path.insert(0, sys.argv[1])\nfrom test_cli import _spinners\n"
        "from fusedclip.bench import busy_processes\n"
        "busy = busy_processes(1, limit_s=60)\nbusy.__enter__()\nprint(*_spinners(), flush=True)\nos._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True, text=True, timeout=120,
        check=False,
    )
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 1, out.stderr
    assert _until(lambda: _gone(pids[0])), "a busy process outlived the benchmark"


def test_bench_under_contention_writes_what_it_measured(tmp_path, capsys):
    out = tmp_path / "busy.json"
    args = ["bench", "--preset", "tiny", "--device", "cpu", "--reps", "2", "--case", "noclip", "--busy", "1"]
    impls = ["--impl", "torch foreach", "--impl", "fusedclip torch"]
    assert cli.main(args + ["--busy-limit", "120", *impls, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["busy"]["processes"] == 1 and record["busy"]["alive_until_end"] is True
    assert record["busy"]["limit_s"] == 120 and "spin" in record["busy"]["what"]
    assert len(record["load_average_at_start"]) == 3 and all(r["matched"] for r in record["results"])
    assert capsys.readouterr().out.splitlines()[0].endswith(", 1 busy process")  # the table says so, and the README's:
    assert cli.main(["table", str(out)]) == 0 and ", 1 busy process |" in capsys.readouterr().out
    if Path("/proc").exists():
        assert _spinners() == []
    quiet = tmp_path / "quiet.json"
    assert cli.main(args[:-2] + ["--impl", "fusedclip torch", "--out", str(quiet)]) == 0
    assert json.loads(quiet.read_text())["busy"] == {"processes": 0}
    capsys.readouterr()
    for bad in (["--busy", "-1"], ["--busy", "1", "--busy-limit", "0"], ["--host", "--busy", "1"]):
        with pytest.raises(SystemExit):
            cli.main(["bench", "--preset", "tiny", "--device", "cpu", *bad])
        assert "--busy" in capsys.readouterr().err
