"""bench/gpu_check.sh and its summariser bench/gpu_summary.py, without a GPU: the dry run (stage selection, the
groups' time budgets, a summary written from fake logs), the summary of synthetic logs with failing and
timed-out steps, and the sanitizer's test selection (no profiler or torch.compile tests)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"

spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "bench" / "gpu_summary.py")
gpu_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_summary)  # type: ignore[union-attr]


def dry_run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    full_env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, env=full_env,
                          timeout=120)


def steps_of(stdout: str) -> list[str]:
    return re.findall(r"^== (\S+)", stdout, flags=re.M)


# ---- the dry run ------------------------------------------------------------------------------------------------


def test_dry_run_of_every_group_prints_the_commands_and_writes_a_valid_summary(tmp_path):
    run = dry_run(tmp_path, "A", "B", "C")
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "dry run ok" in out
    assert steps_of(out)[:5] == ["env", "build", "backends", "info", "tests"]
    assert out.count("compute-sanitizer --tool") == 3
    for tool in ("memcheck", "racecheck", "synccheck"):
        assert f"--tool {tool} " in out
    assert "FUSEDCLIP_FORCE_CUDA=1" in out and "--no-build-isolation" in out and "MAX_JOBS=" in out
    assert " -x " not in out and "--exitfirst" not in out  # a failure must not end the run
    assert re.search(r"timeout -s INT -k \d+ \d+ .*--step tests", out)
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert gpu_summary.validate(summary) == []
    assert set(summary["stages"]) == {"build", "backends", "info", "tests", "sanitize-memcheck",
                                      "sanitize-racecheck", "sanitize-synccheck", "bench"}
    assert len(summary["stages"]["bench"]["records"]) == 6 and summary["ok"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json", "gpu_check_logs.tar.gz"]


def test_each_group_selects_its_steps(tmp_path):
    runs = {g: dry_run(tmp_path / g, g) for g in "ABC"}
    for g, run in runs.items():
        assert run.returncode == 0, (g, run.stdout + run.stderr)
    a, b, c = (steps_of(runs[g].stdout) for g in "ABC")
    assert a == ["env", "build", "backends", "info", "tests"]
    assert b == ["env", "build", "backends", "sanitize-memcheck", "sanitize-racecheck", "sanitize-synccheck"]
    assert c[:3] == ["env", "build", "backends"] and len(c) == 9 and all(s.startswith("bench-") for s in c[3:])
    assert "== build (forced)" in runs["A"].stdout
    for g in "BC":  # reuse the extension when it loads or was carried in
        assert "== build (limit" in runs[g].stdout and "FUSEDCLIP_SKIP_CUDA=1" in runs[g].stdout
    assert "-m pytest" not in runs["C"].stdout and "compute-sanitizer" not in runs["A"].stdout


def test_a_single_step_runs_after_env_and_a_reused_build(tmp_path):
    run = dry_run(tmp_path, "tests", PYTEST_ARGS='tests/test_plan.py -k "capture or cold"')
    assert run.returncode == 0, run.stdout + run.stderr
    assert steps_of(run.stdout) == ["env", "build", "tests"]
    assert "tests/test_plan.py -k capture\\ or\\ cold" in run.stdout


def test_every_group_fits_one_device_call(tmp_path):
    run = dry_run(tmp_path, "A")
    budgets = re.findall(r"group ([ABC]): time limits .* add up to (\d+) s \(budget (\d+) s\)", run.stdout)
    assert len(budgets) == 3
    for _, total, budget in budgets:
        assert int(total) <= int(budget) <= 540
    over = dry_run(tmp_path / "over", "A", T_TESTS="900")
    assert over.returncode == 1 and "group A is over budget" in over.stderr


def test_unknown_arguments_are_refused(tmp_path):
    run = dry_run(tmp_path, "sanitize")
    assert run.returncode == 2 and "unknown group or step 'sanitize'" in run.stderr
    assert dry_run(tmp_path).returncode == 2


def test_the_sanitizer_selection_leaves_out_profiler_and_compile_tests():
    markers = re.search(r'^SANITIZE_MARKERS="([^"]+)"', SCRIPT.read_text(), flags=re.M).group(1)
    files = re.search(r"^SANITIZE_TESTS=\(([^)]+)\)", SCRIPT.read_text(), flags=re.M).group(1).split()
    assert files == ["tests/test_cuda_backend.py", "tests/test_triton_backend.py"]
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", markers, *files],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    selected = run.stdout
    assert "test_triton_backend.py::test_norms_every_type_and_dtype" in selected  # the kernel tests stay
    assert "test_cuda_backend.py::test_no_host_sync" in selected
    for name in ("test_gpu_launch_count_at_most_three", "test_launch_count", "test_torch_compile_fullgraph",
                 "test_torch_compile_fullgraph_cpu", "test_agc_torch_compile_fullgraph_cpu",
                 "test_gpu_torch_compile_fullgraph", "test_gpu_tensor_over_two_to_the_31_elements"):
        assert f"::{name}" not in selected.replace("[", " ").replace("\n", " \n"), name


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


def write_logs(logs: Path) -> None:
    (logs / "records").mkdir(parents=True)
    status = [
        ("env", 0, 1.5, 20), ("build", 0, 95.25, 170), ("backends", 1, 2.0, 20), ("tests", 1, 200.0, 260),
        ("sanitize-memcheck", 124, 90.0, 90), ("sanitize-racecheck", 1, 50.0, 90), ("sanitize-synccheck", 0, 40.0, 90),
        ("bench-gpt2-float32", 0, 20.0, 40), ("bench-huge-float32", 1, 5.0, 40),
    ]
    (logs / "status.tsv").write_text("".join(f"{n}\t{rc}\t{s}\t{lim}\n" for n, rc, s, lim in status))
    (logs / "environment.json").write_text(json.dumps({
        "device_name": "NVIDIA H100 80GB HBM3", "driver": "580.1", "cuda": "13.0", "torch": "2.11.0+cu130",
        "triton": "3.6.0", "python": "3.12.3", "git_commit": "abc", "date": "2026-11-21T00:00:00+00:00",
        "capability": "9.0"}))
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
    assert s["environment"] == {
        "device_name": "NVIDIA H100 80GB HBM3", "driver": "580.1", "cuda": "13.0", "torch": "2.11.0+cu130",
        "triton": "3.6.0", "python": "3.12.3", "git_commit": "abc", "date": "2026-11-21T00:00:00+00:00"}
    assert s["backends"] == ["triton", "torch"]
    st = s["stages"]
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
    assert bench["ok"] is False and bench["failed_steps"] == ["bench-huge-float32"]
    assert bench["records"] == [{
        "file": "gpt2-float32.json", "preset": "gpt2", "dtype": "float32", "tensors": 148, "bytes": 497759232,
        "copy_bandwidth_GBps": 2900.0, "results": [
            {"case": "clip", "impl": "torch foreach", "median_ms": 0.9, "GBps": 1600.0,
             "pct_of_copy_bandwidth": 55.0, "speedup_vs_torch_foreach": 1.0, "matched": True}]}]
    assert gpu_summary.gpu_name(json.loads((logs / "environment.json").read_text())) == "NVIDIA-H100-80GB-HBM3"


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
