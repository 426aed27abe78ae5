"""Distillation on two CPU processes (gloo) through `accelerate launch` (torchrun underneath): `batch` is the global
batch, so 2 ranks make one process's update and follow its trajectory; a 2-process checkpoint (accelerate's
save_state, every rank's RNGs included) resumes on 2 and on 1 process into that trajectory; a checkpoint of the older
format is refused; a failing rank ends the run in one line naming it and its variant with no export left behind; a
process count beyond the cores, or a batch it does not divide, is refused before any work (exit 2)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nifi_utils.core.common import REPO_ROOT, NifiError
from nifi_utils.core.launch import UsageError, batch_share, check_processes, launch_command

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


def _close(xs, ys, rtol=1e-4, atol=1e-6):
    """Equal up to float rounding (one process sums 4 pairs where 2 ranks average two sums of 2, and threads differ)."""
    return all(torch.allclose(x, y, rtol=rtol, atol=atol * max(float(x.abs().max()), 1e-12)) for x, y in zip(xs, ys))


@pytest.mark.slow
@needs_two
def test_two_processes_make_the_update_of_one_process_on_the_same_global_batch(tmp_path, monkeypatch):
    _launch2("step", tmp_path / "two.pt")
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    monkeypatch.setattr(torch.optim, "AdamW", script.sgd)
    one = script.one_step()
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["shares"] == [(0, 2), (2, 4)] and one["shares"] == [(0, 4)]  # each rank computes on half the batch
    n_gen = len(script.distiller(**script.STEP_CFG).gen_params)
    for part in (one["update"][:n_gen], one["update"][n_gen:]):  # the step moved phi- and phi+
        assert sum(float(u.abs().sum()) for u in part) > 0
    # float noise only; a sum over ranks (2x), per-rank gradients or per-rank noise would differ by far more
    assert _close(one["update"], two["update"])
    # the logged losses are the mean over ranks: the 4-pair batch's
    for k in ("loss_g", "l_kl", "l2", "lattice", "loss_c"):
        assert two["logs"][k] == pytest.approx(one["logs"][k], rel=1e-4), k


@pytest.mark.slow
@needs_two
def test_a_two_process_run_follows_one_process_and_resumes_on_two_or_one_process(tmp_path):
    _launch2("resume", tmp_path / "res.pt", tmp_path / "ckpt")
    res = torch.load(tmp_path / "res.pt", weights_only=False)
    assert res["processes"] == 2 and res["resumed_at"] == 2
    assert _close(res["a"], res["c"], rtol=1e-6, atol=1e-7)  # resumed on 2: the same run
    assert [h["loss_g"] for h in res["a_hist"]] == pytest.approx([h["loss_g"] for h in res["c_hist"]], rel=1e-5)
    p = script.pairs()
    one = script.distiller(**script.RESUME_CFG)
    one.train(p, 4)
    assert _close(res["a"], script._params(one), rtol=1e-4, atol=1e-5)  # 4 steps on 2 ranks = 4 on one process
    # accelerate's save_state: every rank its global RNGs (restored on both ranks), the main process the rest (one
    # stream, one set of LoRA weights and optimizer states)
    names = sorted(f.name for f in (tmp_path / "ckpt").iterdir())
    assert names == ["custom_checkpoint_0.pkl", "model.safetensors", "model_1.safetensors", "optimizer.bin",
                     "optimizer_1.bin", "random_states_0.pkl", "random_states_1.pkl"], names
    assert res["rngs_restored"] == [True, True]
    resumed = script.distiller(**script.RESUME_CFG)
    resumed.load_checkpoint(tmp_path / "ckpt")  # written by 2 processes, resumed by 1
    assert resumed.step == 2
    resumed.train(p, 4)
    assert _close(script._params(resumed), script._params(one), rtol=1e-4, atol=1e-5)
    assert [h["loss_g"] for h in resumed.history] == pytest.approx([h["loss_g"] for h in one.history], rel=1e-4)


def test_a_checkpoint_of_the_older_format_is_refused_in_one_line(tmp_path):
    d = script.distiller(**{**script.RESUME_CFG, "batch": 2})
    d.save_checkpoint(tmp_path / "ckpt")
    d.load_checkpoint(tmp_path / "ckpt")  # its own: fine
    # what the hand-written checkpoints of an older version left (the LoRA weights, optimizers and stream in .pt files)
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"processes": 2, "streams": "global-batch"}, old / "training_state.pt")
    torch.save({"step": 2}, old / "distiller_state.pt")
    assert type(d).has_checkpoint(old)  # train_variant tries it, and stops
    with pytest.raises(NifiError, match="older version") as e:
        d.load_checkpoint(old)
    assert "\n" not in str(e.value)
    # a save_state folder whose registered state is not this version's
    st = torch.load(tmp_path / "ckpt" / "custom_checkpoint_0.pkl", weights_only=False)
    torch.save({**st, "format": "nifi-distill-state/1"}, tmp_path / "ckpt" / "custom_checkpoint_0.pkl")
    with pytest.raises(NifiError, match="not this version") as e:
        d.load_checkpoint(tmp_path / "ckpt")
    assert "\n" not in str(e.value)


def test_a_global_batch_splits_into_equal_shares_or_is_refused():
    assert [batch_share(8, 4, r) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert batch_share(4, 1) == slice(0, 4)
    with pytest.raises(UsageError, match="does not split over 8"):
        batch_share(4, 8, what="distill.batch")
    with pytest.raises(UsageError, match="does not split over 3"):
        batch_share(4, 3)


@pytest.mark.slow
@needs_two
def test_a_failing_rank_ends_the_run_in_one_line_and_leaves_no_export(tmp_path, monkeypatch):
    from nifi_utils.models.distill import DistillConfig, launch_variants
    from nifi_utils.models.folders import save_prior

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
    from nifi_utils.pipeline import run

    def no_notebook(*a, **k):
        raise AssertionError("the stage started")

    monkeypatch.setattr(run, "stage_params", lambda stage, profile=None: {"profile": "tiny", "seed": 0,
                                                                           "processes": have + 1})
    monkeypatch.setattr(run, "prepare_outputs", no_notebook)
    assert run.main(["distill", "--profile", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: distill.processes (profile tiny)") and str(have) in err[0]
    if have >= 2:  # a global batch the ranks do not divide: refused before the notebook too
        monkeypatch.setattr(run, "stage_params", lambda stage, profile=None: {"profile": "tiny", "seed": 0,
                                                                               "processes": 2, "batch": 3})
        assert run.main(["distill", "--profile", "tiny"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: distill.batch (profile tiny) = 3") and "over 2" in err[0]
