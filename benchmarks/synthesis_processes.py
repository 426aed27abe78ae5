"""Issue 24: does the synthesis stage on one process write what it writes on N ranks? File by file.

Compares two checkouts whose synthesis stage ran with different `synthesis.processes` (e.g. this one, the cpu
default of 2 ranks, and a clone where `dvc exp run -S synthesis.processes=1 synthesis` ran): every file of the
stage's outputs (bitstreams, pairs, renders) must be byte-identical; the per-scene JSON records and
`reports/<p>/synthesis.json` must hold the same values up to float32 rounding (relative 1e-6: one process with 2
threads and 2 ranks of 1 thread sum a loss or a metric in another order), wall times, the process count and
provenance aside.

    python benchmarks/synthesis_processes.py --a . --b ../exp24s [--profile cpu]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("bitstreams", "pairs", "renders", "records")
# keys (at any depth) that are not results: wall times, the process layout, versions; and any `*_s` (seconds)
VOLATILE = {"seconds", "processes", "provenance", "peak_rss_gb", "timings"}
REL = 1e-6


def files(root: Path) -> dict[str, Path]:
    return {f.relative_to(root).as_posix(): f for f in sorted(root.rglob("*")) if f.is_file()}


def compare_json(a, b, path: str, acc: dict) -> None:
    """Walk two JSON values: count the numbers, the exactly equal ones and the largest relative difference; list
    where they differ otherwise. An anchor that one run skipped (its external tool absent) is counted, not compared."""
    if isinstance(a, dict) and isinstance(b, dict):
        if "anchor" in a and (a.get("skipped") or b.get("skipped")):
            acc["anchors_skipped"] += 1
            return
        for k in sorted(set(a) | set(b)):
            if k in VOLATILE or k.endswith("_s"):
                continue
            if k not in a or k not in b:
                acc["mismatch"].append(f"{path}.{k}")
            else:
                compare_json(a[k], b[k], f"{path}.{k}", acc)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            compare_json(x, y, f"{path}[{i}]", acc)
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        acc["numbers"] += 1
        acc["exact"] += a == b
        rel = abs(a - b) / max(abs(a), abs(b), 1e-30)
        if rel > acc["max_rel"]:
            acc["max_rel"], acc["max_rel_at"] = rel, path
    elif a != b:
        acc["mismatch"].append(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=Path, default=ROOT, help="checkout of one run (default: this one)")
    ap.add_argument("--b", type=Path, required=True, help="checkout of the other run")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "synthesis_processes.json")
    args = ap.parse_args(argv)
    out = {"what": "issue 24: the synthesis stage's outputs of two runs with different synthesis.processes, file "
                   "by file: the bytes; JSON values number by number", "runs": {}, "folders": {}}
    reps, roots = {}, []
    for name, root in (("a", args.a.resolve()), ("b", args.b.resolve())):
        rep = root / "reports" / args.profile / "synthesis.json"
        if not rep.is_file():
            print(f"error: {rep} not found: run the synthesis stage in {root} first", file=sys.stderr)
            return 2
        reps[name], roots = json.loads(rep.read_text()), roots + [root]
        out["runs"][name] = {"root": str(root), "processes": reps[name].get("processes"),
                             "seconds": reps[name].get("seconds")}
    same = True
    acc = {"numbers": 0, "exact": 0, "max_rel": 0.0, "max_rel_at": None, "mismatch": [], "anchors_skipped": 0}
    for folder in FOLDERS:
        fa, fb = (files(r / "data" / args.profile / folder) for r in roots)
        differ, n_json = sorted(set(fa) ^ set(fb)), 0
        for k in sorted(set(fa) & set(fb)):
            if k.endswith(".json"):  # a record: its values are compared below
                n_json += 1
                compare_json(json.loads(fa[k].read_text()), json.loads(fb[k].read_text()), f"{folder}/{k}", acc)
            elif fa[k].read_bytes() != fb[k].read_bytes():
                differ.append(k)
        out["folders"][folder] = {"files": len(fa), "json_records": n_json, "bytes_differ": len(differ),
                                  "examples": differ[:10]}
        same &= not differ and len(fa) > 0
        print(f"{folder:10s} {len(fa):5d} files: {len(fa) - n_json - len(differ)} byte-identical, {len(differ)} "
              f"differ, {n_json} JSON records compared by value")
    if acc["anchors_skipped"]:  # the external formats' summary then differs by construction: not compared
        for r in reps.values():
            r.pop("anchors", None)
    compare_json(reps["a"], reps["b"], "synthesis.json", acc)
    acc["mismatch"] = acc["mismatch"][:20]
    out["json_values"] = {**acc, "relative_tolerance": REL,
                          "note": "records and synthesis.json without wall times, the process count and provenance; "
                                  "an anchor one run skipped (splat-transform absent there) is not compared, nor then synthesis.json's anchors summary"}
    out["identical"] = bool(same and not acc["mismatch"] and acc["max_rel"] <= REL)
    print(f"JSON: {acc['numbers']} numbers, {acc['exact']} exactly equal, largest relative difference "
          f"{acc['max_rel']:.1e} ({acc['max_rel_at']}), {len(acc['mismatch'])} other differences, "
          f"{acc['anchors_skipped']} skipped anchors -> identical: {out['identical']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if out["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
