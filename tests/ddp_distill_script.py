"""Ranks of tests/test_distill_ddp.py, run under `accelerate launch` (torchrun, gloo on CPU):

    python -m ddp_distill_script step OUT      one step (generator and critic) on the global batch of four pairs
    python -m ddp_distill_script resume OUT CKPT   4 steps straight vs 2 steps, save_state, load_state, resume to 4

The main process writes what the test compares into OUT (torch.save); the test runs the same on one process."""
import os
import random
import sys

import numpy as np
import torch

from nifi_utils.models.distill import Distiller, DistillConfig, PairSet
from nifi_utils.models.folders import tiny_sd3
from test_distill import _pairs as pairs  # the same four fixed pairs as the single-process tests

# Every random draw of a step is on: the TSD term (its timestep, its noise, the critic's), noise at t0, a posterior
# sample, prompt dropout, random pairs and crops. `batch` is the global batch (2 pairs a rank on 2 ranks). Plain SGD
# and the gradient clip: the update is the clipped averaged gradient times lr, so a sum over ranks (2x), per-rank
# gradients or per-rank random numbers would show.
STEP_CFG = dict(rank=4, critic_rank=4, batch=4, crop=32, lr_g=1e-2, lr_c=1e-2, cfg_scale=2.0, seed=0, latent="sample",
                prompt_dropout=0.5, perceptual_weight=0.0, lattice_weight=1.0, weight_decay=0.0)
RESUME_CFG = dict(rank=4, critic_rank=4, batch=4, crop=32, lr_g=1e-3, lr_c=1e-3, cfg_scale=2.0, seed=0,
                  checkpoint_every=2, perceptual_weight=0.0, lattice_weight=1.0)


def sgd(params, lr, weight_decay):
    return torch.optim.SGD(params, lr=lr)


def distiller(**cfg) -> Distiller:
    torch.manual_seed(0)
    return Distiller(tiny_sd3(seed=0), DistillConfig(**cfg))


def _params(d: Distiller) -> list[torch.Tensor]:
    return [t.detach().cpu().clone() for t in d.gen_params + d.crit_params]


def one_step() -> dict:
    """One training step (with AdamW already swapped for SGD): the update of phi- and phi+ and this run's shares."""
    from accelerate.utils import gather_object

    d = distiller(**STEP_CFG)
    before = _params(d)
    d.train(pairs(), 1)
    shares = gather_object([(d.share.start, d.share.stop)])
    return {"update": [a - b for a, b in zip(_params(d), before)], "logs": d.history[-1],
            "processes": d.acc.num_processes, "shares": shares}


def _global_rngs():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def resume(ckpt) -> dict:
    """4 steps straight vs 2 steps, accelerate's save_state, load_state into a fresh distiller (after every rank's
    global RNGs were reseeded apart), 2 more; whether each rank got its RNGs back (gathered)."""
    from accelerate.utils import gather_object

    p = pairs()
    a = distiller(**RESUME_CFG)
    a.train(p, 4)
    b = distiller(**RESUME_CFG)
    b.train(p, 2, checkpoint_dir=ckpt)  # "interrupted" after step 2
    saved = _global_rngs()
    rank = b.acc.process_index
    torch.manual_seed(100 + rank), np.random.seed(100 + rank), random.seed(100 + rank)
    c = distiller(**RESUME_CFG)
    c.load_checkpoint(ckpt)
    now = _global_rngs()
    restored = bool(torch.equal(now[0], saved[0]) and (now[1] == saved[1]).all() and now[2] == saved[2])
    step = c.step
    c.train(p, 4)
    return {"a": _params(a), "c": _params(c), "a_hist": a.history, "c_hist": c.history, "resumed_at": step,
            "processes": a.acc.num_processes, "rngs_restored": gather_object([restored])}


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
