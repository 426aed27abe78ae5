"""Where each pipeline stage's seconds go: a sampling profile of `dvc repro`, summarised per stage.

    python benchmarks/stage_profile.py record --out /tmp/prof/raw.txt -- dvc repro -f scenes
    python benchmarks/stage_profile.py summarize /tmp/prof/raw*.txt --out benchmarks/results/stage_profile.json

`record` runs the command under py-spy (a sampling profiler: a separate process reads the Python stacks of the
command and of every process it starts, `--subprocesses`; the profiled code runs unmodified) at 20 samples/s,
idle samples included so that waiting shows. `summarize` attributes every sample to the stage whose runner
(`python -m nifi_utils.pipeline.run <stage>`) started the process, keeps the main thread of the stage's notebook kernel
and of the worker processes under it (scene workers, accelerate ranks, variant workers), and sorts it twice:
- `operations`: what the CPU was doing (rasterizer forward, autograd backward, restorer forward, metric networks,
  entropy coding, BM3D, bootstrap, PNG I/O, imports, waiting on workers or subprocesses...);
- `phases`: which step of the stage it belonged to (the notebook's pruning, fine-tuning, encoding, anchors,
  evaluation...).
Each is the first rule in the list below whose pattern occurs in the sample's stack. Seconds are process-seconds
(samples / rate): with two worker processes a stage's process-seconds are about twice its wall seconds, which
come from `reports/<profile>/timings.json`. py-spy is a dev tool (`pip install py-spy`), not a pipeline
dependency.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

RATE = 20
STAGE_RE = re.compile(r'nifi_utils\.run (\w+)')
WAIT_LEAVES = ("Condition.wait", "EpollSelector.select", "select (", "_wait_for_tstate_lock", "poll (", "_recv (",
               "Connection._recv", "Popen.wait", "Popen._wait", "_try_wait", "Popen.communicate", "sleep (",
               "Event.wait", "wait (threading", "_communicate", "_invoke_run")  # _invoke_run: torchrun's agent polls
# (name, patterns): the first rule with a pattern in the stack names the sample
OPERATIONS = [
    ("imports and kernel start-up", ("_find_and_load",)),
    ("BM3D baseline", ("bm3d",)),
    ("bootstrap intervals", ("nifi_utils/measure/stats.py",)),
    ("splat-transform and general compressors (anchors)", ("codec_anchors.py",)),
    ("entropy coding (encode / decode)", ("nifi_utils/codec/container.py", "codec_v1.py", "codec_common.py", "constriction")),
    ("metric networks (ST-LPIPS / LPIPS)", ("stlpips", "lpips")),
    ("other metrics (SSIM, PSNR, periodic)", ("nifi_utils/measure/metrics.py", "torchmetrics")),
    ("autograd backward", ("_engine_run_backward", "backward (torch/_tensor.py")),
    ("rasterizer forward (CPU tiles)", ("nifi_utils/gs/render.py",)),
    ("restorer / prior forward", ("nifi_utils/models/restorer.py", "nifi_utils/models/folders.py", "nifi_utils/models/autoencoder.py",
                                  "diffusers/")),
    ("optimizer step", ("torch/optim",)),
    ("PNG / image I/O", ("PIL/",)),
    ("plots (matplotlib)", ("matplotlib",)),
]
PHASES = [
    ("synthesis: importance scores (pruning)", ("gradient_scores", "prune_levels")),
    ("synthesis: QAT fine-tuning", ("finetune_levels",)),
    ("synthesis: anchors", ("codec_anchors",)),
    ("synthesis: encode / decode", ("encode_scene", "codec.py:", "load (nifi_utils/codec")),
    ("synthesis: test / pair renders", ("render_uint8",)),
    ("scenes: ground-truth renders", ("render_views",)),
    ("scenes: generation", ("generate_scene", "build_scene")),
    ("distill: held-out evaluation", ("HeldoutEval",)),
    ("distill: training steps", ("Distiller.step", "Distiller.train")),
    ("refine", ("nifi_utils/models/refine.py",)),
    ("benchmark: BM3D", ("bm3d",)),
    ("benchmark: restorers", ("restore_images", "restore_with", "Restorer.restore")),
    ("benchmark: metrics", ("nifi_utils/measure/metrics.py",)),
    ("benchmark: intervals", ("nifi_utils/measure/stats.py",)),
]


def _procs_and_frames(stack: str):
    parts = stack.split(";")
    procs = [p for p in parts if p.startswith("process ")]
    threads = [p for p in parts if p.startswith("thread ")]
    frames = [p for p in parts if not p.startswith(("process ", "thread "))]
    return procs, threads, frames


def classify(frames: list[str], rules) -> str:
    for name, pats in rules:
        if any(p in f for f in frames for p in pats):
            return name
    return "other"


def summarize(raw_files: list[Path], timings: dict | None = None) -> dict:
    stages: dict[str, dict] = {}
    for raw in raw_files:
        for line in raw.read_text(errors="replace").splitlines():
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            procs, threads, frames = _procs_and_frames(stack)
            stage = next((m.group(1) for p in procs if (m := STAGE_RE.search(p))), None)
            if stage is None or not threads or "MainThread" not in threads[0]:
                continue
            chain = " > ".join(procs)
            if "resource_tracker" in procs[-1] or STAGE_RE.search(procs[-1]):
                continue  # the runner itself waits on papermill; the tracker sleeps
            kernel = "ipykernel" in procs[-1]
            s = stages.setdefault(stage, {"kernel": collections.Counter(), "workers": collections.Counter(),
                                          "ops": collections.Counter(), "phases": collections.Counter(),
                                          "funcs": collections.Counter(), "procs": set()})
            s["procs"].add(chain.rsplit(" > ", 1)[-1][:80])
            n = int(n)
            leaf = frames[-1] if frames else ""
            waiting = any(leaf.startswith(w) or w in leaf for w in WAIT_LEAVES)
            if waiting:
                op = "waiting (on workers, ranks or subprocesses)" if kernel else "idle in a worker"
                phase = op
            else:
                op, phase = classify(frames, OPERATIONS), classify(frames, PHASES)
            s["kernel" if kernel else "workers"][op] += n
            s["ops"][op] += n
            s["phases"][phase] += n
            seen = set()
            for f in frames:
                if "nifi_utils/" in f:
                    name = f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")"
                    if name not in seen:
                        seen.add(name)
                        s["funcs"][name] += n
    out = {}
    for stage, s in stages.items():
        total = sum(s["ops"].values())

        def secs(c):
            return {k: round(v / RATE, 1) for k, v in c.most_common()}

        busy = total - s["ops"]["waiting (on workers, ranks or subprocesses)"] - s["ops"]["idle in a worker"]
        out[stage] = {
            "wall_s": (timings or {}).get(stage, {}).get("seconds"),
            "process_s": round(total / RATE, 1), "busy_process_s": round(busy / RATE, 1),
            "operations_s": secs(s["ops"]), "phases_s": secs(s["phases"]),
            "kernel_s": secs(s["kernel"]), "workers_s": secs(s["workers"]),
            "top_nifi_functions_inclusive_s": dict(list(secs(s["funcs"]).items())[:15]),
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="run a command under py-spy")
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("command", nargs=argparse.REMAINDER)
    s = sub.add_parser("summarize", help="per-stage seconds from py-spy raw files")
    s.add_argument("raw", nargs="+", type=Path)
    s.add_argument("--timings", type=Path, default=Path("reports/cpu/timings.json"))
    s.add_argument("--out", type=Path, default=Path("benchmarks/results/stage_profile.json"))
    s.add_argument("--note", default="")
    a = ap.parse_args(argv)
    if a.cmd == "record":
        spy = shutil.which("py-spy")
        if spy is None:
            print("error: py-spy not found: pip install py-spy", file=sys.stderr)
            return 2
        cmd = [c for c in a.command if c != "--"]
        if not cmd:
            print("error: no command to profile (after --)", file=sys.stderr)
            return 2
        return subprocess.call([spy, "record", "--subprocesses", "--idle", "--threads", "--nonblocking",
                                "--rate", str(RATE), "--format", "raw", "-o", str(a.out), "--", *cmd])
    missing = [p for p in a.raw if not p.is_file()]
    if missing:
        print(f"error: {missing[0]}: no such file", file=sys.stderr)
        return 2
    timings = json.loads(a.timings.read_text())["stages"] if a.timings.is_file() else None
    res = {"what": "py-spy samples (20/s, idle included) of each stage's notebook kernel and worker processes "
                   "(main threads), in process-seconds; wall_s from timings.json of the same run",
           "note": a.note, "stages": summarize(a.raw, timings)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    for stage, v in res["stages"].items():
        print(f"{stage}: wall {v['wall_s']} s, process {v['process_s']} s (busy {v['busy_process_s']})")
        for k, x in list(v["operations_s"].items())[:6]:
            print(f"   {x:8.1f} s  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
