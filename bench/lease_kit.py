"""The lease kit: what `bench/gpu_check.sh prepare` makes on this GPU-less machine for the GPU machines, carried to
them by the device call (`carry` names bench/kit), so that nothing compiles on the device unless the device differs
from what the kit was made for (design.md 6c).

    bench/kit/manifest.json        what was made, from which sources, for which Python / torch / triton
    bench/kit/_C<EXT>, _host<EXT>  fusedclip's extensions for sm_90, built against PyPI's torch 2.11.0+cu130 for the
                                   devices' Python 3.12 (EXT: .cpython-312-x86_64-linux-gnu.so)
    bench/kit/launches.json        the Triton launch specialisations the device tests make (recorded on CPU)
    bench/kit/triton-cache/        a Triton cache (TRITON_CACHE_DIR) holding those, compiled for sm_90, and their C
                                   launchers and Triton's cuda_utils (gcc-built Python modules)

What Triton 3.6's cache keys depend on (triton/compiler/compiler.py, runtime/cache.py, runtime/build.py, read for
this): a kernel's key hashes triton_key() (the triton version, the sources of triton.compiler / backends / language
and the bytes of libtriton.so, which differ between the cp311 and cp312 wheels: so the cache is made with Python 3.12),
the kernel's source and the constexpr globals it reads (not its path), the specialisation, the backend (ptxas
version, arch 90), the options (num_warps, FP fusion, libdevice contents, ...) and the cache-invalidating environment
variables that are set; a launcher's key hashes its C source and the platform (machine, OS). The manifest records
triton_key's hash, the ptxas version and those variables, and `setup` compares them with the device's. A kernel's
entry is found through its group file (__grp__NAME.json), which names its files by absolute path: paths that do
not exist are dropped, so a cache moved to another folder misses until `relocate` points them at the new place
(setup does, on the device). The kit keeps only what a launch loads (cubin and metadata): the IR is left out.

Subcommands (standard library only, except those run with the kit's venv or on the device, which import triton):
    compile --kit DIR --records FILE   (prepare, kit venv) compile the records into DIR/triton-cache, launchers too
    manifest --kit DIR --arch-list A   (prepare, kit venv) write DIR/manifest.json
    check --kit DIR                    (the dry run) the kit is complete, unchanged, of the pinned versions and
                                       made from the current sources; exit 1 with the problems named
    setup --kit DIR --report FILE      (on the device) compare the kit with this machine, put the extensions into
                                       python/fusedclip/, look a sample of the Triton cache up; exit 3 when the
                                       extension cannot be used here and must be built
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / ".ci" / "torch-2.11-cu130.txt"
DEVICE_EXT_SUFFIX = ".cpython-312-x86_64-linux-gnu.so"  # the GPU machines' Python 3.12 (KINDS.md)
ARCH = 90  # H100 and H200
EXTENSIONS = ("_C", "_host")
CACHE = "triton-cache"
MAX_KIT_BYTES = 40 << 20  # the device call carries at most 64 MiB, the working tree included
SOURCES = {  # what each part of the kit is made from: a change makes that part stale
    "extension": ("setup.py", "csrc"),
    "triton_kernels": ("triton_kernels",),
    "launches": ("tests",),  # which launches the device tests make: a change may leave some uncompiled (a JIT there)
    "kit": ("bench/lease_kit.py",),  # how the kit is made (the launchers' linking, say): a change remakes it all
}
SOURCE_SUFFIXES = (".py", ".cpp", ".cu", ".cuh", ".h", ".txt")


def source_hash(part: str, root: Path = ROOT) -> str:
    """sha256 over the files `part` is made from (path and content, in sorted order)."""
    h = hashlib.sha256()
    for name in SOURCES[part]:
        path = root / name
        files = sorted(p for p in path.rglob("*") if p.suffix in SOURCE_SUFFIXES) if path.is_dir() else [path]
        for f in files:
            if "__pycache__" in f.parts:
                continue
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pins(lock: Path = LOCK) -> dict[str, str]:
    """torch and triton as the lock pins them (the devices' versions)."""
    found = dict(re.findall(r"^(torch|triton)==(\S+)", lock.read_text(), flags=re.M))
    return {name: found.get(name, "?") for name in ("torch", "triton")}


def cache_entries(cache: Path) -> dict[str, list[str]]:
    """The Triton cache's entries: {key folder: its file names}."""
    if not cache.is_dir():
        return {}
    return {d.name: sorted(f.name for f in d.iterdir()) for d in sorted(cache.iterdir()) if d.is_dir()}


IR_SUFFIXES = (".source", ".ttir", ".ttgir", ".llir", ".ptx")  # what a launch never reads: not carried


def relocate(cache: Path, prune: bool = False) -> int:
    """Point every group file of the cache at the files in its own folder (where the cache is now), dropping the
    IR first with `prune`; returns how many groups were rewritten."""
    rewritten = 0
    for group in cache.resolve().glob("*/__grp__*.json"):  # absolute paths, as Triton writes them
        if prune:
            for f in group.parent.iterdir():
                if f.suffix in IR_SUFFIXES:
                    f.unlink()
        children = json.loads(group.read_text()).get("child_paths") or {}
        here = {name: str(group.parent / Path(path).name) for name, path in children.items()
                if (group.parent / Path(path).name).exists()}
        if here != children:
            group.write_text(json.dumps({"child_paths": here}))
            rewritten += 1
    return rewritten


def triton_facts() -> dict[str, Any]:
    """What this machine's triton puts into every cache key (see the module docstring)."""
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.nvidia.compiler import get_ptxas_version
    from triton.runtime.cache import triton_key

    return {
        "triton": triton.__version__,
        "triton_key_sha256": hashlib.sha256(triton_key().encode()).hexdigest(),
        "ptxas": get_ptxas_version(ARCH).strip().splitlines()[-1],
        "cache_env": dict(sorted(get_cache_invalidating_env_vars().items())),
    }


# ---- prepare ----------------------------------------------------------------------------------------------------


def _libcuda_stub(folder: Path) -> Path:
    """What Triton's launchers are linked with here (no driver on this machine): an empty libcuda.so.1 with the real
    library's soname, and a `cc` that links it even though it defines nothing they call (gcc's default
    --as-needed would drop it), so each launcher names libcuda.so.1 as needed and the device's driver resolves it."""
    src = folder / "stub.c"
    src.write_text("void fusedclip_libcuda_stub(void) {}\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(folder / "libcuda.so.1"),
                    str(src)], check=True)
    cc = folder / "cc"
    cc.write_text('#!/bin/sh\nexec gcc -Wl,--no-as-needed "$@"\n')
    cc.chmod(0o755)
    return folder


def compile_kit(kit: Path, records_path: Path, workers: int) -> dict[str, Any]:
    """Compile every recorded launch for sm_90 into kit/triton-cache (with launchers), in `workers` processes."""
    sys.path.insert(0, str(ROOT / "tests"))
    import triton_preflight

    records = json.loads(records_path.read_text())
    cache = kit / CACHE
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fusedclip-libcuda-stub-") as stub:
        _libcuda_stub(Path(stub))
        procs = [triton_preflight.compile_variants(records[i::workers], ARCH, cache_dir=str(cache), libcuda_dir=stub)
                 for i in range(workers)]
        results = [triton_preflight.collect(p) for p in procs]
    failures = [f for r in results for f in r["failures"]]
    variants = sum(len(r["variants"]) for r in results)
    relocate(cache, prune=True)
    for f in failures:
        print(f"FAILED to compile {f['kernel']} {f['args']} {f['options']}: {f['error'][-800:]}", file=sys.stderr)
    print(f"{len(records)} launch records: {variants} variants compiled for sm_{ARCH} into {cache}, "
          f"{len(failures)} failures")
    return {"records": len(records), "variants": variants, "failures": len(failures)}


def write_manifest(kit: Path, arch_list: str) -> dict[str, Any]:
    """kit/manifest.json, written by the kit's venv (its torch, triton and Python are what the kit is for)."""
    import torch

    files = {}
    for name in EXTENSIONS:
        path = kit / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
        if path.exists():
            files[path.name] = {"sha256": file_hash(path), "bytes": path.stat().st_size}
    entries = cache_entries(kit / CACHE)
    manifest = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git(["rev-parse", "HEAD"]),
        "python": platform.python_version(),
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        **triton_facts(),
        "cuda_arch_list": arch_list,
        "arch": ARCH,
        "sources": {part: source_hash(part) for part in SOURCES},
        "files": files,
        "triton_cache": {
            "entries": sorted(entries),
            "kernels": sum(any(f.endswith(".cubin") for f in fs) for fs in entries.values()),
            "launchers": sum(any(f.startswith("__triton_launcher") for f in fs) for fs in entries.values()),
            "cuda_utils": any(any(f.startswith("cuda_utils") for f in fs) for fs in entries.values()),
            "compiled": read_json(kit / "compiled.json"),  # compile's counts: records, variants, failures
        },
    }
    (kit / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _git(args: list[str]) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stale_parts(kit: Path) -> list[str]:
    """What prepare must make again for this interpreter (the kit's venv): "extension" (fusedclip._C and _host)
    and/or "triton" (the launch records and the cache; "triton-cache" when the cache must start empty)."""
    import torch

    manifest = read_json(kit / "manifest.json") or {}
    sources = manifest.get("sources") or {}
    ext = sysconfig.get_config_var("EXT_SUFFIX")
    files = manifest.get("files") or {}
    parts = []
    built = all((kit / f"{e}{ext}").exists() and file_hash(kit / f"{e}{ext}") == (files.get(f"{e}{ext}") or {})
                .get("sha256") for e in EXTENSIONS)
    if (not built or manifest.get("torch") != torch.__version__ or manifest.get("ext_suffix") != ext
            or sources.get("extension") != source_hash("extension")):
        parts.append("extension")
    facts = triton_facts()
    if any(manifest.get(k) != v for k, v in facts.items()) or any(
            sources.get(part) != source_hash(part) for part in ("triton_kernels", "kit")):
        parts.append("triton-cache")  # every entry is stale: start the cache afresh
    elif sources.get("launches") != source_hash("launches") or not (kit / "launches.json").exists() or any(
            e not in cache_entries(kit / CACHE) for e in (manifest.get("triton_cache") or {}).get("entries", [None])):
        parts.append("triton")
    return parts


# ---- check (the dry run) ------------------------------------------------------------------------------------------


def check(kit: Path, root: Path = ROOT, lock: Path = LOCK) -> list[str]:
    """What is wrong with the kit for a lease now ([] when nothing): missing or changed files, versions other than
    the pins or the devices' Python, sources changed since it was made, a cache without kernels, too big to carry."""
    manifest = read_json(kit / "manifest.json")
    if not isinstance(manifest, dict):
        return [f"no kit: {kit}/manifest.json is missing or unreadable (make it: bash bench/gpu_check.sh prepare)"]
    problems = []
    pinned = pins(lock)
    if str(manifest.get("torch", "")).split("+")[0] != pinned["torch"]:
        problems.append(f"made for torch {manifest.get('torch')}, the devices run torch {pinned['torch']} "
                        f"({lock.name})")
    if not str(manifest.get("torch_cuda", "")).startswith("13."):
        problems.append(f"made for torch with CUDA {manifest.get('torch_cuda')}, the devices' torch has CUDA 13")
    if manifest.get("triton") != pinned["triton"]:
        problems.append(f"made with triton {manifest.get('triton')}, the devices run triton {pinned['triton']}")
    if manifest.get("ext_suffix") != DEVICE_EXT_SUFFIX:
        problems.append(f"made for Python {manifest.get('python')} ({manifest.get('ext_suffix')}), the devices run "
                        f"Python 3.12 ({DEVICE_EXT_SUFFIX})")
    if "9.0" not in str(manifest.get("cuda_arch_list", "")).split(";"):
        problems.append(f"the extension is built for {manifest.get('cuda_arch_list')!r}, not for sm_90")
    for part, digest in (manifest.get("sources") or {}).items():
        if part in SOURCES and part != "launches" and digest != source_hash(part, root):
            problems.append(f"stale: {', '.join(SOURCES[part])} changed since the kit was made (prepare again)")
    for name in (f"{e}{DEVICE_EXT_SUFFIX}" for e in EXTENSIONS):
        want = (manifest.get("files") or {}).get(name)
        path = kit / name
        if want is None:
            problems.append(f"the manifest lists no {name}")
        elif not path.exists():
            problems.append(f"{name} is missing from {kit}")
        elif file_hash(path) != want.get("sha256"):
            problems.append(f"{name} differs from the one the manifest lists")
    listed = (manifest.get("triton_cache") or {}).get("entries") or []
    have = cache_entries(kit / CACHE)
    if not listed or not (manifest.get("triton_cache") or {}).get("kernels"):
        problems.append("the Triton cache holds no compiled kernel")
    missing = [e for e in listed if e not in have]
    if missing:
        problems.append(f"{len(missing)} Triton cache entries the manifest lists are missing from {kit}/{CACHE}")
    size = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    if size > MAX_KIT_BYTES:
        problems.append(f"the kit is {size / 2**20:.1f} MiB, more than {MAX_KIT_BYTES >> 20} MiB (64 MiB travel)")
    return problems


# ---- setup (on the device) --------------------------------------------------------------------------------------


def setup(kit: Path, report_path: Path, root: Path = ROOT, sample: int = 12) -> int:
    """Compare the kit with this machine, put the extensions in place when they fit, look the cache up. Exit 3:
    the extension must be built here; the report (JSON) says why."""
    import torch

    manifest = read_json(kit / "manifest.json") or {}
    here = {"python": platform.python_version(), "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
            "torch": torch.__version__, **triton_facts()}
    report: dict[str, Any] = {"kit": {k: manifest.get(k) for k in ("created", "git_commit", "python", "torch",
                                                                     "triton", "cuda_arch_list")},
                              "here": here, "mismatches": {}}
    for key in ("ext_suffix", "torch", "triton", "triton_key_sha256", "ptxas", "cache_env"):
        if manifest.get(key) != here[key]:
            report["mismatches"][key] = {"kit": manifest.get(key), "here": here[key]}
    stale = [part for part in SOURCES if (manifest.get("sources") or {}).get(part) != source_hash(part, root)]
    if stale:
        report["mismatches"]["sources"] = stale
    files = [kit / f"{e}{here['ext_suffix']}" for e in EXTENSIONS]
    fits = not ({"ext_suffix", "torch"} & set(report["mismatches"])) and "extension" not in stale
    if fits and all(f.exists() for f in files):
        for f in files:
            shutil.copy2(f, root / "python" / "fusedclip" / f.name)
        report["extension"] = "carried: " + ", ".join(f.name for f in files)
        rc = 0
    else:
        why = "; ".join(f"{k}: kit {v['kit']}, here {v['here']}" for k, v in report["mismatches"].items()
                        if isinstance(v, dict) and k in ("ext_suffix", "torch")) or \
            ("the extension's sources changed since the kit was made" if "extension" in stale
             else "the kit has no extension for this Python")
        report["extension"] = f"to build here: {why}"
        rc = 3
    relocated = relocate(kit / CACHE)  # the kit was made at another path: its group files name that one
    report["triton_cache"] = _probe_cache(kit, sample) if torch.cuda.is_available() else {
        "probe": "not run: no CUDA device"}
    report["triton_cache"]["groups_relocated"] = relocated
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return rc


def _probe_cache(kit: Path, sample: int) -> dict[str, Any]:
    """Look the first launch record of each kernel (up to `sample`) up in the kit's cache with the real driver."""
    records = read_json(kit / "launches.json") or []
    first: dict[str, dict] = {}
    for r in records:
        first.setdefault(r["kernel"], r)
    picked = (list(first.values()) + [r for r in records if r not in first.values()])[:sample]
    if Path(os.environ.get("TRITON_CACHE_DIR", "")).resolve() != (kit / CACHE).resolve():
        return {"probe": f"not run: TRITON_CACHE_DIR is {os.environ.get('TRITON_CACHE_DIR')}, not the kit's cache"}
    sys.path.insert(0, str(ROOT / "tests"))
    import triton_preflight

    try:
        found = triton_preflight.lookup(picked)
    except Exception as e:  # noqa: BLE001 - reported: the tests step will show what it means
        return {"probe": f"failed: {type(e).__name__}: {e}"}
    return {"probe": "ran", "looked_up": len(found), "hits": sum(bool(f["cache_hit"]) for f in found),
            "launchers_cached": sum(f["launcher_cached"] for f in found),
            "misses": sorted({f["kernel"].split(":")[-1] for f in found if not f["cache_hit"]})}


# ---- command line -----------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("compile", "manifest", "check", "setup", "stale", "relocate"):
        p = sub.add_parser(name)
        p.add_argument("--kit", type=Path, required=True)
        if name == "compile":
            p.add_argument("--records", type=Path, required=True)
            p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
        if name == "manifest":
            p.add_argument("--arch-list", required=True)
        if name == "setup":
            p.add_argument("--report", type=Path, required=True)
    args = parser.parse_args(argv)
    kit = args.kit
    if args.command == "compile":
        summary = compile_kit(kit, args.records, args.workers)
        (kit / "compiled.json").write_text(json.dumps(summary) + "\n")
        return 1 if summary["failures"] else 0
    if args.command == "manifest":
        manifest = write_manifest(kit, args.arch_list)
        print(json.dumps({k: manifest[k] for k in ("python", "torch", "triton", "cuda_arch_list", "files")}, indent=2))
        return 0
    if args.command == "relocate":
        print(f"{relocate(kit / CACHE)} group files now point into {kit / CACHE}")
        return 0
    if args.command == "stale":
        print(" ".join(stale_parts(kit)))
        return 0
    if args.command == "check":
        problems = check(kit)
        for p in problems:
            print(f"kit {kit}: {p}", file=sys.stderr)
        if not problems:
            m = read_json(kit / "manifest.json")
            tc = m["triton_cache"]
            print(f"kit {kit}: ok (Python {m['python']}, torch {m['torch']}, triton {m['triton']}, "
                  f"{', '.join(m['files'])}, {tc['kernels']} kernels and {tc['launchers']} launchers cached)")
            if m["sources"].get("launches") != source_hash("launches"):
                print(f"kit {kit}: note: tests/ changed since the kit was made: launches the device tests add now "
                      "compile there (prepare again to have them in the cache)")
        return 1 if problems else 0
    return setup(kit, args.report)


if __name__ == "__main__":
    sys.exit(main())
