"""Layer 7 (pipeline): params.yaml and dvc.yaml, read the way DVC reads them."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .common import NifiError, repo_path

PROFILES = ("cpu", "tiny", "paper")


class _Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `5e-06` (no dot) is a string; DVC reads YAML 1.2, where it is a float."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise NifiError(f"{path} not found (run from a checkout of the NiFi lab)")
    with open(path) as f:
        return yaml.load(f, Loader=_Loader) or {}


def load_params(path: str | Path = "params.yaml") -> dict:
    return load_yaml(repo_path(path))


def active_profile(params: dict, override: str | None = None) -> str:
    profile = override or params.get("profile", "cpu")
    if profile not in PROFILES:
        raise NifiError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    return profile


def stage_params(stage: str, profile: str | None = None, params: dict | None = None) -> dict:
    """The flat parameters a stage's notebook receives: profile, seed and its profile sub-section."""
    params = load_params() if params is None else params
    profile = active_profile(params, profile)
    if stage not in params:
        raise NifiError(f"params.yaml has no section {stage!r}")
    section = params[stage].get(profile)
    if section is None:
        raise NifiError(f"params.yaml section {stage!r} has no {profile!r} profile")
    return {"profile": profile, "seed": params.get("seed", 0), **section}


@dataclass
class StageSpec:
    name: str
    notebook: Path
    outs: list[Path]
    executed: Path


def _interpolate(text: str, variables: dict) -> str:
    def sub(m):
        key = m.group(1)
        if key not in variables:
            raise NifiError(f"dvc.yaml uses ${{{key}}}, which is not a top-level key of params.yaml")
        return str(variables[key])

    return re.sub(r"\$\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}", sub, text)


def stage_spec(stage: str, profile: str | None = None, params: dict | None = None) -> StageSpec:
    """The stage as dvc.yaml declares it (single source of truth), with ${profile} filled in."""
    params = load_params() if params is None else params
    variables = {**{k: v for k, v in params.items() if not isinstance(v, (dict, list))},
                 "profile": active_profile(params, profile)}
    stages = load_yaml(repo_path("dvc.yaml")).get("stages", {})
    if stage not in stages:
        raise NifiError(f"unknown stage {stage!r}: dvc.yaml has {', '.join(stages) or 'none'}")
    st = stages[stage]
    deps = [_interpolate(str(d), variables) for d in st.get("deps", [])]
    outs = [_interpolate(str(next(iter(o)) if isinstance(o, dict) else o), variables) for o in st.get("outs", [])]
    notebooks = [d for d in deps if d.startswith("notebooks/") and d.endswith(".py")]
    executed = [o for o in outs if o.endswith(".ipynb")]
    if len(notebooks) != 1 or len(executed) != 1:
        raise NifiError(f"dvc.yaml stage {stage!r} needs exactly one notebooks/*.py dep and one .ipynb out")
    return StageSpec(stage, repo_path(notebooks[0]), [repo_path(o) for o in outs], repo_path(executed[0]))
