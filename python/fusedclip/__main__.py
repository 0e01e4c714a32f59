"""Command line: `python -m fusedclip bench ...` and `python -m fusedclip info`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    from .bench import BUSY_LIMIT_S, DTYPES, HOST_SIZES, BenchError
    from .presets import PRESETS

    parser = argparse.ArgumentParser(prog="python -m fusedclip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    presets = "; ".join(
        f"{p.name}: {p.description} ({p.tensors} tensors, {_params(p.params)})" for p in PRESETS.values()
    )
    b = sub.add_parser(
        "bench",
        help="time stock torch against every available fusedclip backend",
        description=f"Presets: {presets}.",
        formatter_class=_DefaultsShown,
    )
    b.add_argument("--preset", choices=list(PRESETS), default="gpt2", help="parameter set (see above)")
    b.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="gradient dtype")
    b.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available, else cpu)")
    b.add_argument(
        "--max-norm",
        type=float,
        default=None,
        help="fixed max_norm for every call (default: follow the norm down so every call clips)",
    )
    b.add_argument(
        "--case",
        choices=["clip", "noclip", "both"],
        default="both",
        help="clip: coefficient < 1 on every call; noclip: coefficient 1",
    )
    b.add_argument(
        "--reps", type=int, default=None,
        help="timed calls per implementation, median reported (default: 10); with --host, 30 to 300 by tensor count "
        "unless given",
    )
    b.add_argument("--warmup", type=int, default=2, help="untimed calls per implementation before the timed ones")
    b.add_argument("--cold", action="store_true", help="flush the L2 cache before every timed call (GPU only)")
    b.add_argument(
        "--impl",
        action="append",
        default=None,
        help="only this implementation (repeatable), e.g. 'torch foreach' or 'fusedclip torch' (default: all that "
        "run here; the Triton interpreter only when named)",
    )
    b.add_argument(
        "--busy", type=int, default=0, metavar="N",
        help="time the comparison while N other processes spin on the CPU (contention, as data-loading workers or a "
        "second job make it); they are ended when the timing ends",
    )
    b.add_argument(
        "--busy-limit", type=float, default=BUSY_LIMIT_S, metavar="SECONDS",
        help="hard deadline of each busy process (it ends by itself then, whatever the benchmark does)",
    )
    b.add_argument("--out", default=None, help="write the JSON record here")
    b.add_argument("--json", action="store_true", help="print the JSON record instead of the table")
    h = b.add_argument_group(
        "host overhead (--host)",
        "Host CPU time per call of every entry point, stock torch in the same run, on many tiny tensors. On CPU the "
        "Triton kernels' launches are no-ops (what remains is fusedclip's host work); on a GPU they are real. "
        "--preset, --dtype, --case, --max-norm and --cold do not apply; --impl takes 'fusedclip <backend>'.",
    )
    h.add_argument("--host", action="store_true", help="measure host overhead instead of the clip itself")
    h.add_argument(
        "--tensors", default=",".join(map(str, HOST_SIZES)), help="tensor counts, comma-separated",
    )
    h.add_argument("--numel", type=int, default=1, help="elements per tensor")
    h.add_argument(
        "--moe", action="store_true",
        help="instead: a 5,000-tensor mixture-of-experts layout (DTensor gradients on a dense and an expert-parallel "
        "mesh) on 4 gloo ranks, fusedclip against torchtitan's clip_grad_norm_ (needs torchtitan)",
    )
    h.add_argument(
        "--mode", choices=["kept", "fresh", "moved", "all"], default="all",
        help="kept: gradients stay in place; fresh: new .grad tensors before every call (set_to_none), at the old "
        "addresses as a caching allocator gives them; moved: new gradients at new addresses",
    )

    t = sub.add_parser("table", help="a markdown table of benchmark records (for the README)")
    t.add_argument("records", nargs="+", help="JSON records written by bench --out")
    t.add_argument("--tensors", default=None, help="host records: only these tensor counts, comma-separated")

    i = sub.add_parser("info", help="versions, devices, available backends and why others are missing")
    i.add_argument("--json", action="store_true")
    i.add_argument(
        "--probe-tools", action="store_true",
        help="also try compute-sanitizer and ncu on a tiny kernel (seconds; needs a GPU)",
    )

    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    except BenchError as e:
        print(f"python -m fusedclip {args.command}: error: {e}", file=sys.stderr)
        return 2


def _emit(record: dict, args: argparse.Namespace, table) -> int:
    """Write the record (--out), print it (--json) or its table."""
    from .bench import BenchError, write_record

    if args.out:
        try:
            write_record(record, args.out)
        except OSError as e:
            raise BenchError(f"cannot write the record to {args.out}: {e}") from None
    print(json.dumps(record, indent=2) if args.json else table(record))
    if args.out:
        print(f"record written to {args.out}", file=sys.stderr)
    return 0


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Every default shown, except where the help text already says it in words (None, flags)."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B params" if n >= 1e9 else f"{n / 1e6:.1f}M params"


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .backends import BACKEND_NAMES
    from .bench import HOST_MODES, BenchError

    if args.command == "info":
        from .info import collect, format_info

        info = collect(args.probe_tools)
        print(json.dumps(info, indent=2) if args.json else format_info(info))
        return 0

    if args.command == "table":
        from .bench import markdown_host_table, markdown_table

        records = []
        for path in args.records:
            try:
                records.append((path, json.loads(open(path).read())))
            except (OSError, ValueError) as e:
                raise BenchError(f"cannot read the record {path}: {e}") from None
        host = [r for r in records if r[1].get("kind") == "host"]
        clip = [r for r in records if r[1].get("kind") != "host"]
        tables = [markdown_table(clip)] if clip else []
        if host:
            sizes = [int(n) for n in args.tensors.split(",")] if args.tensors else None
            tables.append(markdown_host_table(host, sizes))
        print("\n\n".join(tables))
        return 0

    from .bench import format_host_table, format_moe_host_table, format_table, run, run_host, run_host_moe

    if (args.reps is not None and args.reps < 1) or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    if args.host:
        if args.busy:
            parser.error("--busy applies to the clip comparison, not to --host")
        try:
            sizes = tuple(int(x) for x in args.tensors.split(","))
        except ValueError:
            parser.error(f"--tensors must be comma-separated counts, got {args.tensors!r}")
        if not sizes or min(sizes) < 1 or args.numel < 1:
            parser.error("--tensors and --numel must be >= 1")
        only = None
        if args.impl:
            only = [name.removeprefix("fusedclip ").strip() for name in args.impl]
            unknown = [n for n in only if n not in BACKEND_NAMES]
            if unknown:
                raise BenchError(f"--impl {unknown[0]!r}: with --host, name a backend as 'fusedclip <backend>'")
        if args.moe:
            return _emit(run_host_moe(args.reps, args.warmup, only), args, format_moe_host_table)
        modes = HOST_MODES if args.mode == "all" else (args.mode,)
        record = run_host(sizes, modes, args.device, args.reps, args.warmup, args.numel, only)
        return _emit(record, args, format_host_table)
    if args.max_norm is not None and not args.max_norm >= 0:
        parser.error("--max-norm must be >= 0")
    if args.busy < 0 or not args.busy_limit > 0:
        parser.error("--busy must be >= 0 and --busy-limit > 0")
    cases = ("clip", "noclip") if args.case == "both" else (args.case,)
    reps = args.reps if args.reps is not None else 10
    record = run(
        args.preset, args.dtype, args.device, args.max_norm, reps, args.warmup, cases, args.cold, args.impl,
        busy=args.busy, busy_limit=args.busy_limit,
    )
    _emit(record, args, format_table)
    for r in record["results"]:
        if not r["matched"] and not r["impl"].startswith("fusedclip"):
            print(
                f"note: stock {r['impl']} is off the float64 reference by {r['total_rel_err']:.1e} (total) "
                f"in the {r['case']} case",
                file=sys.stderr,
            )
    bad = sorted({r["impl"] for r in record["results"] if not r["matched"] and r["impl"].startswith("fusedclip")})
    if bad:
        print(f"MISMATCH against the float64 reference: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
