"""The papermill runner, `python -m nifi_utils.pipeline.run <stage> [--profile P]`.

Reads the stage from dvc.yaml and its parameters from params.yaml (conf/ composed for another --profile),
creates the output folders (DVC deletes outs before running a stage), executes the jupytext py:percent notebook with
papermill (kernel python3, cwd = repository root, cell output logged, per-cell timeout) and
writes the executed notebook under reports/<profile>/executed/. A failing cell gives one line
naming the cell and the error, and exit status 1; a stage's `processes` beyond the GPUs (or cores) here, or
a `distill.batch` that does not split evenly over the ranks, one line and exit status 2 before any work.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from nifi_utils.core.common import REPO_ROOT, NifiError
from nifi_utils.core.launch import batch_share, check_processes, error_exit, nodes
from nifi_utils.core.outputs import check_out_dir, check_out_file
from nifi_utils.pipeline.params import PROFILES, stage_params, stage_spec


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p)


def prepare_outputs(outs: list[Path]) -> None:
    """Folders for directory outs, parent folders for file outs; first every out is checked to be writable
    (a file where a folder belongs, a parent that is a file, a folder that cannot be written: one NifiError)."""
    for o in outs:
        (check_out_file if o.suffix else check_out_dir)(o, flag="stage output")
    for o in outs:
        (o.parent if o.suffix else o).mkdir(parents=True, exist_ok=True)


def record_timing(profile: str, stage: str, seconds: float, load_start: float, load_end: float) -> Path:
    """Merge one stage's wall time into reports/<profile>/timings.json (committed, not a DVC output: every stage
    writes its own entry, so the stage times the docs quote are what the last runs measured)."""
    import datetime
    import json

    path = REPO_ROOT / "reports" / profile / "timings.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
            raise ValueError("not an object with a 'stages' object")
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        # a finished stage does not fail for its record, and the other stages' records are not lost: the damaged
        # file is kept aside, said in one line, and a new one started
        aside = path.with_name(f"timings.damaged-{int(time.time())}.json")
        path.replace(aside)
        print(f"[nifi run] {_rel(path)} was damaged ({type(e).__name__}); kept as {_rel(aside)}, started anew",
              file=sys.stderr, flush=True)
        data = {}
    data["what"] = ("wall seconds of each stage's last run through python -m nifi_utils.pipeline.run (papermill, kernel start "
                  "included); load averages over 1 min at its start and end: above the core count = a busy machine")
    data.setdefault("stages", {})[stage] = {
        "seconds": round(seconds, 1), "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cores": os.cpu_count(), "load_1min_start": round(load_start, 2), "load_1min_end": round(load_end, 2)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def run_stage(stage: str, profile: str | None = None, timeout: int = 3600, log_output: bool = True) -> Path:
    import jupytext
    import papermill as pm

    spec = stage_spec(stage, profile)
    params = stage_params(stage, profile)
    if "processes" in params:  # the stage launches itself on that many ranks: refuse before anything runs
        n = check_processes(params["processes"], f"{stage}.processes (profile {params['profile']})")
        if stage == "distill":  # `batch` is the global batch: every rank takes an equal share
            batch_share(params["batch"], n * nodes()["num_machines"], what=f"distill.batch (profile {params['profile']})")
    if not spec.notebook.is_file():
        raise NifiError(f"notebook {spec.notebook} not found")
    prepare_outputs(spec.outs)
    nb = jupytext.read(spec.notebook)
    if not any("parameters" in c.metadata.get("tags", []) for c in nb.cells):
        raise NifiError(f"{spec.notebook} has no cell tagged 'parameters'")
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["keep_output"] = True  # an executed notebook is a result: nbstripout must not strip it
    os.environ.setdefault("NIFI_QUIET", "1")  # the kernel inherits it: throttled progress bars
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / (spec.notebook.stem + ".ipynb")
        jupytext.write(nb, src)
        t0, load0 = time.time(), os.getloadavg()[0]
        print(f"[nifi run] {stage} (profile {params['profile']}): {_rel(spec.notebook)} -> "
              f"{_rel(spec.executed)}", file=sys.stderr, flush=True)
        try:
            pm.execute_notebook(
                str(src), str(spec.executed), parameters=params, kernel_name="python3", cwd=str(REPO_ROOT),
                log_output=log_output, progress_bar=False, execution_timeout=timeout, request_save_on_cell_execute=True,
            )
        except pm.PapermillExecutionError as e:
            raise NifiError(
                f"stage {stage} failed in cell {e.exec_count} ({e.ename}: {e.evalue}); "
                f"executed notebook: {_rel(spec.executed)}") from None
    seconds = time.time() - t0
    record_timing(params["profile"], stage, seconds, load0, os.getloadavg()[0])
    print(f"[nifi run] {stage} done in {seconds:.1f} s", file=sys.stderr, flush=True)
    return spec.executed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nifi_utils.pipeline.run", description=__doc__.splitlines()[0])
    ap.add_argument("stage", help="a stage of dvc.yaml, e.g. scenes")
    ap.add_argument("--profile", choices=PROFILES, help="another profile than params.yaml's (conf/ composed for it)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per cell (default 3600)")
    ap.add_argument("--quiet", action="store_true", help="do not echo cell output")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_stage(args.stage, args.profile, args.timeout, log_output=not args.quiet)
    except NifiError as e:
        return error_exit(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
