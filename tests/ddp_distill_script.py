"""Ranks of tests/test_distill_ddp.py, run under `accelerate launch` (torchrun, gloo on CPU):

    python -m ddp_distill_script step OUT      one generator step; rank r restores images [2r, 2r + 2) of four
    python -m ddp_distill_script resume OUT CKPT   4 steps straight vs 2 steps, checkpoint, resume to 4

The main process writes what the test compares into OUT (torch.save)."""
import os
import sys

import torch

from nifi_utils.distill import Distiller, DistillConfig, PairSet
from nifi_utils.models import tiny_sd3
from test_distill import _pairs as pairs  # the same four fixed pairs as the single-process tests

# Every term of the generator's loss that draws no random number: no TSD term (its t and noise come from each rank's
# own stream), t0=None (no noise at t0), the posterior's mean (no sample). Then a rank's loss on its 2 images is the
# mean of per-image terms of the same size, and the mean over ranks equals the loss of the 4 images as one batch.
# No clip and plain SGD: the update is the averaged gradient times lr, so a sum (or no average) shows.
STEP_CFG = dict(rank=4, critic_rank=4, batch=2, crop=32, lr_g=1e-2, lr_c=1e-3, seed=0, t0=None, latent="mean",
                tsd_weight=0.0, perceptual_weight=0.0, lattice_weight=1.0, grad_clip=0.0, weight_decay=0.0)
RESUME_CFG = dict(rank=4, critic_rank=4, batch=2, crop=32, lr_g=1e-3, lr_c=1e-3, cfg_scale=2.0, seed=0,
                  checkpoint_every=2, perceptual_weight=0.0, lattice_weight=1.0)


def sgd(params, lr, weight_decay):
    return torch.optim.SGD(params, lr=lr)


def distiller(**cfg) -> Distiller:
    torch.manual_seed(0)
    return Distiller(tiny_sd3(seed=0), DistillConfig(**cfg))


def one_step() -> dict:
    """One generator step on this rank's share of four fixed pairs (with AdamW already swapped for SGD)."""
    d = distiller(**STEP_CFG)
    before = [p.detach().clone() for p in d.gen_params]
    p = pairs()
    r, n = d.acc.process_index, d.acc.num_processes
    k = len(p.lq) // n
    d.train_step(p.lq[r * k:(r + 1) * k].float() / 255, p.hq[r * k:(r + 1) * k].float() / 255)
    return {"update": [(a.detach() - b).cpu() for a, b in zip(d.gen_params, before)], "logs": d.history[-1],
            "processes": n}


def resume(ckpt) -> dict:
    p = pairs()
    a = distiller(**RESUME_CFG)
    a.train(p, 4)
    b = distiller(**RESUME_CFG)
    b.train(p, 2, checkpoint_dir=ckpt)  # "interrupted" after step 2
    c = distiller(**RESUME_CFG)
    c.load_checkpoint(ckpt)
    step = c.step
    c.train(p, 4)
    return {"a": [t.detach().cpu() for t in a.gen_params + a.crit_params],
            "c": [t.detach().cpu() for t in c.gen_params + c.crit_params],
            "a_hist": a.history, "c_hist": c.history, "resumed_at": step, "processes": a.acc.num_processes}


class FailOnRank1(PairSet):
    """Pairs whose batch raises on rank 1 at its second step (rank 0 is then waiting in the gradient average)."""
    calls = 0

    def batch(self, n, crop, g):
        self.calls += 1
        if int(os.environ.get("RANK", 0)) == 1 and self.calls == 2:
            raise RuntimeError("injected failure")
        return super().batch(n, crop, g)


def no_eval(d, full=False):
    return {"heldout_stlpips": 0.0}


def main(argv):
    mode, out = argv[0], argv[1]
    if mode == "step":
        torch.optim.AdamW = sgd
        res = one_step()
    else:
        res = resume(argv[2])
    from accelerate import PartialState

    if PartialState().is_main_process:
        torch.save(res, out)
    PartialState().wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1:])
