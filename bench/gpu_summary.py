"""The summary of a bench/gpu_check.sh run: $OUT/gpu_check.json, from the logs the script leaves in $OUT/logs.

Standard library only (unit-tested on CPU machines, and it must summarise a run whose build failed). `env`
loads python/fusedclip/info.py by path (fusedclip is not installed yet then); `backends` imports fusedclip.

    gpu_summary.py summarize --logs DIR --out FILE [--merge FILE] [--kit DIR]   write the summary (never fails)
    gpu_summary.py validate FILE                                    check a summary against the schema
    gpu_summary.py env --out FILE                                   the device: GPU, driver, sandbox, tools tried
    gpu_summary.py backends --out FILE [--info FILE]                fusedclip's backends (and `fusedclip info`);
                                                                    exit 1 without cuda and triton
    gpu_summary.py tool-usable NAME --logs DIR                      exit 1 (and why) if env found NAME refused
    gpu_summary.py rerun-plan SUMMARY                               what `gpu_check.sh rerun` runs again
    gpu_summary.py gpu-name --logs DIR                              the device name as a path component
    gpu_summary.py fake-logs --logs DIR STEP...                     passing logs for the script's --dry-run

What the script leaves in the logs folder: status.tsv (one line per step: name, exit status, seconds, time
limit; 124/137 mean the step hit its `timeout`, -1 that it was skipped to stay within the budget), NAME.log per
step, tests.xml and sanitize-TOOL.xml (pytest's junit XML), sanitize-TOOL.skipped (why the sanitizer did not run),
records/*.json (benchmark records), environment.json, kit.json (setup's report), backends.json, info.json.

Summary schema: {"ok", "environment": {ENV_KEYS}, "backends": [...], "triton_cache": {...} or null,
"stages": {"setup": {"ok", "extension", ...}, "build": {"ok", "seconds"}, "tests": {"ok", "passed", "failed",
"errors", "skipped", "seconds", "failures": [test ids], "errored": [those of them that errored]},
"sanitize-memcheck": {"ok", "sanitizer_errors"} (and "skipped": why, where the device refused the sanitizer),
"sanitize-racecheck": {...}, "sanitize-synccheck": {...}, "bench": {"ok", "failed_steps", "records": [...]}}}; every
stage also has "rc", "timed_out" and "seconds" ("skipped" when the budget left it out), and only the stages that ran
are present (see --merge). After a re-run (--merge), "tests" and "bench" add up both calls: their counts, failures,
records and failed steps are the merged ones, "rc", "timed_out" and "seconds" the first call's, and "reruns" lists
each later call's own stage.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import re
import shlex
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
ENV_KEYS = ("device_name", "compute_capability", "driver", "cuda_driver", "cuda", "torch", "triton", "python",
            "kernel", "sandbox", "compute_sanitizer", "ncu", "git_commit", "date")
SANITIZERS = ("memcheck", "racecheck", "synccheck")
REQUIRED_BACKENDS = ("cuda", "triton")
TIMED_OUT = (124, 137)  # GNU timeout: the limit was hit (137: it had to SIGKILL after the grace period)
SKIPPED = -1  # the step was left out: its limit would have ended past the run's budget
NEEDS_BUILD = 3  # setup's exit status when the kit's extension does not fit the device (a build step follows)
ERROR_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+errors?")
RECORD_FIELDS = ("case", "impl", "median_ms", "GBps", "pct_of_copy_bandwidth", "speedup_vs_torch_foreach", "matched")
OUTCOMES = ("passed", "failed", "errors", "skipped")  # a test's outcome, and the counts of a pytest stage


def _load(name: str, path: Path):
    """A file of this repository loaded by path: fusedclip is not installed yet where the first steps run."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


read_json = _load("lease_kit", ROOT / "bench" / "lease_kit.py").read_json


# ---- reading the logs -------------------------------------------------------------------------------------------


def read_status(logs: Path) -> dict[str, dict[str, Any]]:
    """status.tsv: the last line of each step wins (a step re-run in the same folder)."""
    steps: dict[str, dict[str, Any]] = {}
    path = logs / "status.tsv"
    if not path.exists():
        return steps
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or not parts[1].lstrip("-").isdigit():
            continue
        rc = int(parts[1])
        steps[parts[0]] = {
            "rc": rc,
            "seconds": round(float(parts[2]), 1),
            "timed_out": rc in TIMED_OUT,
            "skipped": rc == SKIPPED,
            "limit_s": int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else None,
        }
    return steps


def test_id(classname: str, name: str) -> str:
    """pytest's node id from a junit testcase: tests.test_x.TestY + test_z -> tests/test_x.py::TestY::test_z."""
    parts = classname.split(".") if classname else []
    cls = []
    while parts and parts[-1][:1].isupper():
        cls.insert(0, parts.pop())
    path = "/".join(parts) + ".py" if parts else ""
    return "::".join([p for p in [path, *cls, name] if p])


def junit_cases(path: Path) -> Optional[list[tuple[str, str]]]:
    """(test id, outcome) per testcase of pytest's junit XML, the outcome one of OUTCOMES; None when it is missing
    or unreadable (a killed run)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    cases = []
    for case in root.iter("testcase"):
        tags = {child.tag for child in case}
        outcome = ("failed" if "failure" in tags else "errors" if "error" in tags else
                   "skipped" if "skipped" in tags else "passed")
        cases.append((test_id(case.get("classname", ""), case.get("name", "")), outcome))
    return cases


def read_junit(path: Path) -> Optional[dict[str, Any]]:
    """Counts, failing ids (failures and errors, in order) and the erroring ones among them; None when pytest's
    junit XML is missing or unreadable (a killed run)."""
    cases = junit_cases(path)
    if cases is None:
        return None
    counts = {k: sum(o == k for _, o in cases) for k in OUTCOMES}
    failures = [t for t, o in cases if o in ("failed", "errors")]
    return {**counts, "failures": failures, "errored": [t for t, o in cases if o == "errors"]}


def sanitizer_errors(log: Path) -> Optional[int]:
    """The sum of compute-sanitizer's "ERROR SUMMARY: N errors" lines (one per checked process); None when
    there is none (the sanitizer did not finish, or did not run)."""
    try:
        found = ERROR_SUMMARY.findall(log.read_text(errors="replace"))
    except OSError:
        return None
    return sum(int(n) for n in found) if found else None


# ---- stages -----------------------------------------------------------------------------------------------------


def _step_stage(step: dict[str, Any]) -> dict[str, Any]:
    stage = {"ok": step["rc"] == 0, "seconds": step["seconds"], "rc": step["rc"], "timed_out": step["timed_out"]}
    if step.get("skipped"):
        stage["skipped"] = "left out: its time limit would have ended past the run's budget"
    return stage


def _pytest_stage(step: dict[str, Any], junit: Path) -> dict[str, Any]:
    stage = _step_stage(step)
    counts = read_junit(junit)
    if counts is None:
        stage.update(dict.fromkeys(OUTCOMES), failures=[], errored=[])
        stage["note"] = f"no readable {junit.name}: pytest did not finish writing it"
        stage["ok"] = False
        return stage
    stage.update(counts)
    stage["ok"] = stage["ok"] and counts["failed"] == 0 and counts["errors"] == 0 and counts["passed"] > 0
    return stage


def _sanitizer_stage(step: dict[str, Any], logs: Path, tool: str) -> dict[str, Any]:
    name = f"sanitize-{tool}"
    try:
        refused = (logs / f"{name}.skipped").read_text().strip()
    except OSError:
        refused = None
    if refused and step["rc"] == 0:  # the device refuses compute-sanitizer (gVisor): recorded, not a failure
        return {**_step_stage(step), "sanitizer_errors": None, "skipped": refused}
    tests = _pytest_stage(step, logs / f"{name}.xml")
    errors = sanitizer_errors(logs / f"{name}.log")
    stage = _step_stage(step)
    stage["sanitizer_errors"] = errors
    stage["tests"] = {k: tests[k] for k in ("passed", "failed", "errors", "skipped", "failures")}
    stage["ok"] = tests["ok"] and errors == 0
    return stage


def _condensed_record(path: Path) -> dict[str, Any]:
    record = read_json(path)
    if not isinstance(record, dict):
        return {"file": path.name, "error": "unreadable record"}
    preset = record.get("preset") or {}
    return {
        "file": path.name,
        "preset": preset.get("name"),
        "dtype": preset.get("dtype"),
        "tensors": preset.get("tensors"),
        "bytes": preset.get("bytes"),
        "copy_bandwidth_GBps": record.get("copy_bandwidth_GBps"),
        "results": [{k: r.get(k) for k in RECORD_FIELDS} for r in record.get("results", [])],
    }


def _tests_stage(step: dict[str, Any], junit: Path, first: Any) -> dict[str, Any]:
    """The tests stage; after `first` (an earlier call's, with counts and not timed out) when only its failing
    tests ran again (`gpu_check.sh rerun`): first's counts with the outcomes of those ids replaced by the new ones
    (a test that passes now counts as passed), and this call's own stage appended to "reruns"."""
    now = _pytest_stage(step, junit)
    cases = junit_cases(junit) or []
    if not isinstance(first, dict) or first.get("passed") is None or first.get("timed_out"):
        return now
    errored = set(first.get("errored") or [])
    before = {t: "errors" if t in errored else "failed" for t in first.get("failures") or []}
    if any(t not in before for t, _ in cases):  # another selection than first's failures: it stands alone
        return now
    after = {**before, **dict(cases)}
    counts = {k: (first.get(k) or 0) - list(before.values()).count(k) + list(after.values()).count(k)
              for k in OUTCOMES}
    ok = (first.get("rc") in (0, 1) and now["rc"] == 0 and now["passed"] is not None  # pytest's 1: tests failed
          and counts["failed"] == counts["errors"] == 0 and counts["passed"] > 0)
    return {**first, **counts, "ok": ok,
            "failures": [t for t, o in after.items() if o in ("failed", "errors")],
            "errored": [t for t, o in after.items() if o == "errors"],
            "reruns": [*first.get("reruns", []), {k: v for k, v in now.items() if k != "errored"}]}


def _bench_stage(steps: dict[str, dict[str, Any]], logs: Path, first: Any) -> dict[str, Any]:
    """The presets' stage; after `first` (an earlier call's), its records and failed steps that did not run again
    are kept (a record of this call replaces first's of the same file) and this call's own stage goes to "reruns"."""
    names = sorted(n for n in steps if n.startswith("bench-"))
    records = [_condensed_record(p) for p in sorted((logs / "records").glob("*.json"))]
    have = {r["file"] for r in records}
    failed = [n for n in names if steps[n]["rc"] != 0 or f"{n[len('bench-'):]}.json" not in have]
    now = {
        "ok": not failed and bool(names),
        "seconds": round(sum(steps[n]["seconds"] for n in names), 1),
        "timed_out": any(steps[n]["timed_out"] for n in names),
        "failed_steps": failed,
        "records": records,
    }
    if not isinstance(first, dict):
        return now
    kept = {r.get("file"): r for r in first.get("records") or [] if isinstance(r, dict)}
    merged = sorted({**kept, **{r["file"]: r for r in records}}.values(), key=lambda r: str(r.get("file")))
    failed = [n for n in first.get("failed_steps") or [] if n not in names] + failed
    rerun = {k: v for k, v in now.items() if k != "records"}
    return {**first, "ok": not failed and bool(merged), "failed_steps": failed, "records": merged,
            "reruns": [*first.get("reruns", []), {**rerun, "steps": names}]}


def _backends_stage(step: dict[str, Any], found: Any) -> dict[str, Any]:
    stage = _step_stage(step)
    available = found.get("available", []) if isinstance(found, dict) else []
    stage["missing"] = [b for b in REQUIRED_BACKENDS if b not in available]
    stage["ok"] = stage["ok"] and not stage["missing"]
    if isinstance(found, dict) and found.get("reasons"):
        stage["reasons"] = found["reasons"]
    return stage


def _setup_stage(step: dict[str, Any], report: Any) -> dict[str, Any]:
    """setup's status and its report: whether the kit's extension was used, what differed, the cache lookups."""
    stage = _step_stage(step)
    stage["ok"] = step["rc"] in (0, NEEDS_BUILD)  # NEEDS_BUILD: the build step that follows has its own stage
    report = report if isinstance(report, dict) else {}
    stage["extension"] = report.get("extension", "no report (setup did not finish)")
    for key in ("mismatches", "triton_cache"):
        if report.get(key):
            stage[key] = report[key]
    return stage


def triton_cache_report(kit: Optional[Path]) -> Optional[dict[str, Any]]:
    """What was compiled on the device: the Triton cache's entries that the kit's manifest does not list (kernels
    of ours, launchers and Triton's own modules, and anything else such as inductor's); None without a kit."""
    manifest = read_json(kit / "manifest.json") if kit else None
    cache = kit / "triton-cache" if kit else None
    if not isinstance(manifest, dict) or cache is None or not cache.is_dir():
        return None
    listed = set((manifest.get("triton_cache") or {}).get("entries") or [])
    ours = {r["kernel"].split(":")[-1] for r in read_json(kit / "launches.json") or [] if isinstance(r, dict)}
    new_ours, launchers, other = [], 0, 0
    for entry in sorted(cache.iterdir()):
        if entry.name in listed or not entry.is_dir():
            continue
        names = [f.name for f in entry.iterdir()]
        if any(n.startswith(("__triton_launcher", "cuda_utils")) for n in names):
            launchers += 1
        elif any(n in names for n in (f"{k}.json" for k in ours)):
            new_ours.append(next(k for k in ours if f"{k}.json" in names))
        else:
            other += 1  # e.g. inductor's kernels (torch.compile tests)
    return {"kit_entries": len(listed), "compiled_here": {"kernels_of_ours": sorted(new_ours),
            "launchers_and_modules": launchers, "other": other}}


def summarize(logs: Path, merge: Optional[dict] = None, kit: Optional[Path] = None) -> dict[str, Any]:
    """The summary of the steps recorded in `logs`; stages of `merge` (an earlier summary) that did not run now
    are kept, and its tests and presets are merged with a re-run of their failures (see _tests_stage and
    _bench_stage), so a re-run call adds up with the first one to one summary."""
    steps = read_status(logs)
    previous = merge if isinstance(merge, dict) else {}
    env = read_json(logs / "environment.json")
    if not isinstance(env, dict):
        env = previous.get("environment") or {}
    info = read_json(logs / "info.json")
    if isinstance(info, dict):  # torch's own word (env reads versions from package metadata, torch not imported)
        said = {"torch": info.get("torch"), "cuda": info.get("torch_cuda"), "triton": info.get("triton")}
        env = {**env, **{k: v for k, v in said.items() if v is not None}}
    backends_found = read_json(logs / "backends.json")
    stages: dict[str, Any] = dict(previous.get("stages") or {})
    if "setup" in steps:
        stages["setup"] = _setup_stage(steps["setup"], read_json(logs / "kit.json"))
    if "build" in steps:
        stages["build"] = _step_stage(steps["build"])
    if "backends" in steps:
        stages["backends"] = _backends_stage(steps["backends"], backends_found)
    if "tests" in steps:
        stages["tests"] = _tests_stage(steps["tests"], logs / "tests.xml", stages.get("tests"))
    for tool in SANITIZERS:
        if f"sanitize-{tool}" in steps:
            stages[f"sanitize-{tool}"] = _sanitizer_stage(steps[f"sanitize-{tool}"], logs, tool)
    if any(n.startswith("bench-") for n in steps):
        stages["bench"] = _bench_stage(steps, logs, stages.get("bench"))
    if isinstance(backends_found, dict):
        backends = backends_found.get("available", [])
    else:
        backends = previous.get("backends", [])
    return {
        "ok": bool(stages) and all(s.get("ok") for s in stages.values()),
        "environment": {k: env.get(k) for k in ENV_KEYS},
        "backends": backends,
        "triton_cache": triton_cache_report(kit) or previous.get("triton_cache"),
        "stages": stages,
    }


def validate(summary: Any) -> list[str]:
    """Schema problems of a summary ([] when none)."""
    problems = []
    if not isinstance(summary, dict):
        return ["not a JSON object"]
    for key in ("environment", "backends", "stages"):
        if key not in summary:
            problems.append(f"missing {key!r}")
    env = summary.get("environment") or {}
    problems += [f"environment lacks {k!r}" for k in ENV_KEYS if k not in env]
    if not isinstance(summary.get("backends"), list):
        problems.append("backends is not a list")
    need = {
        "build": ("ok", "seconds"),
        "tests": ("ok", "passed", "failed", "errors", "skipped", "seconds", "failures"),
        "bench": ("ok", "records"),
        **{f"sanitize-{t}": ("ok", "sanitizer_errors") for t in SANITIZERS},
    }
    for name, stage in (summary.get("stages") or {}).items():
        if not isinstance(stage, dict) or not isinstance(stage.get("ok"), bool):
            problems.append(f"stage {name!r} has no boolean 'ok'")
            continue
        problems += [f"stage {name!r} lacks {k!r}" for k in need.get(name, ()) if k not in stage]
    return problems


# ---- on the device ----------------------------------------------------------------------------------------------


def _info_module():
    """python/fusedclip/info.py, loaded by path: its machine part needs neither fusedclip installed nor torch."""
    return _load("fusedclip_info", ROOT / "python" / "fusedclip" / "info.py")


def environment(probe_tools: bool = True) -> dict[str, Any]:
    """The device, before anything is installed: its GPU, driver, sandbox and tools (compute-sanitizer and ncu
    tried on a tiny kernel), and the versions of the packages there (from their metadata: nothing is imported)."""
    from importlib import metadata

    env: dict[str, Any] = dict.fromkeys(ENV_KEYS)
    env["python"] = sys.version.split()[0]
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for name in ("torch", "triton"):
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    info = _info_module()
    found = info.machine(probe_tools)
    gpus = found.pop("gpus")
    if gpus:
        env["device_name"], env["compute_capability"] = gpus[0]["name"], gpus[0]["compute_capability"]
        env["gpus"] = gpus
    env.update(found)
    env["git_commit"] = info.first_line(["git", "rev-parse", "HEAD"], cwd=ROOT)
    return env


def backends(info_out: Optional[Path] = None) -> dict[str, Any]:
    """fusedclip's backends here; with `info_out`, `python -m fusedclip info` there too (JSON) and on stdout."""
    import fusedclip
    from fusedclip import backends as fb

    if info_out is not None:
        from fusedclip.info import collect, format_info

        info = collect()
        info_out.write_text(json.dumps(info, indent=2) + "\n")
        print(format_info(info))
    return {"available": fusedclip.available_backends(), "reasons": fb.unavailable_reasons()}


def tool_refused(name: str, logs: Path) -> Optional[str]:
    """Why env found `name` (compute-sanitizer, ncu) unusable on this device; None when it works or was not tried."""
    env = read_json(logs / "environment.json")
    found = env.get(name.replace("-", "_")) if isinstance(env, dict) else None
    if not isinstance(found, dict) or found.get("works") is not False:
        return None
    sandbox = (env.get("sandbox") or {}).get("kind")
    return f"{name} does not work here{' (gVisor)' if sandbox == 'gvisor' else ''}: {found.get('evidence')}"


def rerun_plan(summary: Any) -> tuple[list[str], list[str]]:
    """(steps, test ids) that `gpu_check.sh rerun` runs again after `summary`: a tests stage that failed, timed out
    or was left out (only its failing tests when pytest wrote which, else all of it), a sanitizer, a benchmark."""
    stages = (summary.get("stages") or {}) if isinstance(summary, dict) else {}
    steps: list[str] = []
    ids: list[str] = []
    tests = stages.get("tests")
    if isinstance(tests, dict) and not tests.get("ok"):
        steps.append("tests")
        if tests.get("passed") is not None and not tests.get("timed_out"):
            ids = list(tests.get("failures") or [])
    for name, stage in stages.items():
        if name.startswith("sanitize-") and isinstance(stage, dict) and not stage.get("ok"):
            steps.append(name)
    bench = stages.get("bench")
    if isinstance(bench, dict):
        steps += list(bench.get("failed_steps") or [])
    return steps, ids


def gpu_name(env: Any) -> str:
    name = env.get("device_name") if isinstance(env, dict) else None
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") if name else "unknown-gpu"


# ---- the dry run's logs -----------------------------------------------------------------------------------------

_JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="0" skipped="1" tests="3" time="1.0">
<testcase classname="tests.test_plan" name="test_tables_match_the_old_construction[0]" time="0.1"/>
<testcase classname="tests.test_plan" name="test_a_plan_built_while_capturing[cpu]" time="0.1"/>
<testcase classname="tests.test_plan" name="test_gpu_only" time="0.0"><skipped message="dry run"/></testcase>
</testsuite></testsuites>
"""


def fake_logs(logs: Path, steps: list[str]) -> None:
    """Logs of a run in which every step passed: what the script's --dry-run summarises."""
    logs.mkdir(parents=True, exist_ok=True)
    env = dict.fromkeys(ENV_KEYS, "dry-run")
    env["device_name"] = "Dry Run GPU"
    (logs / "environment.json").write_text(json.dumps(env))
    (logs / "backends.json").write_text(json.dumps({"available": ["cuda", "triton", "torch"], "reasons": {}}))
    (logs / "kit.json").write_text(json.dumps({"extension": "carried: (dry run)", "mismatches": {}}))
    for name in steps:
        if name == "tests" or name.startswith("sanitize-"):
            (logs / f"{name}.xml").write_text(_JUNIT)
        if name.startswith("sanitize-"):
            (logs / f"{name}.log").write_text("========= ERROR SUMMARY: 0 errors\n")
        if name.startswith("bench-"):
            (logs / "records").mkdir(exist_ok=True)
            preset, dtype = name[len("bench-"):].rsplit("-", 1)
            record = {"preset": {"name": preset, "dtype": dtype, "tensors": 1, "bytes": 4},
                      "copy_bandwidth_GBps": 1.0, "results": [{"case": "clip", "impl": "dry run", "matched": True}]}
            (logs / "records" / f"{name[len('bench-'):]}.json").write_text(json.dumps(record))


# ---- command line -----------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summarize")
    p.add_argument("--logs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--merge", type=Path, help="an earlier summary whose other stages are kept")
    p.add_argument("--kit", type=Path, help="the lease kit (bench/kit): what the device compiled beyond it")
    p = sub.add_parser("validate")
    p.add_argument("file", type=Path)
    sub.add_parser("env").add_argument("--out", type=Path, required=True)
    p = sub.add_parser("backends")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--info", type=Path, help="also write `python -m fusedclip info --json` here")
    p = sub.add_parser("tool-usable")
    p.add_argument("name")
    p.add_argument("--logs", type=Path, required=True)
    sub.add_parser("rerun-plan").add_argument("summary", type=Path)
    sub.add_parser("gpu-name").add_argument("--logs", type=Path, required=True)
    p = sub.add_parser("fake-logs")
    p.add_argument("--logs", type=Path, required=True)
    p.add_argument("steps", nargs="*")
    args = parser.parse_args(argv)

    if args.command == "summarize":
        merge = read_json(args.merge) if args.merge else None
        summary = summarize(args.logs, merge, args.kit)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
        stages = ", ".join(f"{k}: {'ok' if v.get('ok') else 'FAILED'}" for k, v in summary["stages"].items())
        print(f"summary {args.out}: {stages or 'no stages ran'}")
        return 0
    if args.command == "validate":
        problems = validate(read_json(args.file))
        for problem in problems:
            print(f"{args.file}: {problem}", file=sys.stderr)
        return 1 if problems else 0
    if args.command == "env":
        env = environment()
        args.out.write_text(json.dumps(env, indent=2) + "\n")
        print(json.dumps(env, indent=2))
        return 0
    if args.command == "backends":
        found = backends(args.info)
        args.out.write_text(json.dumps(found, indent=2) + "\n")
        print(json.dumps(found, indent=2))
        missing = [b for b in REQUIRED_BACKENDS if b not in found["available"]]
        if missing:
            print(f"backends {missing} are not available: {found['reasons']}", file=sys.stderr)
            return 1
        return 0
    if args.command == "tool-usable":
        why = tool_refused(args.name, args.logs)
        print(why or f"{args.name}: not refused here")
        return 1 if why else 0
    if args.command == "rerun-plan":
        summary = read_json(args.summary)
        if not isinstance(summary, dict):
            print(f"{args.summary} is not a readable summary", file=sys.stderr)
            return 1
        steps, ids = rerun_plan(summary)
        print("steps: " + " ".join(steps))
        print("tests: " + " ".join(shlex.quote(i) for i in ids))
        return 0
    if args.command == "gpu-name":
        print(gpu_name(read_json(args.logs / "environment.json")))
        return 0
    fake_logs(args.logs, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
