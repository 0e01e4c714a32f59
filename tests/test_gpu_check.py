"""bench/gpu_check.sh, its summariser bench/gpu_summary.py, its kit bench/lease_kit.py and its pytest plugin
tests/gpu_check_plugin.py, without a GPU: the dry run of the one-call lease (steps, time budget, the kit checked,
a summary from fake logs) on a fake kit and on broken ones, the device test selection, the sanitizer's selection,
summaries of synthetic logs, the re-run plan, and the Triton cache the kit carries being hit from another checkout."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


gpu_summary = load("gpu_summary")
lease_kit = load("lease_kit")
LEASE = ["env", "setup", "backends", "tests", "sanitize-memcheck", "bench-many-small-float32", "bench-gpt2-float32",
         "bench-llama-7b-bfloat16"]


def fake_kit(kit: Path) -> Path:
    """A kit as prepare leaves it, with stand-in files: what the dry run checks (the manifest logic), not a build."""
    cache = kit / "triton-cache" / "KEYA"
    cache.mkdir(parents=True)
    (cache / "_scale_kernel.cubin").write_bytes(b"cubin")
    (cache / "_scale_kernel.json").write_text("{}")
    (kit / "triton-cache" / "KEYB").mkdir()
    (kit / "triton-cache" / "KEYB" / "__triton_launcher.cpython-312-x86_64-linux-gnu.so").write_bytes(b"so")
    (kit / "launches.json").write_text(json.dumps([{"kernel": "fusedclip.triton_kernels.scale:_scale_kernel"}]))
    files = {}
    for name in ("_C", "_host"):
        path = kit / f"{name}{lease_kit.DEVICE_EXT_SUFFIX}"
        path.write_bytes(name.encode() * 100)
        files[path.name] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": 200}
    pins = lease_kit.pins()
    manifest = {
        "schema": 1, "python": "3.12.1", "ext_suffix": lease_kit.DEVICE_EXT_SUFFIX, "torch": pins["torch"] + "+cu130",
        "torch_cuda": "13.0", "triton": pins["triton"], "triton_key_sha256": "0" * 64, "ptxas": "V12.8.93",
        "cache_env": {}, "cuda_arch_list": "9.0", "arch": 90,
        "sources": {part: lease_kit.source_hash(part) for part in lease_kit.SOURCES}, "files": files,
        "triton_cache": {"entries": ["KEYA", "KEYB"], "kernels": 1, "launchers": 1, "cuda_utils": False},
    }
    (kit / "manifest.json").write_text(json.dumps(manifest))
    return kit


def dry_run(tmp_path: Path, *args: str, kit: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    kit = kit if kit is not None else fake_kit(tmp_path / "kit")
    full_env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "KIT": str(kit), **env}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, env=full_env,
                          timeout=120)


def steps_of(stdout: str) -> list[str]:
    return re.findall(r"^== (\S+)", stdout, flags=re.M)


# ---- the dry run ------------------------------------------------------------------------------------------------


def test_dry_run_of_the_lease_prints_its_plan_and_writes_a_valid_summary(tmp_path):
    run = dry_run(tmp_path)  # no mode: the lease
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "dry run ok" in out and steps_of(out) == LEASE
    total, budget = map(int, re.search(r"add up to (\d+) s \(budget (\d+) s\)", out).groups())
    assert total <= budget == 480
    # Where the kit does not fit the device: a build after setup, and what no longer fits is skipped.
    fallback = re.search(r"if the kit does not fit the device: (.*) \((\d+) s\); skipped: (.*)", out)
    assert fallback.group(1).split()[:4] == ["env", "setup", "build", "backends"] and int(fallback.group(2)) <= 480
    assert "tests" in fallback.group(1).split() and "sanitize-memcheck" in fallback.group(3).split()
    assert "kit " in out and ": ok (Python 3.12.1" in out
    # the tests: only those that exercise a GPU, in parallel; memcheck over a short selection; three presets
    assert re.search(r"-m pytest -p gpu_check_plugin --gpu-check -n 8 --dist loadgroup ", out)
    assert out.count("compute-sanitizer --tool memcheck") == 1 and "--tool racecheck" not in out
    assert re.search(r"compute-sanitizer .* -m not\\ slow\\ and\\ not\\ profiler\\ and\\ not\\ compile -k ", out)
    for preset, dtype in (("many-small", "float32"), ("gpt2", "float32"), ("llama-7b", "bfloat16")):
        assert f"--preset {preset} --dtype {dtype} --device cuda" in out
    assert "FUSEDCLIP_SKIP_CUDA=1 FUSEDCLIP_SKIP_HOST_EXT=1" in out and "lease_kit.py setup" in out
    assert " -x " not in out and "--exitfirst" not in out  # a failure must not end the run
    assert re.search(r"timeout -s INT -k \d+ \d+ .*--step tests", out)
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert gpu_summary.validate(summary) == [] and summary["ok"]
    assert set(summary["stages"]) == {"setup", "backends", "tests", "sanitize-memcheck", "bench"}
    assert len(summary["stages"]["bench"]["records"]) == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json", "gpu_check_logs.tar.gz"]


def test_the_header_states_the_device_call_and_the_plan_in_minutes():
    header = SCRIPT.read_text().split("set -uo pipefail")[0]
    command = re.search(r"#   command:\s+(.+)", header).group(1).strip()
    carry = json.loads(re.search(r"#   carry:\s+(.+)", header).group(1))
    assert command == "bash bench/gpu_check.sh lease" and len(command) <= 2000
    assert carry == ["bench/kit"] and len(carry) <= 8
    assert int(re.search(r"#   timeout_s:\s+(\d+)", header).group(1)) <= 600
    for step in LEASE:
        assert re.search(rf"#   {re.escape(step)}\s+\d+ s\s+[\d.-]+ min", header), step
    readme = (ROOT / "README.md").read_text()
    assert "bash bench/gpu_check.sh lease" in readme and '["bench/kit"]' in readme


@pytest.mark.parametrize("breakage, message", [
    ("missing", "no kit"),
    ("torch", "the devices run torch"),
    ("python", "the devices run Python 3.12"),
    ("stale", "changed since the kit was made"),
    ("so", "differs from the one the manifest lists"),
    ("cache", "Triton cache entries the manifest lists are missing"),
])
def test_the_dry_run_refuses_a_kit_that_would_not_serve(tmp_path, breakage, message):
    kit = fake_kit(tmp_path / "kit")
    manifest = json.loads((kit / "manifest.json").read_text())
    if breakage == "missing":
        (kit / "manifest.json").unlink()
    elif breakage == "torch":
        manifest["torch"] = "2.10.0+cu130"
    elif breakage == "python":
        manifest["ext_suffix"] = ".cpython-311-x86_64-linux-gnu.so"
    elif breakage == "stale":
        manifest["sources"]["triton_kernels"] = "0" * 64
    elif breakage == "so":
        (kit / f"_C{lease_kit.DEVICE_EXT_SUFFIX}").write_bytes(b"rebuilt")
    elif breakage == "cache":
        shutil.rmtree(kit / "triton-cache" / "KEYA")
    if breakage != "missing":
        (kit / "manifest.json").write_text(json.dumps(manifest))
    run = dry_run(tmp_path, kit=kit)
    assert run.returncode == 1 and message in run.stderr, run.stdout + run.stderr
    assert "the kit is not ready for a lease" in run.stderr


def test_a_changed_test_suite_is_only_a_note(tmp_path):
    kit = fake_kit(tmp_path / "kit")
    manifest = json.loads((kit / "manifest.json").read_text())
    manifest["sources"]["launches"] = "0" * 64
    (kit / "manifest.json").write_text(json.dumps(manifest))
    run = dry_run(tmp_path, kit=kit)
    assert run.returncode == 0 and "note: tests/ changed" in run.stdout, run.stdout + run.stderr


def test_a_single_step_runs_after_env_and_setup(tmp_path):
    run = dry_run(tmp_path, "tests", PYTEST_ARGS='tests/test_plan.py -k "capture or cold"')
    assert run.returncode == 0, run.stdout + run.stderr
    assert steps_of(run.stdout) == ["env", "setup", "tests"]
    assert "tests/test_plan.py -k capture\\ or\\ cold" in run.stdout


def test_the_rerun_plan_runs_only_what_failed(tmp_path):
    logs = tmp_path / "logs"
    write_logs(logs)
    previous = tmp_path / "previous.json"
    previous.write_text(json.dumps(gpu_summary.summarize(logs)))
    run = dry_run(tmp_path, "rerun", str(previous))
    assert run.returncode == 0, run.stdout + run.stderr
    assert steps_of(run.stdout) == ["env", "setup", "backends", "tests", "sanitize-memcheck", "sanitize-racecheck",
                                    "bench-huge-float32", "bench-llama-7b-bfloat16"]
    # only the failing tests, by id; limits of the re-run call within its own budget
    ids = "tests/test_triton_backend.py::test_gpu_no_host_sync tests/test_adaptive.py::TestState::test_load"
    assert ids in run.stdout
    assert re.search(r"add up to \d+ s \(budget 240 s\)", run.stdout)
    fits = re.search(r"what fits: (.*) \((\d+) s\); skipped: (.*)", run.stdout)
    assert fits.group(1).split()[:4] == ["env", "setup", "backends", "tests"] and int(fits.group(2)) <= 240
    # the re-run's summary keeps the first call's record of the preset that passed there
    records = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["stages"]["bench"]["records"]
    assert [r["file"] for r in records] == ["gpt2-float32.json", "huge-float32.json", "llama-7b-bfloat16.json"]


def test_every_plan_fits_its_call(tmp_path):
    over = dry_run(tmp_path, T_TESTS="900")
    assert over.returncode == 1 and "over budget" in over.stderr


def test_unknown_arguments_are_refused(tmp_path):
    run = dry_run(tmp_path, "sanitize")
    assert run.returncode == 2 and "unknown step or mode 'sanitize'" in run.stderr


# ---- which tests run on the device ---------------------------------------------------------------------------------


def collect(*args: str) -> tuple[list[str], str]:
    """(the test ids pytest collects with the plugin loaded, its closing line)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "gpu_check_plugin", "--collect-only", "-q", *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    return [line for line in run.stdout.splitlines() if "::" in line], run.stdout.strip().splitlines()[-1]


def test_the_device_selection_is_the_gpu_tests_and_the_kernel_backends():
    chosen, closing = collect("--gpu-check")
    assert chosen and re.search(r"\(\d+ deselected\)", closing), closing
    for tid in chosen:  # no CPU-only test (CI's) and no torch-backend parametrisation
        assert "[torch-" not in tid and "test_cli.py" not in tid and "test_triton_compile.py" not in tid, tid
    assert any("test_conformance.py::test_total_norm_every_type_and_dtype[triton-" in t for t in chosen)
    assert any(t.startswith("tests/test_cuda_backend.py::") for t in chosen)  # gpu-marked: selected, skipped here
    assert any(t.startswith("tests/test_compile.py::test_gpu_fullgraph_first_call") for t in chosen)
    assert not any(t.startswith("tests/test_compile.py::test_fullgraph_first_call_plain_env") for t in chosen)
    whole_module, _ = collect("tests/test_triton_backend.py")  # its tests run on the GPU when there is one
    assert sorted(t for t in chosen if t.startswith("tests/test_triton_backend.py::")) == sorted(whole_module)


def test_tests_that_share_one_subprocess_go_to_one_xdist_worker():
    pytest.importorskip("xdist")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "gpu_check_plugin", "--gpu-check", "-n", "2",
                          "--dist", "loadgroup", "-v", "-p", "no:cacheprovider", "tests/test_compile.py", "-k",
                          "gpu_fullgraph_first_call or gpu_whole_training"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ran = re.findall(r"^\[(gw\d+)\] .* (?:SKIPPED|PASSED) (tests/\S+)", run.stdout, flags=re.M)
    shared = {worker for worker, tid in ran if "::test_gpu_fullgraph_first_call[" in tid}
    assert len(shared) == 1 and all(tid.endswith("@test_compile") for _, tid in ran if "fullgraph_first" in tid)
    assert any("::test_gpu_whole_training_step" in tid and "@" not in tid for _, tid in ran)


def test_the_sanitizer_selection_is_short_and_leaves_out_profiler_and_compile_tests():
    text = SCRIPT.read_text()
    markers = re.search(r'^SANITIZE_MARKERS="([^"]+)"', text, flags=re.M).group(1)
    files = re.search(r"^SANITIZE_TESTS=\(([^)]+)\)", text, flags=re.M).group(1).split()
    k = " ".join(re.search(r'^SANITIZE_K="([^"]+)"', text, flags=re.M | re.S).group(1).replace("\\\n", " ").split())
    assert files == ["tests/test_cuda_backend.py", "tests/test_triton_backend.py"]
    selected, _ = collect("--gpu-check", "-m", markers, "-k", k, *files)
    names = {t.split("::")[1].split("[")[0] for t in selected}
    assert 15 <= len(selected) <= 120, len(selected)
    for name in ("test_norms_match_reference", "test_clip_matches_reference", "test_clamp_matches_torch",
                 "test_scale_and_clamp_write_only_inside_each_view", "test_norms_of_misaligned_views_and_edge_sizes",
                 "test_scale_units_matches_reference", "test_clip_grad_norm_per_tensor"):
        assert name in names, name
    for name in ("test_gpu_launch_count_at_most_three", "test_launch_count", "test_torch_compile_fullgraph",
                 "test_gpu_torch_compile_fullgraph", "test_gpu_tensor_over_two_to_the_31_elements",
                 "test_tensor_over_2_pow_31_elements"):
        assert name not in names, name


# ---- the summariser on synthetic logs ----------------------------------------------------------------------------

FAILING_JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5" time="12.0">
<testcase classname="tests.test_plan" name="test_ok" time="0.1"/>
<testcase classname="tests.test_plan" name="test_also_ok[cuda]" time="0.1"/>
<testcase classname="tests.test_triton_backend" name="test_gpu_no_host_sync" time="0.2">
  <failure message="RuntimeError: called a synchronizing CUDA operation">trace</failure></testcase>
<testcase classname="tests.test_adaptive.TestState" name="test_load" time="0.0">
  <error message="fixture failed">trace</error></testcase>
<testcase classname="tests.test_cuda_backend" name="test_build_info" time="0.0">
  <skipped message="no">skip</skipped></testcase>
</testsuite></testsuites>
"""
PASSING_JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="0" skipped="0" tests="2" time="3.0">
<testcase classname="tests.test_cuda_backend" name="test_clamp_matches_torch" time="0.1"/>
<testcase classname="tests.test_cuda_backend" name="test_opcheck" time="0.1"/>
</testsuite></testsuites>
"""


ENVIRONMENT = {
    "device_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "driver": "580.1", "cuda_driver": "13.0",
    "cuda": "13.0", "torch": "2.11.0", "triton": "3.6.0", "python": "3.12.3", "kernel": "6.18.44-fc-v310-gpu",
    "sandbox": {"kind": "firecracker", "evidence": "kernel release 6.18.44-fc-v310-gpu"},
    "compute_sanitizer": {"path": "/usr/local/cuda/bin/compute-sanitizer", "version": "2025.3", "works": True,
                          "evidence": "exit 0: probe: the kernel ran | ========= ERROR SUMMARY: 0 errors"},
    "ncu": {"path": "/usr/local/cuda/bin/ncu", "version": "2025.3.1", "works": True, "evidence": "exit 0"},
    "git_commit": "abc", "date": "2026-11-21T00:00:00+00:00"}


def write_logs(logs: Path) -> None:
    (logs / "records").mkdir(parents=True)
    status = [
        ("env", 0, 1.5, 25), ("setup", 3, 9.0, 35), ("build", 0, 95.25, 150), ("backends", 1, 2.0, 20),
        ("tests", 1, 200.0, 260), ("sanitize-memcheck", 124, 90.0, 90), ("sanitize-racecheck", 1, 50.0, 90),
        ("sanitize-synccheck", 0, 40.0, 90), ("bench-gpt2-float32", 0, 20.0, 40), ("bench-huge-float32", 1, 5.0, 40),
        ("bench-llama-7b-bfloat16", -1, 0, 35),  # left out: past the budget
    ]
    (logs / "status.tsv").write_text("".join(f"{n}\t{rc}\t{s}\t{lim}\n" for n, rc, s, lim in status))
    (logs / "environment.json").write_text(json.dumps(ENVIRONMENT))
    (logs / "kit.json").write_text(json.dumps({
        "extension": "to build here: torch: kit 2.11.0+cu130, here 2.11.1+cu130",
        "mismatches": {"torch": {"kit": "2.11.0+cu130", "here": "2.11.1+cu130"}},
        "triton_cache": {"probe": "ran", "looked_up": 5, "hits": 5, "launchers_cached": 5, "misses": []}}))
    (logs / "backends.json").write_text(json.dumps({"available": ["triton", "torch"],
                                                    "reasons": {"cuda": "fusedclip._C is not built"}}))
    (logs / "tests.xml").write_text(FAILING_JUNIT)
    # memcheck timed out: a partial log, and pytest never wrote its XML
    (logs / "sanitize-memcheck.log").write_text("========= COMPUTE-SANITIZER\n....\n")
    # racecheck: two checked processes, 3 hazards in one; pytest itself passed, the sanitizer exit code did not
    (logs / "sanitize-racecheck.log").write_text(
        "========= Error: Race reported between Write access ...\n========= ERROR SUMMARY: 3 errors\n"
        "========= ERROR SUMMARY: 0 errors\n")
    (logs / "sanitize-racecheck.xml").write_text(PASSING_JUNIT)
    (logs / "sanitize-synccheck.log").write_text("========= ERROR SUMMARY: 0 errors\n")
    (logs / "sanitize-synccheck.xml").write_text(PASSING_JUNIT)
    record = {"preset": {"name": "gpt2", "dtype": "float32", "tensors": 148, "bytes": 497759232},
              "copy_bandwidth_GBps": 2900.0, "results": [
                  {"case": "clip", "impl": "torch foreach", "median_ms": 0.9, "GBps": 1600.0, "matched": True,
                   "pct_of_copy_bandwidth": 55.0, "speedup_vs_torch_foreach": 1.0, "total": 3.0}]}
    (logs / "records" / "gpt2-float32.json").write_text(json.dumps(record))


def test_summary_of_failing_and_timed_out_steps(tmp_path):
    logs = tmp_path / "logs"
    write_logs(logs)
    out = tmp_path / "gpu_check.json"
    assert gpu_summary.main(["summarize", "--logs", str(logs), "--out", str(out)]) == 0
    s = json.loads(out.read_text())
    assert gpu_summary.validate(s) == [] and gpu_summary.main(["validate", str(out)]) == 0
    assert s["ok"] is False
    assert s["environment"] == ENVIRONMENT
    assert s["backends"] == ["triton", "torch"] and s["triton_cache"] is None  # no kit given
    st = s["stages"]
    setup = st["setup"]  # the kit did not fit: a build followed, which has its own stage
    assert setup["ok"] is True and setup["extension"].startswith("to build here: torch")
    assert setup["mismatches"]["torch"]["here"] == "2.11.1+cu130" and setup["triton_cache"]["hits"] == 5
    assert st["build"] == {"ok": True, "seconds": 95.2, "rc": 0, "timed_out": False}
    assert st["backends"]["ok"] is False and st["backends"]["missing"] == ["cuda"]
    tests = st["tests"]
    assert (tests["ok"], tests["passed"], tests["failed"], tests["errors"], tests["skipped"]) == (False, 2, 1, 1, 1)
    assert tests["seconds"] == 200.0
    assert tests["failures"] == ["tests/test_triton_backend.py::test_gpu_no_host_sync",
                                 "tests/test_adaptive.py::TestState::test_load"]
    mem = st["sanitize-memcheck"]
    assert mem["ok"] is False and mem["timed_out"] is True and mem["sanitizer_errors"] is None
    assert mem["tests"]["passed"] is None
    race = st["sanitize-racecheck"]
    assert race["ok"] is False and race["sanitizer_errors"] == 3 and race["tests"]["passed"] == 2
    sync = st["sanitize-synccheck"]
    assert sync["ok"] is True and sync["sanitizer_errors"] == 0 and not sync["timed_out"]
    bench = st["bench"]
    assert bench["ok"] is False and bench["failed_steps"] == ["bench-huge-float32", "bench-llama-7b-bfloat16"]
    assert bench["records"] == [{
        "file": "gpt2-float32.json", "preset": "gpt2", "dtype": "float32", "tensors": 148, "bytes": 497759232,
        "copy_bandwidth_GBps": 2900.0, "results": [
            {"case": "clip", "impl": "torch foreach", "median_ms": 0.9, "GBps": 1600.0,
             "pct_of_copy_bandwidth": 55.0, "speedup_vs_torch_foreach": 1.0, "matched": True}]}]
    assert gpu_summary.gpu_name(json.loads((logs / "environment.json").read_text())) == "NVIDIA-H100-80GB-HBM3"


def test_info_json_gives_torchs_own_versions(tmp_path):
    logs = tmp_path / "logs"
    write_logs(logs)
    (logs / "info.json").write_text(json.dumps({"torch": "2.11.0+cu130", "torch_cuda": "13.0", "triton": "3.6.0"}))
    env = gpu_summary.summarize(logs)["environment"]
    assert (env["torch"], env["cuda"], env["triton"]) == ("2.11.0+cu130", "13.0", "3.6.0")


def test_a_refused_sanitizer_is_recorded_as_skipped_not_failed(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**ENVIRONMENT, "sandbox": {"kind": "gvisor", "evidence": "dmesg: [ 0.000000] Starting gVisor..."},
           "compute_sanitizer": {"path": "/x/compute-sanitizer", "version": "v", "works": False,
                                 "evidence": "exit 1: ========= Error: Device not supported"}}
    (logs / "environment.json").write_text(json.dumps(env))
    assert gpu_summary.main(["tool-usable", "compute-sanitizer", "--logs", str(logs)]) == 1
    why = gpu_summary.tool_refused("compute-sanitizer", logs)
    assert "(gVisor)" in why and "Device not supported" in why
    (logs / "status.tsv").write_text("sanitize-memcheck\t0\t0.1\t70\n")
    (logs / "sanitize-memcheck.skipped").write_text(why)
    stage = gpu_summary.summarize(logs)["stages"]["sanitize-memcheck"]
    assert stage["ok"] is True and stage["skipped"] == why and stage["sanitizer_errors"] is None
    (logs / "environment.json").write_text(json.dumps(ENVIRONMENT))  # works: the sanitizer runs
    assert gpu_summary.tool_refused("compute-sanitizer", logs) is None


def test_a_failing_sanitizer_probe_without_a_refusal_still_runs_the_sanitizer(tmp_path, monkeypatch):
    """env's probe failed without a refusal (here: the sanitizer crashed): not known, so the stage runs the
    sanitizer, and its own failure is recorded instead of a skip that reads ok."""
    info = gpu_summary._info_module()
    crash = "========= COMPUTE-SANITIZER\n========= Internal Sanitizer Error: unexpected\n"
    monkeypatch.setattr(info, "_run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, crash, ""))
    found = info.probe_tool("compute-sanitizer", "/x/compute-sanitizer")
    assert found["works"] is None and "Internal Sanitizer Error" in found["evidence"]
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**ENVIRONMENT, "compute_sanitizer": {"path": "/x/compute-sanitizer", "version": "v", **found}}
    (logs / "environment.json").write_text(json.dumps(env))
    assert gpu_summary.tool_refused("compute-sanitizer", logs) is None
    assert gpu_summary.main(["tool-usable", "compute-sanitizer", "--logs", str(logs)]) == 0
    (logs / "status.tsv").write_text("sanitize-memcheck\t1\t3.0\t70\n")  # the step ran the sanitizer: it failed
    (logs / "sanitize-memcheck.log").write_text(crash)
    stage = gpu_summary.summarize(logs)["stages"]["sanitize-memcheck"]
    assert stage["ok"] is False and "skipped" not in stage and stage["rc"] == 1


def test_the_cache_report_names_what_the_device_compiled_beyond_the_kit(tmp_path):
    kit = fake_kit(tmp_path / "kit")
    cache = kit / "triton-cache"
    for key, files in {"NEW1": ["_scale_kernel.json", "_scale_kernel.cubin"], "NEW2": ["triton_poi_fused_0.json"],
                       "NEW3": ["__triton_launcher.cpython-312-x86_64-linux-gnu.so"]}.items():
        (cache / key).mkdir()
        for f in files:
            (cache / key / f).write_text("x")
    logs = tmp_path / "logs"
    logs.mkdir()
    report = gpu_summary.summarize(logs, kit=kit)["triton_cache"]
    assert report == {"kit_entries": 2, "compiled_here": {"kernels_of_ours": ["_scale_kernel"],
                                                          "launchers_and_modules": 1, "other": 1}}


def test_rerun_plan_after_failures(tmp_path):
    logs = tmp_path / "logs"
    write_logs(logs)
    summary = gpu_summary.summarize(logs)
    assert gpu_summary.rerun_plan(summary) == (
        ["tests", "sanitize-memcheck", "sanitize-racecheck", "bench-huge-float32", "bench-llama-7b-bfloat16"],
        ["tests/test_triton_backend.py::test_gpu_no_host_sync", "tests/test_adaptive.py::TestState::test_load"])
    summary["stages"]["tests"].update(passed=None, failures=[])  # pytest killed: all of it again
    assert gpu_summary.rerun_plan(summary)[1] == []
    assert gpu_summary.rerun_plan({"stages": {"tests": {"ok": True}}}) == ([], [])


def test_a_passing_run_is_ok_and_a_killed_pytest_is_not(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "status.tsv").write_text("build\t0\t10\t170\ntests\t0\t10\t260\n")
    (logs / "tests.xml").write_text(PASSING_JUNIT)
    s = gpu_summary.summarize(logs)
    assert s["ok"] is True and s["stages"]["tests"]["passed"] == 2
    (logs / "tests.xml").write_text(PASSING_JUNIT[:120])  # cut off mid-write
    s = gpu_summary.summarize(logs)
    assert s["ok"] is False and s["stages"]["tests"]["passed"] is None and "note" in s["stages"]["tests"]


def test_summary_with_no_logs_at_all_is_still_written(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert gpu_summary.main(["summarize", "--logs", str(tmp_path / "missing"), "--out", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["ok"] is False and s["stages"] == {} and set(s["environment"]) == set(gpu_summary.ENV_KEYS)


def test_merge_keeps_the_stages_of_an_earlier_call(tmp_path):
    earlier = tmp_path / "a"
    write_logs(earlier)
    first = gpu_summary.summarize(earlier)
    later = tmp_path / "b"
    later.mkdir()
    (later / "status.tsv").write_text("sanitize-memcheck\t0\t60\t90\n")
    (later / "sanitize-memcheck.log").write_text("========= ERROR SUMMARY: 0 errors\n")
    (later / "sanitize-memcheck.xml").write_text(PASSING_JUNIT)
    merged = gpu_summary.summarize(later, merge=first)
    assert merged["stages"]["sanitize-memcheck"]["ok"] is True
    assert merged["stages"]["tests"] == first["stages"]["tests"]
    assert merged["environment"] == first["environment"] and merged["backends"] == first["backends"]


RERUN_JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="{failures}" skipped="0" tests="2" time="2.0">
<testcase classname="tests.test_triton_backend" name="test_gpu_no_host_sync" time="0.2"/>
<testcase classname="tests.test_adaptive.TestState" name="test_load" time="0.0">{load}</testcase>
</testsuite></testsuites>
"""


def lease_logs(logs: Path, status: dict[str, int], junit: str | None = None) -> None:
    """Logs of a call (fake_logs'), with the given steps' exit statuses: no record for a preset that failed."""
    gpu_summary.fake_logs(logs, list(status))
    (logs / "status.tsv").write_text("".join(f"{n}\t{rc}\t10.0\t35\n" for n, rc in status.items()))
    for name, rc in status.items():
        if name.startswith("bench-") and rc:
            (logs / "records" / f"{name[len('bench-'):]}.json").unlink()
    if junit is not None:
        (logs / "tests.xml").write_text(junit)


def test_a_rerun_keeps_the_first_calls_records_and_counts(tmp_path):
    """`gpu_check.sh rerun` after a lease whose tests and one preset failed: the merged summary keeps the first
    call's other records and test counts, and replaces only the outcomes of what ran again."""
    lease_logs(tmp_path / "a", {**dict.fromkeys(LEASE, 0), "tests": 1, "bench-gpt2-float32": 1}, FAILING_JUNIT)
    first = gpu_summary.summarize(tmp_path / "a")
    bench = first["stages"]["bench"]
    assert bench["failed_steps"] == ["bench-gpt2-float32"] and len(bench["records"]) == 2
    steps, ids = gpu_summary.rerun_plan(first)
    assert steps == ["tests", "bench-gpt2-float32"] and len(ids) == 2
    previous = tmp_path / "previous.json"
    previous.write_text(json.dumps(first))

    # call 2: the preset passes; of the two failing tests one passes, the other (an error before) fails
    again = RERUN_JUNIT.format(failures=1, load='<failure message="AssertionError">trace</failure>')
    lease_logs(tmp_path / "b", {"env": 0, "setup": 0, "backends": 0, "tests": 1, "bench-gpt2-float32": 0}, again)
    out = tmp_path / "merged.json"
    assert gpu_summary.main(["summarize", "--logs", str(tmp_path / "b"), "--out", str(out),
                             "--merge", str(previous)]) == 0
    merged = json.loads(out.read_text())
    assert gpu_summary.validate(merged) == []
    bench = merged["stages"]["bench"]
    assert [r["file"] for r in bench["records"]] == ["gpt2-float32.json", "llama-7b-bfloat16.json",
                                                     "many-small-float32.json"]
    assert bench["ok"] is True and bench["failed_steps"] == []
    assert bench["reruns"] == [{"ok": True, "seconds": 10.0, "timed_out": False, "failed_steps": [],
                                "steps": ["bench-gpt2-float32"]}]
    tests = merged["stages"]["tests"]
    assert (tests["passed"], tests["failed"], tests["errors"], tests["skipped"]) == (3, 1, 0, 1)
    assert tests["failures"] == ["tests/test_adaptive.py::TestState::test_load"] and tests["errored"] == []
    assert tests["ok"] is False and merged["ok"] is False
    assert [(r["passed"], r["failed"], r["rc"]) for r in tests["reruns"]] == [(1, 1, 1)]
    assert gpu_summary.rerun_plan(merged) == (["tests"], ["tests/test_adaptive.py::TestState::test_load"])

    # call 3: the last failing test passes; the counts add up to the first call's five tests
    lease_logs(tmp_path / "c", {"env": 0, "setup": 0, "backends": 0, "tests": 0},
               RERUN_JUNIT.replace('<testcase classname="tests.test_triton_backend" name="test_gpu_no_host_sync" '
                                   'time="0.2"/>\n', "").format(failures=0, load=""))
    final = gpu_summary.summarize(tmp_path / "c", merge=merged)
    tests = final["stages"]["tests"]
    assert (tests["passed"], tests["failed"], tests["errors"], tests["skipped"]) == (4, 0, 0, 1)
    assert tests["ok"] is True and tests["failures"] == [] and len(tests["reruns"]) == 2
    assert final["stages"]["bench"] == merged["stages"]["bench"] and final["ok"] is True

    # a re-run whose pytest was killed (no XML) keeps the counts it could not replace, and is not ok
    lease_logs(tmp_path / "d", {"env": 0, "setup": 0, "backends": 0, "tests": 124})
    (tmp_path / "d" / "tests.xml").unlink()
    killed = gpu_summary.summarize(tmp_path / "d", merge=merged)["stages"]["tests"]
    assert (killed["passed"], killed["failed"], killed["ok"]) == (3, 1, False)
    assert killed["reruns"][-1]["timed_out"] is True and "note" in killed["reruns"][-1]


def test_the_summariser_reads_and_runs_through_the_kits_and_infos_helpers():
    """One JSON reader (lease_kit's) and one command runner (info's): the environment's commit comes through
    info.first_line, run in the checkout."""
    assert gpu_summary.read_json.__module__ == "lease_kit" and not hasattr(gpu_summary, "_run")
    env = gpu_summary.environment(probe_tools=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert env["git_commit"] == (head or None) and set(gpu_summary.ENV_KEYS) <= set(env)


@pytest.mark.parametrize("classname, name, want", [
    ("tests.test_plan", "test_x[a-b]", "tests/test_plan.py::test_x[a-b]"),
    ("tests.test_adaptive.TestState", "test_y", "tests/test_adaptive.py::TestState::test_y"),
    ("", "test_z", "test_z"),
])
def test_junit_names_become_pytest_ids(classname, name, want):
    assert gpu_summary.test_id(classname, name) == want


def test_validate_names_what_is_missing():
    problems = gpu_summary.validate({"environment": {}, "backends": "cuda",
                                     "stages": {"tests": {"ok": True}, "build": {"ok": "yes"}}})
    assert "environment lacks 'device_name'" in problems and "backends is not a list" in problems
    assert "stage 'tests' lacks 'passed'" in problems and "stage 'build' has no boolean 'ok'" in problems


# ---- the kit's Triton cache -------------------------------------------------------------------------------------


def _lookup_from(checkout: Path, cache: Path, records: list[dict]) -> list[dict]:
    """triton_preflight.lookup in a fresh process that imports fusedclip from `checkout` (no interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(checkout), str(ROOT / "tests")]), TRITON_CACHE_DIR=str(cache))
    code = textwrap.dedent(f"""
        import json, sys
        import fusedclip, triton_preflight
        assert fusedclip.__file__.startswith({str(checkout)!r}), fusedclip.__file__
        print(json.dumps(triton_preflight.lookup(json.loads(sys.stdin.read()), arch=90)))
    """)
    run = subprocess.run([sys.executable, "-c", code], input=json.dumps(records), capture_output=True, text=True,
                         cwd=checkout, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_kits_triton_cache_is_hit_from_another_checkout_and_missed_after_a_kernel_change(tmp_path, monkeypatch):
    """What prepare does for the lease, on one variant: compile a recorded launch for sm_90 into a cache, with its
    launcher and Triton's cuda_utils; then a first launch's lookup in a fresh process, from a copy of the package at
    another path (the device's checkout), hits both; after an edit of the kernel's file it misses."""
    import torch
    import triton_preflight
    from fusedclip.backends import triton_backend

    if shutil.which("gcc") is None or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs gcc (the launchers) and the Triton interpreter (the recorded launch)")
    backend = triton_backend.TritonBackend(chunk_size=triton_backend.GPU_CHUNK, block=triton_backend.GPU_BLOCK)
    gen = torch.Generator().manual_seed(25)
    backend.scale_([torch.randn(37, generator=gen), torch.randn(1000, generator=gen)], torch.tensor(0.5))
    records = [r for r in triton_preflight.RECORDER.records.values() if r["kernel"].endswith(":_scale_kernel")
               and r["args"]["BLOCK"]["int"] == triton_backend.GPU_BLOCK][:1]
    assert records, "the launch was not recorded"
    cache = tmp_path / "triton-cache"
    stub = lease_kit._libcuda_stub(tmp_path)
    result = triton_preflight.collect(triton_preflight.compile_variants(records, 90, cache_dir=str(cache),
                                                                         libcuda_dir=str(stub)))
    assert not result["failures"] and len(result["variants"]) == 1
    lease_kit.relocate(cache, prune=True)  # as compile_kit leaves the kit's cache
    files = [f.name for d in cache.iterdir() for f in d.iterdir()]
    assert "_scale_kernel.cubin" in files
    assert any(f.startswith("__triton_launcher.") for f in files) and any(f.startswith("cuda_utils.") for f in files)
    if shutil.which("readelf"):  # linked against the driver, which the device resolves (a stub here)
        for so in cache.glob("*/*.so"):
            needed = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True).stdout
            assert "[libcuda.so.1]" in needed, (so.name, needed)

    other = tmp_path / "elsewhere"  # the same sources at another path, as the device's checkout
    shutil.copytree(ROOT / "python" / "fusedclip", other / "fusedclip",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(ROOT / "triton_kernels", other / "fusedclip" / "triton_kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert _lookup_from(other, cache, records) == [
        {"kernel": records[0]["kernel"], "cache_hit": True, "launcher_cached": True}]
    # The IR is pruned (a launch loads the cubin and metadata) and the group files name their files by absolute
    # path: a cache moved to another folder (the device's checkout) misses until relocated, as setup does there.
    assert not [f for f in files if f.endswith((".ptx", ".llir", ".ttgir", ".ttir", ".source"))]
    carried = shutil.copytree(cache, tmp_path / "carried")
    moved = cache.rename(tmp_path / "device-cache")  # nothing is left at the path the group files name
    assert _lookup_from(other, moved, records)[0]["cache_hit"] is False
    shutil.rmtree(moved)
    moved = carried.rename(moved)
    monkeypatch.chdir(tmp_path)  # a relative kit path (as setup gets it) still writes absolute paths
    assert lease_kit.relocate(Path(moved.name)) >= 1 and _lookup_from(other, moved, records)[0]["cache_hit"] is True
    scale = other / "fusedclip" / "triton_kernels" / "scale.py"
    scale.write_text("# an edit above the kernel moves it: another key\n" + scale.read_text())
    assert _lookup_from(other, moved, records)[0]["cache_hit"] is False
