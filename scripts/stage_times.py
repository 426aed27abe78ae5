"""The stage-time table of docs/pipeline.md, made from what the runs measured (reports/<profile>/timings.json).

`python -m nifi_utils.pipeline.run <stage>` (so every `dvc repro`) records each stage's wall time, with the machine's
load at its start and end, into reports/<profile>/timings.json. This prints them as a markdown table and, with
`--write`, writes it into docs/pipeline.md between the `<!-- stage-times:begin -->` / `<!-- stage-times:end -->` lines.

    python scripts/stage_times.py [--profile cpu] [--write]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["scenes", "synthesis", "prior", "distill", "refine", "benchmark", "plots", "viewer"]
PAGE = ROOT / "docs" / "pipeline.md"
BEGIN, END = "<!-- stage-times:begin -->", "<!-- stage-times:end -->"


def table(timings: dict) -> str:
    st = timings.get("stages", {})
    if not st:
        raise SystemExit("error: no stage times recorded: run the pipeline (dvc repro) first")
    names = sorted(st, key=lambda s: (ORDER.index(s) if s in ORDER else len(ORDER), s))
    rows = ["| stage | wall time | finished (UTC) | load at start / end (cores) |", "|---|---|---|---|"]
    for s in names:
        e = st[s]
        loads = [e.get("load_1min_start"), e.get("load_1min_end")]
        if None in loads:  # an entry made from a log line (no load recorded)
            load = f"n/a ({e['cores']}){' ' + e['note'] if e.get('note') else ''}"
        else:
            busy = " **busy**" if max(loads) > 1.25 * e["cores"] else ""
            load = f"{loads[0]:.1f} / {loads[1]:.1f} ({e['cores']}){busy}"
        rows.append(f"| `{s}` | {e['seconds'] / 60:.1f} min ({e['seconds']:.0f} s) | {e['finished'][:16].replace('T', ' ')} | {load} |")
    total = sum(st[s]["seconds"] for s in names if s != "prior")
    rows.append(f"| all but the frozen `prior` | **{total / 60:.1f} min** | | |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--write", "--readme", dest="write", action="store_true",
                    help="write the table into docs/pipeline.md between the markers (--readme: its old name)")
    args = ap.parse_args(argv)
    path = ROOT / "reports" / args.profile / "timings.json"
    if not path.is_file():
        print(f"error: {path.relative_to(ROOT)} missing: run the pipeline (dvc repro) first", file=sys.stderr)
        return 2
    text = table(json.loads(path.read_text()))
    print(text)
    if args.write:
        s = PAGE.read_text()
        if BEGIN not in s or END not in s:
            print(f"error: {PAGE.relative_to(ROOT)} lacks the {BEGIN} / {END} lines", file=sys.stderr)
            return 2
        a, b = s.index(BEGIN) + len(BEGIN), s.index(END)
        PAGE.write_text(s[:a] + "\n" + text + "\n" + s[b:])
        print(f"-> {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
