"""NiFi distillation, training the one-step restorer (paper §3, Eqs. 1, 4-8).

Generator phi- (LoRA on the transformer and the VAE encoder; `vae_lora: encoder_decoder`, our extension, on the
decoder too) restores in one step from the degraded
latent noised to t0 (`Restorer.one_step`, exactly the inference path). A critic phi+ (a second LoRA
on a frozen copy of the transformer) learns the score of the restored distribution; the frozen prior
with its adapters off is the real score. Per step, with t from the scheduler's timesteps in an index
range (TSD-SR: 50..949), one noise eps for both latents, CFG on both scores:

    g = alpha sigma^2 (v_real(x^_t) - v_fake(x^_t)) + (1 - alpha) sigma^2 (v_real(x^_t) - v_real(x_t))
    L_gen = w_kl * 0.5 |x^ - sg(x^ - g)|^2 + w_l2 |x^ - x|^2 + w_p perceptual(D(x^), I) + w_lat lattice(D(x^) - I)
    L_critic = |v_phi+(x^_t', t') - (eps' - sg(x^))|^2        (paper Eq. 8, flow form; "x0": TSD-SR's)

Updates alternate every step (generator, then critic). HF `accelerate` runs it on one CPU, one GPU
or N processes (`accelerate launch`, DDP over phi- and phi+: gloo on CPU, NCCL on GPU). `batch` is the global
batch, pairs per optimizer step over all ranks: every rank draws the whole batch, its crops and its noise from one
stream seeded by `seed` alone and computes on its share (rank r: pairs [r b/N, (r+1) b/N)), DDP averages the LoRA
gradients, so N ranks follow one process's trajectory up to float rounding and the number of processes is a
resource, not a hyperparameter. Only the main process evaluates and exports. Checkpoints are accelerate's
`save_state` folders: the LoRA weights (only they train), the optimizers, every rank's global RNGs, and (registered
for checkpointing) the step, the shared stream and the history, so an interrupted run resumes into the same
trajectory on any number of processes.
"""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nifi_utils.core.common import NifiError, progress
from nifi_utils.core.images import read_rgb
from nifi_utils.core.facts import OFFICIAL_T0, judge_metric  # noqa: F401  (re-exported)
from nifi_utils.core.launch import batch_share
from nifi_utils.measure.metrics import perceptual_fn  # noqa: F401  (the loss lives with the metrics; re-exported)
from nifi_utils.models.restorer import CRITIC_LORA_TARGETS, VAE_LORA_MODES, Restorer


# the state a distillation checkpoint (accelerate's save_state folder) registers beside the models and optimizers
CHECKPOINT_FORMAT = "nifi-distill-state/2"


@dataclass
class DistillConfig:
    rank: int = 64
    critic_rank: int = 64
    t0: float | None = OFFICIAL_T0
    tsd_weight: float = 1.0  # 0 -> the "no TSD" ablation (l2 + perceptual only)
    alpha: float = 0.7
    cfg_scale: float = 7.5
    l2_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual: str = "stlpips_vgg"  # conf/distill.yaml's; stlpips_alex | stlpips_vgg | lpips_alex (needs torchvision weights)
    vae_lora: str = "encoder"  # encoder (official) | encoder_decoder (our extension: the decoder adapts too)
    lattice_weight: float = 0.0  # weight of the l2 on the latent-grid harmonics of (restored - clean); paper: none
    t_index_min: int = 50
    t_index_max: int = 950
    critic_loss: str = "flow"  # flow (paper Eq. 8) | x0 (TSD-SR)
    latent: str = "sample"  # sample (official) | mean
    lr_g: float = 5e-6
    lr_c: float = 1e-6
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    steps: int = 100
    batch: int = 4
    crop: int = 64
    prompt_dropout: float = 0.1
    grad_accum: int = 1
    checkpoint_every: int = 0
    eval_every: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16 (GPU)
    seed: int = 0

    def __post_init__(self):
        if self.mixed_precision is False:  # YAML 1.1 reads an unquoted `no` as false
            self.mixed_precision = "no"
        if self.critic_loss not in ("flow", "x0"):
            raise NifiError(f"critic_loss must be 'flow' or 'x0', got {self.critic_loss!r}")
        if self.latent not in ("sample", "mean"):
            raise NifiError(f"latent must be 'sample' or 'mean', got {self.latent!r}")
        if self.lattice_weight < 0:
            raise NifiError(f"lattice_weight must be >= 0, got {self.lattice_weight}")
        if self.vae_lora not in VAE_LORA_MODES:
            raise NifiError(f"vae_lora must be one of {', '.join(VAE_LORA_MODES)}, got {self.vae_lora!r}")
        if not 0 <= self.t_index_min < self.t_index_max <= 1000:
            raise NifiError(f"t index range [{self.t_index_min}, {self.t_index_max}) is not inside [0, 1000)")


# ---------------------------------------------------------------------- data
@dataclass
class PairSet:
    """(degraded, clean) training pairs as [N,3,H,W] uint8 tensors, plus their scene and level."""
    lq: torch.Tensor
    hq: torch.Tensor
    meta: list = field(default_factory=list)

    @classmethod
    def from_pairs_dir(cls, root: Path, levels=None) -> "PairSet":

        lq, hq, meta = [], [], []
        for scene in sorted(p for p in Path(root).iterdir() if p.is_dir()):
            for ldir in sorted(scene.glob("level*")):
                lv = int(ldir.name[5:])
                if levels is not None and lv not in levels:
                    continue
                for f in sorted(ldir.glob("*.png")):
                    c = scene / "clean" / f.name
                    if not c.is_file():
                        raise NifiError(f"pair {f} has no clean image {c}")
                    lq.append(read_rgb(f))
                    hq.append(read_rgb(c))
                    meta.append((scene.name, lv, f.stem))
        if not lq:
            raise NifiError(f"no training pairs under {root}: run the synthesis stage first")
        t = lambda a: torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        return cls(t(lq), t(hq), meta)

    def batch(self, n: int, crop: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random pairs, same random crop in both, as floats in [0, 1]."""
        idx = torch.randint(len(self.lq), (n,), generator=g)
        h, w = self.lq.shape[-2:]
        c = min(crop, h, w)
        ys = torch.randint(0, h - c + 1, (n,), generator=g)
        xs = torch.randint(0, w - c + 1, (n,), generator=g)
        lq = torch.stack([self.lq[i, :, y:y + c, x:x + c] for i, y, x in zip(idx, ys, xs)])
        hq = torch.stack([self.hq[i, :, y:y + c, x:x + c] for i, y, x in zip(idx, ys, xs)])
        return lq.float() / 255, hq.float() / 255


# ---------------------------------------------------------------------- the lattice term
def lattice_l2(diff: torch.Tensor, period: int) -> torch.Tensor:
    """Mean power of `diff` [B,C,H,W] at the harmonics of a `period`-px grid, (k H / period, l W / period) for
    (k, l) != (0, 0), with the orthonormal DFT: white noise of variance s^2 scores s^2, like a pixel MSE, while an
    error that repeats on the grid puts all its energy there and scores up to period^2 times its MSE.

    A frequency-weighted reconstruction loss (the family of the focal frequency loss, Jiang et al., ICCV 2021)
    restricted to the frequencies where a latent-grid lattice lives: the VAE's downsampling times the DiT's patch
    size (4 x 2 = 8 px here, 8 x 2 = 16 px for SD3). It compares with the clean image, so detail the ground truth
    has at those frequencies costs nothing; only the restorer's own periodic error does. Written here because
    no maintained library ships a lattice-frequency loss."""
    h, w = diff.shape[-2:]
    f = torch.fft.rfft2(diff if diff.dtype in (torch.float32, torch.float64) else diff.float(), norm="ortho")
    ky = sorted({round(k * h / period) % h for k in range(period)})
    kx = sorted({round(k * w / period) for k in range(period // 2 + 1)} & set(range(w // 2 + 1)))
    pw = f[..., ky, :][..., kx].abs().pow(2)
    mask = torch.ones(len(ky), len(kx), dtype=torch.bool, device=pw.device)
    mask[0, 0] = False  # the mean colour is not a lattice
    return pw[..., mask].mean()


# ---------------------------------------------------------------------- the trainer


class _GeneratorForward(torch.nn.Module):
    """phi-'s trainable path, degraded image -> restored latent (encode with the LoRA, Eq. 7's one step), as one
    module: DDP averages gradients only of what runs inside a wrapped forward, while the restorer keeps the plain
    models, whose configs and sub-modules it reads."""

    def __init__(self, r: Restorer):
        super().__init__()
        self.transformer, self.vae = r.transformer, r.vae
        self._restorer = [r]  # not a sub-module: its models are registered above

    def forward(self, lq: torch.Tensor, randn, sample: bool, t0):
        """`randn(shape)`: this rank's share of the global batch's standard normal noise (`Distiller._randn`)."""
        r = self._restorer[0]
        x_lq = r.encode(lq, sample=sample, randn=randn)
        noise0 = randn(x_lq.shape).to(x_lq)
        return r.one_step(x_lq, t0, noise=noise0)


class Distiller:
    """Holds phi- (on `restorer`) and phi+ (on a frozen copy of its transformer) and their optimizers."""

    def __init__(self, restorer: Restorer, cfg: DistillConfig, accelerator=None):
        from accelerate import Accelerator
        from peft import LoraConfig

        self.cfg = cfg
        self.acc = accelerator or Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                                              mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
        r = restorer
        for m in (r.vae, r.transformer):
            m.requires_grad_(False)
        self.critic = copy.deepcopy(r.transformer)  # frozen copy: adapters off = the real score
        self.critic.add_adapter(LoraConfig(r=cfg.critic_rank, lora_alpha=cfg.critic_rank, init_lora_weights="gaussian",
                                           target_modules=CRITIC_LORA_TARGETS), adapter_name="critic")
        if not r._has_adapter():
            r.add_lora(rank=cfg.rank, alpha=cfg.rank, vae_lora=cfg.vae_lora)
        self.r = r
        gen_params = [p for m in (r.transformer, r.vae) for n, p in m.named_parameters() if "lora_" in n]
        crit_params = [p for n, p in self.critic.named_parameters() if "lora_" in n]
        for p in gen_params + crit_params:
            p.requires_grad_(True)
            p.data = p.data.float()
        self.gen_params, self.crit_params = gen_params, crit_params
        self.opt_g = torch.optim.AdamW(gen_params, lr=cfg.lr_g, weight_decay=cfg.weight_decay)
        self.opt_c = torch.optim.AdamW(crit_params, lr=cfg.lr_c, weight_decay=cfg.weight_decay)
        # r.transformer and r.vae stay plain modules (the restorer, evaluation and export use them); DDP wraps the
        # generator's trainable path and the critic (with one process, prepare returns them as they are)
        self.gen_fwd, self.critic, self.opt_g, self.opt_c = self.acc.prepare(
            _GeneratorForward(r), self.critic, self.opt_g, self.opt_c)
        self.perc = perceptual_fn(cfg.perceptual, self.acc.device) if cfg.perceptual_weight > 0 else None
        # the latent grid in pixels: the VAE's downsampling times the transformer's patch
        self.lattice_period = r.vae_scale_factor * self.acc.unwrap_model(r.transformer).config.patch_size
        # one stream on every rank (seeded by `seed` alone): each draws the global batch's numbers and keeps its share
        self.share = batch_share(cfg.batch, self.acc.num_processes, self.acc.process_index, "distill.batch")
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.history: list[dict] = []
        # accelerate's save_state/load_state: the LoRA weights through the hooks, this object's state as a custom one
        self.acc.register_save_state_pre_hook(self._save_lora_hook)
        self.acc.register_load_state_pre_hook(self._load_lora_hook)
        self.acc.register_for_checkpointing(self)
        ts = r.scheduler.timesteps.float()
        self.timesteps, self.sigmas = ts, r.scheduler.sigmas.float()[: len(ts)]

    # -------------------------------------------------------------- checkpoints (accelerate's save_state)
    def state_dict(self) -> dict:
        """What accelerate's `save_state` keeps for this object (registered with `register_for_checkpointing`):
        the step, the shared stream (a torch.Generator, which accelerate's RNG states do not cover), the history,
        and accelerate's own step counter (the gradient-accumulation phase; accelerate saves it in each rank's RNG
        file, which a rank beyond the saving run's process count does not have)."""
        return {"format": CHECKPOINT_FORMAT, "step": self.step, "gen": self.gen.get_state(),
                "history": json.dumps(self.history), "accelerator_step": self.acc.step,
                "processes": self.acc.num_processes}

    def load_state_dict(self, sd: dict):
        if sd.get("format") != CHECKPOINT_FORMAT:
            raise NifiError(f"the distillation checkpoint's state has format {sd.get('format')!r}, not this "
                            f"version's {CHECKPOINT_FORMAT!r}: delete the folder to start over")
        self.step = int(sd["step"])
        self.gen.set_state(sd["gen"])
        self.history = json.loads(sd["history"])
        self.acc.step = int(sd["accelerator_step"])

    def _lora(self, model) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.acc.unwrap_model(model).named_parameters() if "lora_" in n}

    def _save_lora_hook(self, models, weights, output_dir):
        """accelerate's save hook: only the LoRA weights of phi- and phi+ (the frozen prior is the base model's),
        named as in the unwrapped modules, so that a checkpoint of N processes (DDP) resumes on any number."""
        for i, m in enumerate(models):
            weights[i] = {n: p.detach().cpu() for n, p in self._lora(m).items()}

    def _load_lora_hook(self, models, input_dir):
        """accelerate's load hook: copy the saved LoRA weights into phi- and phi+ and take the models off
        accelerate's list (it would load them as full state dicts)."""
        from accelerate.utils import SAFE_MODEL_NAME
        from safetensors.torch import load_file

        for i, m in enumerate(models):
            f = Path(input_dir) / f"{SAFE_MODEL_NAME}{f'_{i}' if i else ''}.safetensors"  # save_state's names
            saved, mine = load_file(f), self._lora(m)
            if set(saved) != set(mine) or any(saved[n].shape != p.shape for n, p in mine.items()):
                raise NifiError(f"checkpoint {input_dir} holds other LoRA weights than this run's (another rank, "
                                f"critic_rank or vae_lora?): delete the folder to start over")
            with torch.no_grad():
                for n, p in mine.items():
                    p.copy_(saved[n])
        models.clear()

    @staticmethod
    def has_checkpoint(folder: str | Path) -> bool:
        """Whether `folder` holds a checkpoint to resume from (of this version or an older one)."""
        folder = Path(folder)
        return (folder / "custom_checkpoint_0.pkl").is_file() or (folder / "training_state.pt").is_file()

    def save_checkpoint(self, folder: str | Path):
        """accelerate's `save_state` into `folder`: the main process writes the LoRA weights, the optimizers and this
        object's state (all the same on every rank: one stream, DDP's averaged updates), every rank its RNG states.
        Written into `folder`.partial and then renamed, so an interruption while saving leaves the previous
        checkpoint whole. A collective: call it on every rank."""
        folder = Path(folder)
        part, old = (folder.with_name(folder.name + ext) for ext in (".partial", ".old"))
        if self.acc.is_main_process:
            for f in (part, old):
                shutil.rmtree(f, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(part))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            if folder.exists():
                folder.rename(old)
            part.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def load_checkpoint(self, folder: str | Path):
        """Resume from `folder` (accelerate's `load_state`) on any number of processes: the stream and the global
        batch do not depend on it (a rank the saving run did not have keeps its own global RNGs, which the training
        step does not draw from)."""
        folder = Path(folder)
        if not (folder / "custom_checkpoint_0.pkl").is_file():
            if (folder / "training_state.pt").is_file():
                raise NifiError(f"checkpoint {folder} is in the hand-written format of an older version, which "
                                f"accelerate's load_state does not read: delete the folder to start over")
            raise NifiError(f"no distillation checkpoint in {folder} (no custom_checkpoint_0.pkl of save_state)")
        self.acc.load_state(str(folder))

    # -------------------------------------------------------------- pieces
    def _mine(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of `full`, a draw from the shared stream for the whole global batch (one process: all)."""
        return full[batch_share(len(full), self.acc.num_processes, self.acc.process_index)]

    def _randn(self, shape) -> torch.Tensor:
        """Standard normal noise for this rank's `shape[0]` samples, drawn for the whole global batch."""
        return self._mine(torch.randn((shape[0] * self.acc.num_processes, *shape[1:]), generator=self.gen,
                                      dtype=torch.float32))

    def _embeds(self, b: int):
        r = self.r
        drop = self._mine(torch.rand(b * self.acc.num_processes, generator=self.gen)) < self.cfg.prompt_dropout
        drop = drop.to(r.prompt_embeds.device)
        pe = torch.where(drop[:, None, None], r.null_embeds, r.prompt_embeds)
        pp = torch.where(drop[:, None], r.null_pooled, r.pooled)
        return pe.expand(b, -1, -1), pp.expand(b, -1)

    def _v(self, model, x, t, pe, pp):
        tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        return model(hidden_states=x, encoder_hidden_states=pe.to(x), pooled_projections=pp.to(x), timestep=tt,
                     return_dict=False)[0]

    def _cfg(self, model, xs: list, t, pe, pp) -> list:
        """Classifier-free-guided velocities of the latents `xs` (each [b,...]) at timestep t, in one forward of
        `model`: the latents and their conditional and unconditional halves go as one batch. On the cpu prior
        (batch 4, 16x16x16 latents, one thread) the TSD step's six forwards took 118-136 ms, batched as two
        90-102 ms; the guided teacher was a quarter of the training step."""
        r = self.r
        n, b = len(xs), xs[0].shape[0]
        x = torch.cat(xs)
        pe, pp = pe.to(x), pp.to(x)
        if self.cfg.cfg_scale == 1.0:
            return list(self._v(model, x, t, pe.repeat(n, 1, 1), pp.repeat(n, 1)).split(b))
        ne, npool = r.null_embeds.expand(b, -1, -1).to(x), r.null_pooled.expand(b, -1).to(x)
        v = self._v(model, torch.cat([x, x]), t, torch.cat([pe] * n + [ne] * n), torch.cat([pp] * n + [npool] * n))
        vc, vu = v.split(n * b)
        return list((vu + self.cfg.cfg_scale * (vc - vu)).split(b))

    def _random_t(self):
        i = int(torch.randint(self.cfg.t_index_min, self.cfg.t_index_max, (1,), generator=self.gen))
        return float(self.timesteps[i]), float(self.sigmas[i])

    def _update(self, loss, params, opt):
        self.acc.backward(loss)
        if self.acc.sync_gradients and self.cfg.grad_clip:
            self.acc.clip_grad_norm_(params, self.cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    # -------------------------------------------------------------- one training step
    def train_step(self, lq01: torch.Tensor, hq01: torch.Tensor) -> dict:
        """One step on the global batch `lq01`, `hq01` [cfg.batch,3,h,w] in [0, 1] (every rank passes the same):
        this rank computes on its share; the logs are the global batch's (the mean over ranks)."""
        cfg, r, dev = self.cfg, self.r, self.acc.device
        if lq01.shape[0] != cfg.batch:
            raise NifiError(f"train_step takes the global batch of {cfg.batch} pairs, got {lq01.shape[0]}")
        lq, hq = (lq01[self.share].to(dev) * 2 - 1), (hq01[self.share].to(dev) * 2 - 1)
        b = lq.shape[0]
        pe, pp = self._embeds(b)
        with torch.no_grad():
            unwrapped_vae = self.acc.unwrap_model(r.vae)
            unwrapped_vae.disable_adapters()  # x = E_base(I): the prior's own latent of the clean image
            x = r.encode(hq, sample=cfg.latent == "sample", randn=self._randn)
            unwrapped_vae.enable_adapters()
        # ---- generator phi-
        with self.acc.accumulate(self.gen_fwd):
            x_hat = self.gen_fwd(lq, self._randn, cfg.latent == "sample", cfg.t0)
            logs = {}
            loss = torch.zeros((), device=dev)
            if cfg.tsd_weight > 0:
                with torch.no_grad():
                    t, s = self._random_t()
                    eps = self._randn(x_hat.shape).to(x_hat)
                    xh_t = s * eps + (1 - s) * x_hat.detach()
                    x_t = s * eps + (1 - s) * x
                    critic = self.acc.unwrap_model(self.critic)
                    critic.disable_adapters()
                    if cfg.alpha < 1:
                        v_real_hat, v_real_gt = self._cfg(critic, [xh_t, x_t], t, pe, pp)
                    else:
                        (v_real_hat,) = self._cfg(critic, [xh_t], t, pe, pp)
                        v_real_gt = v_real_hat
                    critic.enable_adapters()
                    (v_fake_hat,) = self._cfg(critic, [xh_t], t, pe, pp)
                    g = cfg.alpha * s ** 2 * (v_real_hat - v_fake_hat) + (1 - cfg.alpha) * s ** 2 * (v_real_hat - v_real_gt)
                    if not bool(torch.isfinite(g).all()):
                        bad = int((~torch.isfinite(g)).sum())
                        raise NifiError(f"step {self.step + 1}: the TSD gradient (Eq. 5) has NaN/Inf values ({bad} of "
                                        f"{g.numel()}); training stopped before the update")
                l_kl = 0.5 * F.mse_loss(x_hat, (x_hat - g).detach())
                loss = loss + cfg.tsd_weight * l_kl
                logs["l_kl"] = float(l_kl.detach())
            l2 = F.mse_loss(x_hat, x)
            loss = loss + cfg.l2_weight * l2
            logs["l2"] = float(l2.detach())
            if self.perc is not None or cfg.lattice_weight > 0:
                img = r.decode(x_hat, hq.shape[-2:]).clamp(-1, 1)
                # in [0, 1] pixels; logged every step even where its weight is 0 (the curve shows the lattice grow)
                lat = lattice_l2((img - hq) / 2, self.lattice_period)
                logs["lattice"] = float(lat.detach())
                if cfg.lattice_weight > 0:
                    loss = loss + cfg.lattice_weight * lat
            if self.perc is not None:
                lp = self.perc((img + 1) / 2, (hq + 1) / 2)
                loss = loss + cfg.perceptual_weight * lp
                logs["perceptual"] = float(lp.detach())
            self._update(loss, self.gen_params, self.opt_g)
        logs["loss_g"] = float(loss.detach())
        # ---- critic phi+ (only needed by the TSD term)
        if cfg.tsd_weight > 0:
            with self.acc.accumulate(self.critic):
                t, s = self._random_t()
                eps = self._randn(x_hat.shape).to(x_hat)
                x0 = x_hat.detach()
                xt = s * eps + (1 - s) * x0
                v = self._v(self.critic, xt, t, pe, pp)
                if cfg.critic_loss == "flow":
                    lc = F.mse_loss(v, eps - x0)
                else:
                    w = torch.sigmoid(torch.randn((), generator=self.gen))
                    lc = 0.5 * w * F.mse_loss(xt - s * v, x0)
                self._update(lc, self.crit_params, self.opt_c)
            logs["loss_c"] = float(lc.detach())
        if self.acc.num_processes > 1:  # the curve of the global batch: the mean over ranks
            keys = sorted(logs)
            mean = self.acc.reduce(torch.tensor([logs[k] for k in keys], device=dev, dtype=torch.float64), "mean")
            logs = {k: float(v) for k, v in zip(keys, mean.cpu())}
        self.step += 1
        logs["step"] = self.step
        self.history.append(logs)
        return logs

    def train(self, pairs: PairSet, steps: int, checkpoint_dir: Path | None = None, evaluate=None, desc="distill"):
        """Run until `self.step == steps` (resumable); `evaluate(self)` every cfg.eval_every steps, on the main
        process only (the others wait for it at the next step's gradient average). `cfg.batch` pairs per step over
        all ranks, drawn on every rank from the shared stream (`train_step` keeps this rank's share)."""
        for _ in progress(range(self.step, steps), desc=desc, disable=not self.acc.is_main_process):
            lq, hq = pairs.batch(self.cfg.batch, self.cfg.crop, self.gen)
            self.train_step(lq, hq)
            if (evaluate is not None and self.cfg.eval_every and self.step % self.cfg.eval_every == 0
                    and self.acc.is_main_process):
                self.history[-1].update(evaluate(self))
            if checkpoint_dir is not None and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint(checkpoint_dir)
        return self.history

    def export(self, path: str | Path) -> Path:
        """The restorer in the official checkpoint format ({'vae', 'transformer'} LoRA state dicts); call it on
        the main process."""
        c = self.cfg
        return self.r.save_lora(path, meta={"format": "nifi-restorer/1", "t0": c.t0, "latent": c.latent,
                                            "vae_lora": c.vae_lora, "rank": c.rank, "perceptual": c.perceptual})


def config_dict(cfg: DistillConfig) -> dict:
    return asdict(cfg)


def heldout_pairs(renders_root: Path, scenes: list[str], per_level: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(compressed [N,3,H,W], ground truth [N,3,H,W] in [0,1], level [N]) of the training scenes' *test* views
    (every 8th view, never a training pair), the first `per_level` of every compression level."""
    held = []
    for f in sorted(f for s in scenes for f in (Path(renders_root) / s).glob("level*/*.png")):
        held.append((int(f.parent.name[5:]), read_rgb(f), read_rgb(f.parent.parent / "gt" / f.name)))
    if not held:
        raise NifiError(f"no compressed test views of {scenes} under {renders_root}: run the synthesis stage")
    levels = sorted({h[0] for h in held})
    held = [h for lv in levels for h in [x for x in held if x[0] == lv][:per_level]]
    lq = torch.from_numpy(np.stack([h[1] for h in held])).permute(0, 3, 1, 2).float() / 255
    hq = torch.from_numpy(np.stack([h[2] for h in held])).permute(0, 3, 1, 2).float() / 255
    return lq, hq, np.array([h[0] for h in held])


# ---------------------------------------------------------------------- held-out evaluation and the variants
class HeldoutEval:
    """`evaluate(d)` for `Distiller.train`: the held-out judge (`judge`, the perceptual network no restorer trains
    on; overall and per level) of d's restorations and the lattice they paint (periodic-artifact score minus the
    ground truth's; 0: none). `evaluate(d, full=True)` adds the metric it trains on (`trained`), PSNR and SSIM,
    overall and per level (the first and last points of a run). Keys are `heldout_<metric>[_level<k>]`.
    Picklable for worker processes. `sample`: encode with a posterior sample (True) or the variant's own latent
    mode (None: `cfg.latent`). `full_at_start`: the full set at step 0 too (the prior's own one step: the floor)."""

    def __init__(self, lq: torch.Tensor, hq: torch.Tensor, lv: np.ndarray, seed: int = 0, sample: bool | None = True,
                 full_at_start: bool = False, *, trained: str, judge: str | None = None):
        from nifi_utils.measure.metrics import periodic_artifact

        self.lq, self.hq, self.lv, self.seed, self.sample = lq, hq, lv, seed, sample
        self.full_at_start = full_at_start
        self.trained, self.judge = trained, judge or judge_metric(trained)
        self.levels = sorted(set(lv.tolist()))
        self.gt_periodic = periodic_artifact(hq)

    @property
    def full(self) -> tuple[str, ...]:
        return (self.trained, "psnr", "ssim")

    def restored(self, d: "Distiller") -> torch.Tensor:
        return self.restore_with(d.r, d.cfg.t0, d.cfg.latent)

    def restore_with(self, r: Restorer, t0, latent: str) -> torch.Tensor:
        """The held-out inputs restored by `r` from `t0` (a distiller's restorer, or a prior with no LoRA)."""
        with torch.no_grad():
            sample = latent == "sample" if self.sample is None else self.sample
            return torch.cat([r.restore(self.lq[i:i + 8], t0=t0, seed=self.seed, sample=sample)
                              for i in range(0, len(self.lq), 8)])

    def scores(self, out: torch.Tensor, full: bool = False) -> dict:
        """The held-out scores of restored (or any) images `out` against the ground truth."""
        from nifi_utils.measure.metrics import flat_excess, image_metrics, periodic_artifact

        names = [self.judge, *(self.full if full else ())]
        m = image_metrics(out, self.hq, names)
        res = {"heldout_periodic_excess": float((periodic_artifact(out) - self.gt_periodic).mean())}
        if full:
            res["heldout_flat_excess"] = float(flat_excess(out, self.hq).mean())
        for k in names:
            res[f"heldout_{k}"] = float(m[k].mean())
            res.update({f"heldout_{k}_level{lv}": float(m[k][self.lv == lv].mean()) for lv in self.levels})
        return res

    def __call__(self, d: "Distiller", full: bool = False) -> dict:
        return self.scores(self.restored(d), full)


def train_variant(name: str, cfg: DistillConfig, base_model: str | Path, ckpt: str | Path, out_path: str | Path,
                  pairs: PairSet, evaluate: HeldoutEval, device="cpu") -> dict:
    """Distil one variant from the prior, seeded from `cfg.seed` alone (so it does not matter which process or
    which other variants ran before); resumes from `ckpt`, exports `out_path`. Its result record and history.
    Under `accelerate launch`, every rank calls it; the main process evaluates, exports and returns the record,
    the others return None."""
    import resource
    import time

    from nifi_utils.core.common import seed_everything

    seed_everything(cfg.seed)
    d = Distiller(Restorer.from_pretrained(base_model, device=device), cfg)
    main = d.acc.is_main_process
    if Distiller.has_checkpoint(ckpt):
        d.load_checkpoint(ckpt)
        if main:
            print(f"{name}: resuming at step {d.step}", flush=True)
    t = time.time()
    if not d.history and main:
        d.history.append({"step": 0, **evaluate(d, full=getattr(evaluate, "full_at_start", False))})
    d.train(pairs, cfg.steps, checkpoint_dir=Path(ckpt), evaluate=evaluate, desc=name)
    out = None
    if main:
        d.history[-1].update(evaluate(d, full=True))  # the last point with the metrics it never trained on
        d.export(out_path)
        result = {"config": config_dict(cfg), "seconds": time.time() - t, "final": d.history[-1],
                  "ckpt_bytes": Path(out_path).stat().st_size, "processes": d.acc.num_processes}
        judge = getattr(evaluate, "judge", None)  # a plain function (tests) has no judge to report
        print(f"{name}: {result['seconds']:.0f} s" + (f", held-out {judge} {d.history[-1]['heldout_' + judge]:.4f}"
                                                      if judge else ""), flush=True)
        out = {"name": name, "result": result, "history": d.history,
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    d.acc.wait_for_everyone()
    return out


def _variant_job(job: dict) -> dict:
    if isinstance(job["cfg"], DistillConfig):
        return train_variant(**job)
    from nifi_utils.models.regression import train_regression  # the regression baseline trains beside the variants

    return train_regression(**job)


def train_variants(jobs: list[dict], workers: int = 1) -> list[dict]:
    """`train_variant(**job)` for every job, over `workers` spawned processes (`workers.process_map`: one torch
    thread each on CPU: the small transformer gains 1.2x from a second thread, independent variants a core each);
    results in the order of `jobs`."""
    from nifi_utils.core.workers import process_map

    return process_map(_variant_job, jobs, workers, names=[j["name"] for j in jobs], what="variant", desc="variants")


def launch_variants(jobs: list[dict], processes: int) -> list[dict]:
    """`train_variant(**job)` for every job, one after another, each on `processes` ranks through `accelerate launch`
    (DDP); results in the order of `jobs`. A rank's error is one NifiError naming the rank and the variant, and no
    variant's export is left behind (a failed stage must not leave files DVC could take for its results)."""
    from nifi_utils.core.launch import launch

    try:
        return launch("nifi_utils.models.distill", jobs, processes, what="variant")
    except NifiError:
        for j in jobs:
            Path(j["out_path"]).unlink(missing_ok=True)
        raise


def rank_main(argv: list[str] | None = None) -> int:
    """One rank of `launch_variants`: `python -m nifi_utils.models.distill JOBS.pkl RESULTS.pkl` under `accelerate launch`."""
    import sys

    from accelerate import PartialState

    from nifi_utils.core.launch import finish_rank, rank_jobs, run_rank_jobs

    jobs_path, results_path = argv if argv is not None else sys.argv[1:]
    state = PartialState(cpu=not torch.cuda.is_available())
    jobs = rank_jobs(state, jobs_path)
    # every rank runs every variant (DDP inside each); the main process's records are the results
    done = run_rank_jobs(state.process_index, jobs, lambda job: train_variant(**{**job, "device": str(state.device)}),
                         lambda job: job["name"], "variant")
    return finish_rank(state, results_path, done)


if __name__ == "__main__":
    import sys

    from nifi_utils.models.distill import rank_main as _rank_main  # the package's module, not a second copy as __main__

    sys.exit(_rank_main())
