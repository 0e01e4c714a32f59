"""The summary of a bench/gpu_check.sh run: $OUT/gpu_check.json, from the logs the script leaves in $OUT/logs.

Standard library only (unit-tested on CPU machines, and it must summarise a run whose build failed). The
`env` and `backends` subcommands import torch / fusedclip lazily, on the device.

    gpu_summary.py summarize --logs DIR --out FILE [--merge FILE]   write the summary (never fails on bad logs)
    gpu_summary.py validate FILE                                    check a summary against the schema
    gpu_summary.py env --out FILE                                   the device's environment (torch, driver...)
    gpu_summary.py backends --out FILE                              fusedclip's backends; exit 1 without cuda+triton
    gpu_summary.py gpu-name --logs DIR                              the device name as a path component
    gpu_summary.py fake-logs --logs DIR STEP...                     passing logs for the script's --dry-run

What the script leaves in the logs folder: status.tsv (one line per step: name, exit status, seconds, time
limit; 124/137 mean the step hit its `timeout`), NAME.log per step, tests.xml and sanitize-TOOL.xml (pytest's
junit XML), records/*.json (benchmark records), environment.json, backends.json.

Summary schema: {"ok", "environment": {device_name, driver, cuda, torch, triton, python, git_commit, date},
"backends": [...], "stages": {"build": {"ok", "seconds"}, "tests": {"ok", "passed", "failed", "errors",
"skipped", "seconds", "failures": [test ids]}, "sanitize-memcheck": {"ok", "sanitizer_errors"},
"sanitize-racecheck": {...}, "sanitize-synccheck": {...}, "bench": {"ok", "records": [...]}}}; every stage also
has "rc", "timed_out" and "seconds", and only the stages that ran are present (see --merge).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

ENV_KEYS = ("device_name", "driver", "cuda", "torch", "triton", "python", "git_commit", "date")
SANITIZERS = ("memcheck", "racecheck", "synccheck")
REQUIRED_BACKENDS = ("cuda", "triton")
TIMED_OUT = (124, 137)  # GNU timeout: the limit was hit (137: it had to SIGKILL after the grace period)
ERROR_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+errors?")
RECORD_FIELDS = ("case", "impl", "median_ms", "GBps", "pct_of_copy_bandwidth", "speedup_vs_torch_foreach", "matched")


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
            "limit_s": int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else None,
        }
    return steps


def read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_id(classname: str, name: str) -> str:
    """pytest's node id from a junit testcase: tests.test_x.TestY + test_z -> tests/test_x.py::TestY::test_z."""
    parts = classname.split(".") if classname else []
    cls = []
    while parts and parts[-1][:1].isupper():
        cls.insert(0, parts.pop())
    path = "/".join(parts) + ".py" if parts else ""
    return "::".join([p for p in [path, *cls, name] if p])


def read_junit(path: Path) -> Optional[dict[str, Any]]:
    """Counts and failing ids from pytest's junit XML; None when it is missing or unreadable (a killed run)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures: list[str] = []
    for case in root.iter("testcase"):
        tags = {child.tag for child in case}
        tid = test_id(case.get("classname", ""), case.get("name", ""))
        if "failure" in tags:
            counts["failed"] += 1
            failures.append(tid)
        elif "error" in tags:
            counts["errors"] += 1
            failures.append(tid)
        elif "skipped" in tags:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


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
    return {"ok": step["rc"] == 0, "seconds": step["seconds"], "rc": step["rc"], "timed_out": step["timed_out"]}


def _pytest_stage(step: dict[str, Any], junit: Path) -> dict[str, Any]:
    stage = _step_stage(step)
    counts = read_junit(junit)
    if counts is None:
        stage.update(passed=None, failed=None, errors=None, skipped=None, failures=[])
        stage["note"] = f"no readable {junit.name}: pytest did not finish writing it"
        stage["ok"] = False
        return stage
    stage.update(counts)
    stage["ok"] = stage["ok"] and counts["failed"] == 0 and counts["errors"] == 0 and counts["passed"] > 0
    return stage


def _sanitizer_stage(step: dict[str, Any], logs: Path, tool: str) -> dict[str, Any]:
    name = f"sanitize-{tool}"
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


def _bench_stage(steps: dict[str, dict[str, Any]], logs: Path) -> dict[str, Any]:
    names = sorted(n for n in steps if n.startswith("bench-"))
    records = [_condensed_record(p) for p in sorted((logs / "records").glob("*.json"))]
    have = {r["file"] for r in records}
    failed = [n for n in names if steps[n]["rc"] != 0 or f"{n[len('bench-'):]}.json" not in have]
    return {
        "ok": not failed and bool(names),
        "seconds": round(sum(steps[n]["seconds"] for n in names), 1),
        "timed_out": any(steps[n]["timed_out"] for n in names),
        "failed_steps": failed,
        "records": records,
    }


def _backends_stage(step: dict[str, Any], found: Any) -> dict[str, Any]:
    stage = _step_stage(step)
    available = found.get("available", []) if isinstance(found, dict) else []
    stage["missing"] = [b for b in REQUIRED_BACKENDS if b not in available]
    stage["ok"] = stage["ok"] and not stage["missing"]
    if isinstance(found, dict) and found.get("reasons"):
        stage["reasons"] = found["reasons"]
    return stage


def summarize(logs: Path, merge: Optional[dict] = None) -> dict[str, Any]:
    """The summary of the steps recorded in `logs`; stages of `merge` (an earlier summary) that did not run now
    are kept, so the three device calls of a lease add up to one summary."""
    steps = read_status(logs)
    previous = merge if isinstance(merge, dict) else {}
    env = read_json(logs / "environment.json")
    if not isinstance(env, dict):
        env = previous.get("environment") or {}
    backends_found = read_json(logs / "backends.json")
    stages: dict[str, Any] = dict(previous.get("stages") or {})
    if "build" in steps:
        stages["build"] = _step_stage(steps["build"])
    if "backends" in steps:
        stages["backends"] = _backends_stage(steps["backends"], backends_found)
    if "info" in steps:
        stages["info"] = _step_stage(steps["info"])
    if "tests" in steps:
        stages["tests"] = _pytest_stage(steps["tests"], logs / "tests.xml")
    for tool in SANITIZERS:
        if f"sanitize-{tool}" in steps:
            stages[f"sanitize-{tool}"] = _sanitizer_stage(steps[f"sanitize-{tool}"], logs, tool)
    if any(n.startswith("bench-") for n in steps):
        stages["bench"] = _bench_stage(steps, logs)
    if isinstance(backends_found, dict):
        backends = backends_found.get("available", [])
    else:
        backends = previous.get("backends", [])
    return {
        "ok": bool(stages) and all(s.get("ok") for s in stages.values()),
        "environment": {k: env.get(k) for k in ENV_KEYS},
        "backends": backends,
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


def environment() -> dict[str, Any]:
    env: dict[str, Any] = dict.fromkeys(ENV_KEYS)
    env["python"] = sys.version.split()[0]
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["device_name"] = torch.cuda.get_device_name()
            env["capability"] = "%d.%d" % torch.cuda.get_device_capability()
    except Exception as e:  # noqa: BLE001 - the environment is reported, whatever is broken
        env["torch"] = f"import failed: {e}"
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    env["git_commit"] = _run(["git", "rev-parse", "HEAD"])
    return env


def _run(cmd: list[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def backends() -> dict[str, Any]:
    import fusedclip
    from fusedclip import backends as fb

    return {"available": fusedclip.available_backends(), "reasons": fb.unavailable_reasons()}


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
    p = sub.add_parser("validate")
    p.add_argument("file", type=Path)
    for name in ("env", "backends"):
        sub.add_parser(name).add_argument("--out", type=Path, required=True)
    sub.add_parser("gpu-name").add_argument("--logs", type=Path, required=True)
    p = sub.add_parser("fake-logs")
    p.add_argument("--logs", type=Path, required=True)
    p.add_argument("steps", nargs="*")
    args = parser.parse_args(argv)

    if args.command == "summarize":
        merge = read_json(args.merge) if args.merge else None
        summary = summarize(args.logs, merge)
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
        found = backends()
        args.out.write_text(json.dumps(found, indent=2) + "\n")
        print(json.dumps(found, indent=2))
        missing = [b for b in REQUIRED_BACKENDS if b not in found["available"]]
        if missing:
            print(f"backends {missing} are not available: {found['reasons']}", file=sys.stderr)
            return 1
        return 0
    if args.command == "gpu-name":
        print(gpu_name(read_json(args.logs / "environment.json")))
        return 0
    fake_logs(args.logs, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
