"""The parameters (conf/ composed into params.yaml) and dvc.yaml, read the way DVC reads them.

conf/ is the source: one file per stage with every key, its comment and the `cpu` value, and one override file
per profile (conf/profile/<name>.yaml). DVC composes params.yaml from it with Hydra on `dvc exp run` (`-S
profile=tiny`, `-S distill.t0=99`); `dvc repro` reads the committed params.yaml, the `cpu` composition.
`compose_params` is that composition, for a profile other than params.yaml's or with overrides.

`python -m nifi_utils.pipeline.params [OVERRIDE ...]` writes params.yaml from conf/ the way `dvc exp run -S OVERRIDE ...`
does before it runs (e.g. after editing conf/, or `profile=paper distill.processes=8` before `dvc repro`).
"""
from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from nifi_utils.core.common import NifiError, repo_path

PROFILES = ("cpu", "tiny", "paper")
# DVC's defaults for `hydra.config_dir` and `hydra.config_name` (.dvc/config sets only `hydra.enabled`)
CONF_DIR = "conf"
CONF_NAME = "config"


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


def compose_yaml(profile: str | None = None, overrides: tuple[str, ...] | list[str] = ()) -> str:
    """params.yaml's text as `dvc exp run -S profile=<profile> -S <override> ...` writes it: Hydra's compose API on
    conf/, interpolations resolved, OmegaConf's YAML (dvc.utils.hydra.compose_and_dump does the same)."""
    return _compose(profile, tuple(overrides))


@functools.lru_cache(maxsize=16)
def _compose(profile: str | None, overrides: tuple[str, ...]) -> str:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if profile is not None:
        active_profile({}, profile)  # an unknown profile: the one-line error, not Hydra's
        overrides = (f"profile={profile}", *overrides)
    conf = repo_path(CONF_DIR)
    if not (conf / f"{CONF_NAME}.yaml").is_file():
        raise NifiError(f"{conf / CONF_NAME}.yaml not found (run from a checkout of the NiFi lab)")
    try:
        with initialize_config_dir(str(conf), version_base=None):
            cfg = compose(config_name=CONF_NAME, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise NifiError(f"conf/ does not compose with {list(overrides)}: {str(e).splitlines()[0]}") from None
    return OmegaConf.to_yaml(cfg)


def compose_params(profile: str | None = None, overrides: tuple[str, ...] | list[str] = ()) -> dict:
    """conf/ composed for `profile` (default: conf/config.yaml's, cpu) with Hydra overrides such as `distill.t0=99`:
    what params.yaml holds after `dvc exp run -S profile=<profile> -S <override> ...`, read as DVC reads it."""
    return yaml.load(compose_yaml(profile, overrides), Loader=_Loader)


def active_profile(params: dict, override: str | None = None) -> str:
    profile = override or params.get("profile", "cpu")
    if profile not in PROFILES:
        raise NifiError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    return profile


def profile_params(profile: str | None = None) -> dict:
    """params.yaml when `profile` is its profile (or None), else conf/ composed for `profile`."""
    params = load_params()
    profile = active_profile(params, profile)
    return params if params.get("profile") == profile else compose_params(profile)


def stage_params(stage: str, profile: str | None = None) -> dict:
    """The flat parameters a stage's notebook receives: profile, seed and the stage's section (of params.yaml, or of
    conf/ composed for `profile` when params.yaml is another profile's)."""
    params = profile_params(profile)
    section = params.get(stage)
    if not isinstance(section, dict):
        stages = ", ".join(k for k, v in params.items() if isinstance(v, dict))
        raise NifiError(f"params.yaml has no section {stage!r} (its stages: {stages})")
    return {"profile": params["profile"], "seed": params.get("seed", 0), **section}


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


def dvc_stages() -> dict:
    """dvc.yaml's stages as written (${...} not filled in)."""
    return load_yaml(repo_path("dvc.yaml")).get("stages", {})


def stage_spec(stage: str, profile: str | None = None) -> StageSpec:
    """The stage as dvc.yaml declares it (single source of truth), with ${profile} filled in."""
    params = profile_params(profile)
    variables = {k: v for k, v in params.items() if not isinstance(v, (dict, list))}
    stages = dvc_stages()
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


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m nifi_utils.pipeline.params",
                                 description="Write params.yaml from conf/ as `dvc exp run -S OVERRIDE ...` does.")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. profile=tiny distill.t0=99 (default: the cpu profile)")
    args = ap.parse_args(argv)
    try:
        text = compose_yaml(None, args.overrides)
    except NifiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = repo_path("params.yaml")
    path.write_text(text, encoding="utf-8")
    with_ = f" with {' '.join(args.overrides)}" if args.overrides else ""
    print(f"wrote {path.name}: conf/ composed{with_} (profile {yaml.load(text, Loader=_Loader)['profile']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
