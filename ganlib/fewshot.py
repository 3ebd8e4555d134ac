"""Transfer-fidelity metrics: did the generator reach the target, and does it copy the few shots?

FID against the whole target domain hides the two failure modes of few-shot adaptation: staying
on the source (the samples are good digits, of the wrong classes) and memorising the n training
images (or collapsing onto a few of them). Each gets its own numbers here, all under `transfer/`:

- class metrics, where the target selects classes of a dataset whose labels the extractor's
  classifier head predicts: `target_class_share` (share of samples classified into the target
  classes) and `class_coverage` (normalised entropy of the predicted-class histogram over the
  target classes: 1 = every target class equally often, 0 = one class only);
- memorisation, for a few-shot target (a spec with `n`): each sample's distance to its nearest
  training image against the same distance for held-out real images of the target domain (the
  domain's images outside the n): `memorised_share` (samples closer than the held-out reals' 5th
  percentile: a copier scores ~1, a generator of new images ~0.05) and `nn_dist_ratio` (median
  over median);
- intra-LPIPS, for a few-shot target when asked for: CDC's protocol to the letter (LPIPS-VGG
  clusters, 1,000 samples, 256 px; ganlib.intra_lpips), the number papers publish;
- diversity, for a few-shot target: CDC's intra-cluster measure (Ojha et al. 2021): assign each
  sample to its nearest training image, average the pairwise distance inside each cluster with
  two or more samples, average over those clusters. LPIPS when the `lpips` package and its AlexNet
  weights are on this machine (never downloaded), else the extractor's feature space.

A metric that does not apply is absent and a `*_reason` key says why; that is not an error.
Everything runs on one process (ganlib.metrics.evaluate_generator calls it on the main one).
"""

from __future__ import annotations

import collections
import hashlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch_fidelity.utils import create_feature_extractor

from ganlib.data import ImageSet, choose_subset
from ganlib.data.spec import DataSpec
from ganlib.extractors import EXTRACTORS, resolve_weights, weights_fingerprint
from ganlib.intra_lpips import build_model, intra_lpips_metrics, unavailable_reason

MEMORISED_QUANTILE = 0.05      # a sample is "memorised" when closer to a training image than this
                               # quantile of the held-out reals' nearest-training distances
MIN_CLASSIFIER_ACCURACY = 0.9  # below this accuracy on the target's real images, class metrics would
                               # measure the classifier, not the generator: they are left out
LPIPS_MIN_SIZE = 64            # px; AlexNet's pooling needs >= 64 px inputs (28 px digits are upscaled)
DIVERSITY_REFERENCE_SEED = 0   # seeds the held-out subset the real-image diversity reference uses


@dataclass(frozen=True)
class Classifier:
    """An extractor's classifier head and the datasets whose labels it predicts (same label ids)."""

    logits: str                    # torch-fidelity feature name of the logits
    datasets: tuple[str, ...]      # DataSpec names whose labels are the logits' indices


# Extractor name -> its classifier. lenet-mnist5k predicts the digits 0-9, which are the labels of
# the MNIST family and of scikit-learn's 8x8 digits; whether it recognises a set's real images well
# enough is measured per cell (MIN_CLASSIFIER_ACCURACY), not assumed: on `digits` it does not (~69%).
CLASSIFIERS: dict[str, Classifier] = {
    "lenet-mnist5k": Classifier(logits="logits", datasets=("mnist5k", "mnist", "digits")),
}


@dataclass
class TransferResult:
    """The metrics (flat `transfer/*` keys) and, for a few-shot target, each sample's nearest shot."""

    metrics: dict
    nearest: torch.Tensor | None = None   # int64 [N]: index into the training images, or None


# --- features ------------------------------------------------------------------------------------

_MEMO: collections.OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = collections.OrderedDict()
MEMO_SIZE = 2   # target domains whose features a worker keeps (cells of one pair share one domain)


def extract(images: torch.Tensor, extractor: str, with_logits: bool, device: str | torch.device = "cpu",
            batch_size: int = 250, inception_weights: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features (the extractor's metric layer) and optionally logits of uint8 [N, 1|3, H, W] images.

    Returns float32 CPU tensors [N, D] and [N, K] (or None). One forward pass yields both.
    """
    info = EXTRACTORS.get(extractor)
    names = [info.feature_layer] + ([CLASSIFIERS[extractor].logits] if with_logits else [])
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    net = create_feature_extractor(info.fidelity_name, names, cuda=cuda, verbose=False,
                                   feature_extractor_weights_path=resolve_weights(extractor, inception_weights))
    feats, logits = [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size]
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # torch-fidelity extractors take RGB
            out = net(x.to("cuda" if cuda else "cpu"))
            feats.append(out[0].float().cpu())
            if with_logits:
                logits.append(out[1].float().cpu())
    return torch.cat(feats), (torch.cat(logits) if with_logits else None)


def _domain_features(images: torch.Tensor, extractor: str, with_logits: bool, **kwargs):
    """`extract` of the target domain, memoised by pixels and extractor (every cell of a pair asks)."""
    digest = hashlib.blake2b(images.contiguous().numpy().tobytes(), digest_size=16).hexdigest()
    key = (extractor, weights_fingerprint(extractor, resolve_weights(extractor, kwargs.get("inception_weights"))),
           with_logits, tuple(images.shape), digest)
    if key not in _MEMO:
        _MEMO[key] = extract(images, extractor, with_logits, **kwargs)
        while len(_MEMO) > MEMO_SIZE:
            _MEMO.popitem(last=False)
    _MEMO.move_to_end(key)
    return _MEMO[key]


# --- class metrics -------------------------------------------------------------------------------

def class_metrics_reason(target: DataSpec, extractor: str, labeled: bool) -> str | None:
    """Why class metrics do not apply to `target` (None: they do, subject to classifier accuracy)."""
    if extractor not in CLASSIFIERS:
        return f"extractor {extractor} has no classifier head"
    if not labeled:
        return f"target {target} has no labels"
    if target.name not in CLASSIFIERS[extractor].datasets:
        return (f"the {extractor} classifier predicts the labels of {', '.join(CLASSIFIERS[extractor].datasets)}, "
                f"not of {target.name}")
    if target.classes is None:
        return f"target {target} selects no classes (every prediction would be a target class)"
    return None


def class_share_and_coverage(predicted: torch.Tensor, classes: tuple[int, ...]) -> dict:
    """Target-class share and normalised entropy of the predicted-class histogram over `classes`.

    predicted: int64 [N] class ids. Coverage needs two or more target classes (log K = 0 for one):
    with one it is absent and `transfer/class_coverage_reason` says so. No sample in a target
    class: coverage 0 (the histogram covers nothing).
    """
    inside = torch.isin(predicted, torch.tensor(classes))
    out = {"transfer/target_class_share": inside.float().mean().item()}
    if len(classes) < 2:
        out["transfer/class_coverage_reason"] = "one target class: coverage (entropy over classes) is undefined"
        return out
    counts = torch.tensor([(predicted == c).sum().item() for c in classes], dtype=torch.float64)
    if counts.sum() == 0:
        out["transfer/class_coverage"] = 0.0
        return out
    p = counts[counts > 0] / counts.sum()
    entropy = -(p * p.log()).sum().item()
    out["transfer/class_coverage"] = max(0.0, entropy / math.log(len(classes)))  # one class: 0.0, not -0.0
    return out


# --- memorisation and diversity ------------------------------------------------------------------

def nearest_neighbours(query: torch.Tensor, keys: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance [N] from each query row to its nearest key row, and that key's index [N]."""
    dists, index = [], []
    for start in range(0, query.shape[0], chunk):
        d = torch.cdist(query[start:start + chunk].double(), keys.double())
        best = d.min(dim=1)
        dists.append(best.values)
        index.append(best.indices)
    return torch.cat(dists).float(), torch.cat(index)


def memorisation(fake_nn: torch.Tensor, heldout_nn: torch.Tensor) -> dict:
    """`memorised_share` and `nn_dist_ratio` from nearest-training distances of samples and held-out reals."""
    threshold = torch.quantile(heldout_nn.double(), MEMORISED_QUANTILE).item()
    median_ref = heldout_nn.median().item()
    out = {
        "transfer/memorised_share": (fake_nn <= threshold).float().mean().item(),
        "transfer/memorised_threshold": threshold,
        "transfer/num_heldout": int(heldout_nn.numel()),
    }
    if median_ref > 0:  # 0 only when every held-out real duplicates a shot: no scale to compare with
        out["transfer/nn_dist_ratio"] = fake_nn.median().item() / median_ref
    return out


def feature_distances(feats: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances over the rows of one cluster, i < j (the diversity's distance)."""
    return torch.pdist(feats.double())


def intra_cluster_diversity(items: torch.Tensor, assign: torch.Tensor, pairwise) -> tuple[float | None, int, int]:
    """CDC's intra-cluster diversity: mean over clusters (>= 2 members) of the mean pairwise distance.

    items: one row per sample (features, or images for LPIPS); assign: int64 [N] cluster ids;
    pairwise(rows) -> distances of all pairs i < j of those rows. Returns (diversity or None when no
    cluster has two members, clusters with >= 2 members, clusters with one member).
    """
    means, singletons = [], 0
    for cluster in assign.unique().tolist():
        members = items[assign == cluster]
        if members.shape[0] < 2:
            singletons += 1
            continue
        means.append(pairwise(members).double().mean().item())
    return (sum(means) / len(means) if means else None), len(means), singletons


def lpips_distances(device: str | torch.device = "cpu"):
    """An LPIPS (AlexNet) pairwise-distance function for uint8 images, or None when not available offline.

    Needs the `lpips` package and torchvision's AlexNet weights already in the torch hub cache: we
    never download. Images are grey-to-RGB expanded and upscaled to LPIPS_MIN_SIZE when smaller.
    """
    if unavailable_reason("alex") is not None:
        return None
    net = build_model("alex", device)

    def to_input(images: torch.Tensor) -> torch.Tensor:
        x = images.to(device).float() / 127.5 - 1
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        if x.shape[-1] < LPIPS_MIN_SIZE:
            x = F.interpolate(x, size=(LPIPS_MIN_SIZE, LPIPS_MIN_SIZE), mode="bilinear", align_corners=False)
        return x

    def pairwise(images: torch.Tensor) -> torch.Tensor:
        i, j = torch.triu_indices(images.shape[0], images.shape[0], offset=1)
        x = to_input(images)
        with torch.no_grad():
            return torch.cat([net(x[i[s:s + 256]], x[j[s:s + 256]]).flatten().cpu()
                              for s in range(0, i.numel(), 256)])

    return pairwise


# --- the whole measurement -----------------------------------------------------------------------

def fewshot_reason(target: DataSpec) -> str | None:
    """Why memorisation and diversity do not apply to `target` (None: it is few-shot)."""
    if target.n is None:
        return f"target {target} is not few-shot (no n=): there are no training shots to copy"
    return None


def training_positions(target: DataSpec, domain_size: int) -> torch.Tensor:
    """Positions of the n training shots within the whole target domain (`replace(target, n=None)`).

    The few-shot subset is chosen on the domain's indices (ganlib.data.load_images), so the
    domain's images at these positions are exactly the training images and the rest are held out.
    """
    return choose_subset(domain_size, target.n, target.seed)


def transfer_metrics(fake: torch.Tensor, target: DataSpec, domain: ImageSet, extractor: str,
                     device: str | torch.device = "cpu", batch_size: int = 250,
                     inception_weights: str | None = None, lpips: bool = True,
                     shots: torch.Tensor | None = None, intra_lpips: bool = False) -> TransferResult:
    """All `transfer/*` metrics of generated images against a target; call on ONE process.

    fake: uint8 [N, C, H, W]; target: the transfer spec (maybe with n); domain: the whole target
    domain as loaded for `replace(target, n=None)` (same size and channels as fake), with labels
    when the dataset has them. `shots`: the training images when they are not part of `domain` (the
    field's protocol scores against a separate test folder, all of it held out); None: they are the
    domain's images at `training_positions`. `lpips=False` forces feature-space diversity; `intra_lpips=True`
    adds CDC's intra-LPIPS for a few-shot target (ganlib.intra_lpips: LPIPS-VGG at 256 px, slow on a CPU).
    """
    t0 = time.perf_counter()
    kwargs = {"device": device, "batch_size": batch_size, "inception_weights": inception_weights}
    reason = class_metrics_reason(target, extractor, domain.labels is not None)
    with_logits = reason is None
    fake_feats, fake_logits = extract(fake, extractor, with_logits, **kwargs)
    real_feats, real_logits = _domain_features(domain.images, extractor, with_logits, **kwargs)
    out: dict = {}

    train_pos = training_positions(target, domain.images.shape[0]) if target.n is not None and shots is None else None
    heldout = torch.ones(domain.images.shape[0], dtype=torch.bool)
    if train_pos is not None:
        heldout[train_pos] = False

    if reason is None:
        # accuracy on the reals the generator never saw (all of the domain when none are held out)
        seen = heldout if heldout.any() else torch.ones_like(heldout)
        accuracy = (real_logits[seen].argmax(1) == domain.labels[seen]).float().mean().item()
        out["transfer/classifier_real_accuracy"] = accuracy
        if accuracy < MIN_CLASSIFIER_ACCURACY:
            reason = (f"the {extractor} classifier recognises only {accuracy:.0%} of {target.name}'s real "
                      f"target images (< {MIN_CLASSIFIER_ACCURACY:.0%})")
        else:
            out.update(class_share_and_coverage(fake_logits.argmax(1), target.classes))
    if reason is not None:
        out["transfer/class_metrics_reason"] = reason

    nearest = None
    reason = fewshot_reason(target)
    if reason is None:
        shots = domain.images[train_pos] if shots is None else shots
        train_feats = real_feats[train_pos] if train_pos is not None else extract(shots, extractor, False, **kwargs)[0]
        fake_nn, nearest = nearest_neighbours(fake_feats, train_feats)
        out["transfer/num_shots"] = int(train_feats.shape[0])
        if heldout.any():
            heldout_feats = real_feats[heldout]
            heldout_nn, heldout_nearest = nearest_neighbours(heldout_feats, train_feats)
            out.update(memorisation(fake_nn, heldout_nn))
        else:
            heldout_feats = heldout_nearest = None
            out["transfer/memorisation_reason"] = f"target {target} uses every image of its domain: none held out"
        out.update(_diversity(fake, fake_feats, nearest, domain.images[heldout], heldout_feats, heldout_nearest,
                              extractor, device if lpips else None))
        if intra_lpips:
            out.update(intra_lpips_metrics(fake, shots, device))
    else:
        out["transfer/fewshot_reason"] = reason
    out["transfer/eval_s"] = time.perf_counter() - t0
    return TransferResult(out, nearest)


def _diversity(fake, fake_feats, nearest, heldout_images, heldout_feats, heldout_nearest, extractor,
               lpips_device) -> dict:
    """Intra-cluster diversity of the samples and, as a yardstick, of as many held-out reals."""
    pairwise = lpips_distances(lpips_device) if lpips_device is not None else None
    if pairwise is not None:
        space, items, ref_items = "lpips-alex", fake, heldout_images
    else:
        space, items, ref_items, pairwise = f"features:{extractor}", fake_feats, heldout_feats, feature_distances
    value, clusters, singletons = intra_cluster_diversity(items, nearest, pairwise)
    out = {"transfer/diversity_space": space, "transfer/diversity_clusters": clusters,
           "transfer/diversity_singletons": singletons}
    if value is None:
        out["transfer/diversity_reason"] = "no training image is the nearest of two or more samples"
        return out
    out["transfer/diversity"] = value
    if ref_items is not None and ref_items.shape[0] > 0:
        # the same measure on held-out reals, as many as samples, so "how diverse is real data" is known
        gen = torch.Generator().manual_seed(DIVERSITY_REFERENCE_SEED)
        pick = torch.randperm(ref_items.shape[0], generator=gen)[:items.shape[0]]
        ref, _, _ = intra_cluster_diversity(ref_items[pick], heldout_nearest[pick], pairwise)
        if ref:
            out["transfer/diversity_real"] = ref
            out["transfer/diversity_vs_real"] = value / ref
    return out
