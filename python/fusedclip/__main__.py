"""Command line: `python -m fusedclip bench ...` and `python -m fusedclip info`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    from .bench import DTYPES
    from .presets import PRESETS

    parser = argparse.ArgumentParser(prog="python -m fusedclip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    presets = ", ".join(f"{p.name} ({p.tensors} tensors, {p.params / 1e6:.0f}M)" for p in PRESETS.values())
    b = sub.add_parser(
        "bench", help="time stock torch against every available fusedclip backend", description=f"Presets: {presets}."
    )
    b.add_argument("--preset", choices=sorted(PRESETS), default="gpt2")
    b.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    b.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
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
    b.add_argument("--reps", type=int, default=10, help="timed calls per implementation (median reported)")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--cold", action="store_true", help="flush the L2 cache before every timed call (GPU)")
    b.add_argument(
        "--impl",
        action="append",
        default=None,
        help="only this implementation (repeatable), e.g. 'torch foreach' or 'fusedclip triton'",
    )
    b.add_argument("--out", default=None, help="write the JSON record here")
    b.add_argument("--json", action="store_true", help="print the JSON record instead of the table")

    t = sub.add_parser("table", help="a markdown table of benchmark records (for the README)")
    t.add_argument("records", nargs="+", help="JSON records written by bench --out")

    i = sub.add_parser("info", help="versions, devices, available backends and why others are missing")
    i.add_argument("--json", action="store_true")

    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import collect, format_info

        info = collect()
        print(json.dumps(info, indent=2) if args.json else format_info(info))
        return 0

    if args.command == "table":
        from .bench import markdown_table

        print(markdown_table([(path, json.loads(open(path).read())) for path in args.records]))
        return 0

    from .bench import format_table, run, write_record

    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    if args.max_norm is not None and not args.max_norm >= 0:
        parser.error("--max-norm must be >= 0")
    cases = ("clip", "noclip") if args.case == "both" else (args.case,)
    record = run(
        args.preset, args.dtype, args.device, args.max_norm, args.reps, args.warmup, cases, args.cold, args.impl
    )
    if args.out:
        write_record(record, args.out)
    print(json.dumps(record, indent=2) if args.json else format_table(record))
    if args.out:
        print(f"record written to {args.out}", file=sys.stderr)
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
