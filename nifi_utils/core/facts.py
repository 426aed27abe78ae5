"""Facts several layers share, defined once and torch-free (plots and statistics read them without torch):
the methods' order and labels, our codec's id, which way each metric is better, the test-view rule, which
perceptual network judges a restorer trained on another, and the official inference's t0."""
from __future__ import annotations

from nifi_utils.core.common import NifiError

# Table 1's row order: reference, unrestored, baselines, NiFi; anything else (external_*) right after the baselines
METHOD_ORDER = ["3dgs", "compressed", "bm3d", "regression", "img2img", "nifi", "nifi_no_tsd", "nifi_wo_t0", "nifi_3d",
                "nifi_3d_plus"]
LAST_BASELINE = "img2img"
METHOD_LABELS = {"3dgs": "3DGS (uncompressed)", "compressed": "compressed", "bm3d": "+ BM3D",
                 "regression": "+ regression U-Net", "img2img": "+ Img2Img",
                 "nifi": "+ NiFi", "nifi_no_tsd": "+ NiFi w/o TSD", "nifi_wo_t0": "+ NiFi w/o t0",
                 "nifi_3d": "NiFi-3D (refined 3DGS)", "nifi_3d_plus": "NiFi-3D + NiFi"}
NIFI_VARIANTS = ("nifi", "nifi_wo_t0", "nifi_no_tsd")
# NiFi-3D (the refine stage): the refined Gaussians rendered at the test cameras, and those renders restored
REFINED = ("nifi_3d", "nifi_3d_plus")

# the codec column of the lab's own `.nifi` rows (external codecs carry their own name)
OUR_CODEC = "nifi3dgs"

# True where a lower value is better
LOWER_IS_BETTER = {"psnr": False, "ssim": False, "stlpips_alex": True, "stlpips_vgg": True, "lpips_alex": True,
                   "lpips_vgg": True, "dists": True, "mv_consistency": True, "periodic": True, "periodic_excess": True,
                   "flat_excess": True}
METRIC_LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "stlpips_alex": "ST-LPIPS (alex)", "stlpips_vgg": "ST-LPIPS (vgg)",
                 "lpips_alex": "LPIPS (alex)", "lpips_vgg": "LPIPS (vgg)", "dists": "DISTS",
                 "mv_consistency": "multi-view inconsistency (GT = 1)",
                 "periodic": "periodic artifact (log10, 8-px lattice)",
                 "periodic_excess": "periodic artifact over GT's (log10)",
                 "flat_excess": "detail added where GT is flat (RMS)"}


def higher_is_better(metric: str) -> bool:
    return not LOWER_IS_BETTER.get(metric, True)


# the 3DGS literature's split (llffhold): test views are every 8th, from the first
TEST_EVERY = 8


def is_test_view(index: int, every: int = TEST_EVERY) -> bool:
    return index % every == 0


# a restorer trained on one perceptual network is judged on one it never sees: ST-LPIPS alex <-> vgg (cpu),
# DISTS for LPIPS (paper)
JUDGES = {"stlpips_alex": "stlpips_vgg", "stlpips_vgg": "stlpips_alex", "lpips_alex": "dists", "lpips_vgg": "dists"}


def judge_metric(perceptual: str) -> str:
    """The held-out judge of a restorer trained on `perceptual`, derived in one place from `distill.perceptual`,
    so a change of training loss can never leave the judge trained on."""
    if perceptual not in JUDGES:
        raise NifiError(f"no held-out judge for perceptual loss {perceptual!r}; known: {', '.join(JUDGES)}")
    return JUDGES[perceptual]


# the official inference's start timestep: the default for a checkpoint that does not say its own
OFFICIAL_T0 = 199
