"""The notebooks the way JupyterLab opens them, in any order, with their committed parameters.

`require_inputs(stage, profile)` opens every stage notebook's setup cell: it reads the stage's dependencies from
dvc.yaml, and where one that another stage makes is missing (or an empty folder) it stops the notebook with one
line naming what to run first, before the notebook writes anything. `require_outputs` does the same for a notebook
that only reads stages' outputs (the tour), and `pick_profile` chooses the profile whose outputs exist.

`python -m nifi_utils.pipeline.lab prepare [STAGE] [--profile tiny]` (`make lab`) runs, in dvc.yaml's order, every stage of a
profile whose outputs are incomplete (with STAGE: those whose outputs its notebook reads), through the papermill
runner; a second call runs nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nifi_utils.core.common import REPO_ROOT, NifiError, repo_path
from nifi_utils.pipeline.params import _interpolate, load_params, load_yaml, profile_params, stage_spec


class MissingInputs(NifiError):
    """A notebook's inputs are not there: IPython shows `_render_traceback_`'s one line instead of a traceback
    (the cell still fails, so Run All stops and papermill and `jupyter execute` exit non-zero)."""

    def _render_traceback_(self) -> list[str]:
        return [f"MissingInputs: {self}"]


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p)


def _present(p: Path) -> bool:
    """A file, or a folder with something in it (a failed run can leave an empty output folder behind)."""
    return p.is_file() or (p.is_dir() and any(p.iterdir()))


def _graph(profile: str) -> dict[str, tuple[list[Path], list[Path]]]:
    """dvc.yaml's stages in order -> (deps, outs), `${profile}` filled in: read once per question."""
    params = profile_params(profile)
    variables = {k: v for k, v in params.items() if not isinstance(v, (dict, list))}
    stages = load_yaml(repo_path("dvc.yaml")).get("stages", {})
    path = lambda d: repo_path(_interpolate(str(next(iter(d)) if isinstance(d, dict) else d), variables))  # noqa: E731
    return {s: ([path(d) for d in st.get("deps", [])], [path(o) for o in st.get("outs", [])]) for s, st in stages.items()}


def _stages() -> list[str]:
    return list(load_yaml(repo_path("dvc.yaml")).get("stages", {}))


def missing_outputs(stage: str, profile: str, graph: dict | None = None) -> list[Path]:
    """The stage's outputs that are not there (or are empty folders)."""
    return [o for o in (graph or _graph(profile))[stage][1] if not _present(o)]


def plan(paths: list[Path], profile: str, graph: dict | None = None) -> tuple[list[Path], list[str]]:
    """(the paths that are missing, the stages to run first, in dvc.yaml's order): the producers of the missing paths
    and, transitively, of their own missing inputs. A missing path no stage makes is returned without a stage."""
    graph = graph or _graph(profile)
    producers = {o: s for s, (_, outs) in graph.items() for o in outs}
    missing = [p for p in paths if not _present(p)]
    need: set[str] = set()
    todo = [producers[p] for p in missing if p in producers]
    while todo:
        s = todo.pop()
        if s in need:
            continue
        need.add(s)
        todo += [producers[d] for d in graph[s][0] if d in producers and not _present(d)]
    return missing, [s for s in graph if s in need]


def _upstream(stage: str, graph: dict) -> list[Path]:
    """The stage's deps that another stage makes (code and notebooks are not outputs of a stage)."""
    made = {o for _, outs in graph.values() for o in outs}
    return [d for d in graph[stage][0] if d in made]


def first_command(stage: str | None, stages: list[str], profile: str) -> str:
    """What to type to make the outputs `stage` reads (`stages`, in order; stage None: every stage's outputs):
    the README's command for the tiny and the default profile, the lab's preparation otherwise."""
    if profile == "tiny":
        return "make lab"
    if profile == load_params().get("profile", "cpu"):
        return "make repro" if stage is None or len(stages) > 1 else f"dvc repro {stages[0]}"
    return f"python -m nifi_utils.pipeline.lab prepare{' ' + stage if stage else ''} --profile {profile}"


def _stop(what: str, stage: str | None, paths: list[Path], profile: str, graph: dict) -> None:
    missing, stages = plan(paths, profile, graph)
    if not missing:
        return
    if not stages:
        raise MissingInputs(f"{what} needs {_rel(missing[0])}, which no stage makes: restore it from git "
                            f"(git checkout -- {_rel(missing[0])})")
    also = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    alt = " (or, in the repository: python -m nifi_utils.pipeline.lab prepare)" if profile == "tiny" else ""
    raise MissingInputs(f"{what} needs {_rel(missing[0])}{also} (profile {profile}; "
                        f"{'stages' if len(stages) > 1 else 'stage'} {', '.join(stages)}): "
                        f"run `{first_command(stage, stages, profile)}` first{alt}")


def require_inputs(stage: str, profile: str) -> None:
    """Stop (one line, nothing written) when an input of `stage` that another stage makes is missing."""
    graph = _graph(profile)
    _stop(f"notebook {stage_spec(stage, profile).notebook.stem}", stage, _upstream(stage, graph), profile, graph)


def require_outputs(stages: list[str], profile: str, what: str = "this notebook") -> None:
    """Stop (one line) when an output of one of `stages` is missing."""
    graph = _graph(profile)
    _stop(what, None, [o for s in stages for o in graph[s][1]], profile, graph)


def pick_profile(stages: list[str], profiles: tuple[str, ...] = ("cpu", "tiny")) -> str:
    """The first profile whose `stages` have all their outputs (the cpu run `make repro` leaves, else the tiny one
    `make lab` prepares); with none, one line saying how to get them."""
    for p in profiles:
        graph = _graph(p)
        if not any(missing_outputs(s, p, graph) for s in stages):
            return p
    raise MissingInputs(f"no outputs of {', '.join(profiles)} for {', '.join(stages)} yet: run `make lab` first "
                        f"(the tiny profile, a few minutes) or `make repro` (the cpu profile, ~30 min)")


def prepare(profile: str = "tiny", stage: str | None = None, run=None) -> list[str]:
    """Run, in dvc.yaml's order, every stage of `profile` whose outputs are incomplete (with `stage`: only those whose
    outputs `stage` reads, directly or through another stage); returns the stages run."""
    if run is None:
        from nifi_utils.pipeline.run import run_stage

        run = lambda s: run_stage(s, profile, log_output=False)  # noqa: E731
    graph = _graph(profile)
    if stage is None:
        todo = [s for s in graph if missing_outputs(s, profile, graph)]
    else:
        todo = plan(_upstream(stage, graph), profile, graph)[1]
    for s in todo:
        run(s)
    return todo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nifi_utils.pipeline.lab", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="run the stages whose outputs are missing (what every notebook reads)")
    p.add_argument("stage", nargs="?", help="only what this stage's notebook reads (default: every stage's outputs)")
    p.add_argument("--profile", default="tiny", help="default tiny: the notebooks' committed parameters")
    args = ap.parse_args(argv)
    try:
        ran = prepare(args.profile, args.stage)
    except NifiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"[nifi lab] profile {args.profile}: " + (f"ran {', '.join(ran)}" if ran else "every stage's outputs are there"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
