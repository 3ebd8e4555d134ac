"""CDC's intra-LPIPS (Ojha et al., CVPR 2021): the diversity number few-shot adaptation papers report.

FID against a few-shot target cannot tell a generator that copies its 10 training images from one
that makes new ones; intra-LPIPS can. The protocol, as the official code runs it
(utkarshojha/few-shot-gan-adaptation, `feat_cluster.py`, `intra_cluster_dist`, and its README):
generate 1,000 images; put each in the cluster of the training image nearest to it by LPIPS; in
each cluster take at most 50 members at random and average LPIPS-VGG (v0.1) over all their pairs
i < j, images resized to 256x256 and scaled to [-1, 1]; report the mean over clusters. A cluster
with fewer than two members has no pair: the official code gets NaN for it and leaves it out of
the mean, as we do.

Departures from the official code: the 50 members are a seeded choice (there: an unseeded
`random.shuffle`), so a rerun gives the same number; images are resized with torch's antialiased
bilinear interpolation (there: PIL's bilinear Resize), which is exact at the field's native 256 px;
the assignment step is ours (the official release ships the clusters, not the code that made
them); each image goes through the backbone once and LPIPS is taken between its cached features
(there: one LPIPS call per pair), the same formula in fewer passes.

Nothing here downloads: LPIPS needs torchvision's ImageNet weights for its backbone, and
`unavailable_reason` says how to fetch them when they are not already in torch hub's cache.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ganlib.errors import UserError

SAMPLES = 1000          # generated images scored (CDC: 1,000); fewer when fewer were generated
MEMBERS = 50            # members of one cluster whose pairs are averaged (official feat_cluster.py: 50)
NET = "vgg"             # LPIPS backbone of the official code
SIZE = 256              # px; the official code resizes every image to 256x256 before LPIPS
MEMBER_SEED = 0         # seeds the choice of MEMBERS among a larger cluster's samples
BATCH = 50              # images per backbone pass (VGG at 256 px keeps ~30 MB of features per image)
PAIR_CHUNK = 32         # image pairs whose feature differences are held at once

# LPIPS backbone -> the torchvision weights enum whose IMAGENET1K_V1 lpips loads (`pretrained=True`)
BACKBONE_WEIGHTS = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def backbone_weights(net: str) -> tuple[str, Path]:
    """The URL of `net`'s ImageNet weights and the file torch hub keeps them in (it may be absent)."""
    import torchvision.models  # noqa: PLC0415 (only when LPIPS is asked for)

    url = getattr(torchvision.models, BACKBONE_WEIGHTS[net]).IMAGENET1K_V1.url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def unavailable_reason(net: str = NET) -> str | None:
    """Why LPIPS-`net` cannot run on this machine without a download (one line), or None when it can."""
    if importlib.util.find_spec("lpips") is None:
        return "the lpips package is not installed: pip install 'ganbench[lpips]'"
    url, file = backbone_weights(net)
    if not file.is_file():
        return (f"LPIPS-{net} needs torchvision's ImageNet weights {file.name} in {file.parent} (never downloaded "
                f"at run time): run once with network python -c 'import lpips; lpips.LPIPS(net=\"{net}\")', "
                f"or put {url} there")
    return None


def build_model(net: str = NET, device: str | torch.device = "cpu") -> torch.nn.Module:
    """LPIPS-`net` (v0.1, linear layers calibrated on human judgements) in eval mode on `device`.

    Checks `unavailable_reason` first, so it never reaches lpips's download of the backbone.
    """
    reason = unavailable_reason(net)
    if reason is not None:
        raise UserError(reason)
    import lpips  # noqa: PLC0415 (an optional dependency)

    # lpips 0.1.4 asks torchvision for `pretrained=True` (deprecated: a warning), i.e. IMAGENET1K_V1, the file checked
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision.models._utils")
        return lpips.LPIPS(net=net, verbose=False).eval().to(device)


def _prepare(images: torch.Tensor, size: int, device) -> torch.Tensor:
    """uint8 [N, 1|3, H, W] -> float32 RGB in [-1, 1] at size x size, as LPIPS expects."""
    x = images.to(device).float() / 127.5 - 1
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _features(model, images: torch.Tensor, size: int, device) -> list[torch.Tensor]:
    """The unit-normalised backbone features LPIPS compares, one tensor per layer, for a batch of images."""
    import lpips  # noqa: PLC0415

    outs = model.net(model.scaling_layer(_prepare(images, size, device)))
    return [lpips.normalize_tensor(f) for f in outs]


def _pair_distances(model, feats_a: list[torch.Tensor], feats_b: list[torch.Tensor],
                    ia: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
    """LPIPS of the image pairs (feats_a[ia[p]], feats_b[ib[p]]): LPIPS's own formula on cached features.

    Per layer: the calibrated 1x1 linear layer on the squared feature difference, averaged over
    space; summed over layers. Returns float32 [P] on the CPU.
    """
    out = []
    for s in range(0, ia.numel(), PAIR_CHUNK):
        a, b = ia[s:s + PAIR_CHUNK], ib[s:s + PAIR_CHUNK]
        d = sum(lin((fa[a] - fb[b]) ** 2).mean(dim=(2, 3)) for lin, fa, fb in zip(model.lins, feats_a, feats_b))
        out.append(d.flatten().float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _feature_batches(model, images: torch.Tensor, size: int, device, batch_size: int):
    """(start, features) for consecutive batches of `images`."""
    for start in range(0, images.shape[0], batch_size):
        yield start, _features(model, images[start:start + batch_size], size, device)


@torch.no_grad()
def nearest_shot(fake: torch.Tensor, shots: torch.Tensor, model, device="cpu", batch_size: int = BATCH,
                 size: int = SIZE) -> torch.Tensor:
    """int64 [N]: for each generated image, the index of the training shot with the lowest LPIPS."""
    k = shots.shape[0]
    shot_feats = _features(model, shots, size, device)
    nearest = []
    for _, feats in _feature_batches(model, fake, size, device, batch_size):
        b = feats[0].shape[0]
        ia = torch.arange(b, device=feats[0].device).repeat_interleave(k)
        ib = torch.arange(k, device=feats[0].device).repeat(b)
        nearest.append(_pair_distances(model, feats, shot_feats, ia, ib).view(b, k).argmin(dim=1))
    return torch.cat(nearest)


@torch.no_grad()
def cluster_lpips(members: torch.Tensor, model, device="cpu", size: int = SIZE) -> torch.Tensor:
    """LPIPS of every pair i < j of `members` (uint8 [M, C, H, W]), float32 [M * (M - 1) / 2]."""
    feats = _features(model, members, size, device)
    i, j = torch.triu_indices(members.shape[0], members.shape[0], offset=1, device=feats[0].device)
    return _pair_distances(model, feats, feats, i, j)


def intra_lpips(fake: torch.Tensor, shots: torch.Tensor, model, device: str | torch.device = "cpu",
                batch_size: int = BATCH, size: int = SIZE, members: int = MEMBERS,
                seed: int = MEMBER_SEED) -> tuple[float | None, list[int]]:
    """CDC's intra-LPIPS of generated images `fake` (uint8 [N, C, H, W]) around the training `shots` ([k, C, H, W]).

    Returns the mean over clusters of two or more members of each cluster's mean pairwise LPIPS
    (None when no shot is the nearest of two samples: there is no pair to measure), and the k
    cluster sizes (samples nearest to each shot, before the `members` cap). fp32 throughout; the
    caller picks N (CDC: SAMPLES) and the model (build_model: LPIPS-VGG).
    """
    assign = nearest_shot(fake, shots, model, device, batch_size, size)
    sizes = torch.bincount(assign, minlength=shots.shape[0]).tolist()
    gen = torch.Generator().manual_seed(seed)
    means = []
    for shot, count in enumerate(sizes):
        if count < 2:
            continue
        index = (assign == shot).nonzero().flatten()
        if count > members:
            index = index[torch.randperm(count, generator=gen)[:members]]
        means.append(cluster_lpips(fake[index], model, device, size).double().mean().item())
    return (sum(means) / len(means) if means else None), sizes


def intra_lpips_metrics(fake: torch.Tensor, shots: torch.Tensor, device: str | torch.device = "cpu") -> dict:
    """`transfer/intra_lpips*` keys of a few-shot cell's final samples, CDC's protocol; never raises for
    missing weights: the value is None and `transfer/intra_lpips_reason` says why and how to fix it."""
    fake = fake[:SAMPLES]
    out: dict = {"transfer/intra_lpips": None, "transfer/intra_lpips_samples": int(fake.shape[0])}
    reason = unavailable_reason(NET)
    if reason is None:
        value, sizes = intra_lpips(fake, shots, build_model(NET, device), device, size=SIZE)
        out["transfer/intra_lpips"] = value
        out["transfer/intra_lpips_clusters"] = sum(1 for s in sizes if s >= 2)
        if value is None:
            reason = "no training image is the nearest (by LPIPS) of two or more samples"
    if reason is not None:
        out["transfer/intra_lpips_reason"] = reason
    return out
