"""Distillation on two CPU processes (gloo) through `accelerate launch` (torchrun underneath): the gradient average is
real, a 2-process run resumes into its own trajectory, a checkpoint of 2 processes is refused by 1, a failing rank
ends the run in one line naming it and its variant with no export left behind, and a process count beyond the cores
is refused before any work (exit 2)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nifi_utils.common import REPO_ROOT, NifiError
from nifi_utils.launch import UsageError, check_processes, launch_command

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import ddp_distill_script as script  # noqa: E402

needs_two = pytest.mark.skipif((os.cpu_count() or 1) < 2 and not torch.cuda.is_available(), reason="needs 2 cores")


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO_ROOT)]), "NIFI_QUIET": "1"}


def _launch2(*args, timeout=600):
    proc = subprocess.run(launch_command(2, "ddp_distill_script", [str(a) for a in args]), env=_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@needs_two
def test_two_processes_of_batch_2_make_the_update_of_one_process_of_batch_4(tmp_path, monkeypatch):
    _launch2("step", tmp_path / "two.pt")
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    monkeypatch.setattr(torch.optim, "AdamW", script.sgd)
    one = script.one_step()
    assert two["processes"] == 2 and one["processes"] == 1
    assert sum(float(u.abs().sum()) for u in one["update"]) > 0  # the step moved phi-
    for u1, u2 in zip(one["update"], two["update"]):
        # float noise only (threads differ); a sum (2x) or per-rank gradients would differ by far more
        assert torch.allclose(u1, u2, rtol=1e-4, atol=1e-5 * float(u1.abs().max()) + 1e-12)
    # the logged losses are the mean over ranks: the 4-image batch's
    assert two["logs"]["loss_g"] == pytest.approx(one["logs"]["loss_g"], rel=1e-5)


@pytest.mark.slow
@needs_two
def test_two_process_run_resumes_into_the_same_trajectory_and_one_process_refuses_it(tmp_path):
    _launch2("resume", tmp_path / "res.pt", tmp_path / "ckpt")
    res = torch.load(tmp_path / "res.pt", weights_only=False)
    assert res["processes"] == 2 and res["resumed_at"] == 2
    for p, q in zip(res["a"], res["c"]):
        assert torch.allclose(p, q, atol=1e-6)
    assert [h["loss_g"] for h in res["a_hist"]] == pytest.approx([h["loss_g"] for h in res["c_hist"]], rel=1e-5)
    assert (tmp_path / "ckpt" / "distiller_state_rank1.pt").is_file()  # every rank's own streams
    d = script.distiller(**script.RESUME_CFG)
    with pytest.raises(NifiError, match="written by 2 process"):
        d.load_checkpoint(tmp_path / "ckpt")


@pytest.mark.slow
@needs_two
def test_a_failing_rank_ends_the_run_in_one_line_and_leaves_no_export(tmp_path, monkeypatch):
    from nifi_utils.distill import DistillConfig, launch_variants
    from nifi_utils.models import save_prior

    save_prior(script.tiny_sd3(seed=0), tmp_path / "prior")
    p = script.pairs()
    job = {"name": "boom", "cfg": DistillConfig(**{**script.RESUME_CFG, "steps": 3, "checkpoint_every": 0}),
           "base_model": str(tmp_path / "prior"), "ckpt": str(tmp_path / "ckpt"), "out_path": str(tmp_path / "boom.pt"),
           "pairs": script.FailOnRank1(p.lq, p.hq, p.meta), "evaluate": script.no_eval, "device": "cpu"}
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    with pytest.raises(NifiError) as e:
        launch_variants([job], 2)
    msg = str(e.value)
    assert "\n" not in msg and "rank 1" in msg and "variant boom" in msg and "injected failure" in msg
    assert not (tmp_path / "boom.pt").exists()


def test_processes_beyond_the_cores_are_refused_in_one_line_before_any_work(monkeypatch, capsys):
    have = torch.cuda.device_count() if torch.cuda.is_available() else os.cpu_count()
    assert check_processes(1) == 1
    for bad in (0, have + 1):
        with pytest.raises(UsageError):
            check_processes(bad)
    from nifi_utils import run

    def no_notebook(*a, **k):
        raise AssertionError("the stage started")

    monkeypatch.setattr(run, "stage_params", lambda stage, profile=None: {"profile": "tiny", "seed": 0,
                                                                           "processes": have + 1})
    monkeypatch.setattr(run, "prepare_outputs", no_notebook)
    assert run.main(["distill", "--profile", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: distill.processes (profile tiny)") and str(have) in err[0]
