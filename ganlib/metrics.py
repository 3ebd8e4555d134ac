"""Quality metrics (FID, KID, precision/recall) through torch-fidelity, with cached real features.

All three numbers come from `torch_fidelity.calculate_metrics`, fed in memory (no PNG round trip).
Real-image features are computed once per (real set, extractor, ...) by the main process and kept
in `<cache>/stats/<key>.safetensors`, as StyleGAN's metric code keys its dataset statistics. The
key covers everything that changes them: the real set's name and content, image shape and count,
the extractor, its feature layer and weights, and the torch-fidelity version.

Counts: the generated count is `MetricConfig.num_samples`; the real set is all target images given,
and must hold at least as many images as are generated (else a UserError suggesting a smaller
`num_samples`), unless `more_fake_than_real` (the few-shot protocol: 5,000 samples against test sets
of a few hundred to a few thousand images). KID's subset size defaults to min(1000, generated, real).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_fidelity
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from ganlib.cache import cache_root
from ganlib.data import to_uint8
from ganlib.distributed import broadcast_object, gather_floats, unwrap
from ganlib.errors import UserError
from ganlib.extractors import EXTRACTORS, ExtractorInfo, resolve_weights, weights_fingerprint

MIN_SAMPLES = 10          # below this FID/KID/PR are meaningless (PR needs > 3 neighbours per set)
KID_SUBSET_MAX = 1000     # torch-fidelity's default KID subset size, used when enough images exist
NONFINITE_REASON = "generator produced NaN/inf images"


@dataclass(frozen=True)
class MetricConfig:
    """How quality is measured; validated by `validate()` (compute_metrics/evaluate_generator call it)."""

    extractor: str = "lenet-mnist5k"      # name in ganlib.extractors.EXTRACTORS; recorded with every result
    num_samples: int = 1000               # generated images per evaluation (CPU default; GPU presets: 10,000)
    kid_subset_size: int | None = None    # KID subset size; None = min(1000, generated, real)
    precision_recall: bool = True         # also compute improved precision/recall (k=3 neighbours)
    inception_weights: str | None = None  # local Inception weights file; None = $GANBENCH_INCEPTION_WEIGHTS
    allow_download: bool = False          # let torch-fidelity download Inception weights if none are local
    cache_dir: str | None = None          # cache root; None = $GANBENCH_CACHE or ~/.cache/ganbench (uses stats/)
    batch_size: int = 250                 # images per feature-extractor forward pass
    more_fake_than_real: bool = False     # allow more generated images than real ones (FID estimates each
                                          # set's statistics separately; precision/recall's k-NN too)

    def validate(self) -> MetricConfig:
        """Raise a one-line UserError for a bad field; return self."""
        EXTRACTORS.get(self.extractor)
        if not isinstance(self.num_samples, int) or self.num_samples < MIN_SAMPLES:
            raise UserError(f"metrics num_samples={self.num_samples!r}: expected an integer >= {MIN_SAMPLES}")
        if self.kid_subset_size is not None and not (2 <= self.kid_subset_size <= self.num_samples):
            raise UserError(f"metrics kid_subset_size={self.kid_subset_size!r}: expected 2..num_samples "
                            f"({self.num_samples}) or None for automatic")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserError(f"metrics batch_size={self.batch_size!r}: expected a positive integer")
        return self

    def stats_dir(self) -> Path:
        """Directory of cached real-image features."""
        return cache_root(self.cache_dir) / "stats"


class ImageTensorDataset(Dataset):
    """uint8 [N, C, H, W] images as torch-fidelity wants them: one uint8 [3, H, W] tensor per item."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        img = self.images[i]
        return img.expand(3, -1, -1).contiguous() if img.shape[0] == 1 else img


def check_counts(num_fake: int, num_real: int) -> None:
    """The real set must hold at least as many images as are generated (one-line UserError otherwise)."""
    if num_real < num_fake:
        raise UserError(f"the real set has {num_real} images, fewer than the {num_fake} generated samples "
                        f"to compare with; set metrics num_samples <= {num_real} or use a larger target set")


def kid_subset_size(cfg: MetricConfig, num_fake: int, num_real: int) -> int:
    """KID subset size: the configured one, else min(1000, generated, real) so torch-fidelity never asserts."""
    return cfg.kid_subset_size or min(KID_SUBSET_MAX, num_fake, num_real)


def _check_images(name: str, images: torch.Tensor) -> None:
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4 \
            or images.shape[1] not in (1, 3):
        got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise UserError(f"{name} images are {got}; expected a uint8 tensor [N, 1 or 3, H, W]")


def real_cache_path(real: torch.Tensor, real_key: str, cfg: MetricConfig) -> Path:
    """Where the real set's features for `cfg.extractor` are cached.

    `real_key` names the set (the dataset spec string and split, e.g. "mnist5k:classes=5-9/train");
    it keeps file names readable, while a digest of the pixels guards against a reused name.
    """
    info = EXTRACTORS.get(cfg.extractor)
    weights = resolve_weights(cfg.extractor, cfg.inception_weights, cfg.allow_download)
    fields = {
        "real_key": real_key, "extractor": cfg.extractor, "fidelity_extractor": info.fidelity_name,
        "feature_layer": info.feature_layer, "weights": weights_fingerprint(cfg.extractor, weights),
        "shape": list(real.shape), "torch_fidelity": torch_fidelity.__version__,
        "pixels_blake2b": hashlib.blake2b(real.cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", real_key)[:60]
    return cfg.stats_dir() / f"{slug}-{cfg.extractor}-n{real.shape[0]}-{digest}.safetensors"


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file so readers see the old file or the whole new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is as readable as any other
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def features_sha256(features: torch.Tensor) -> str:
    """Hex SHA-256 of a feature tensor's bytes (stored in the cache file's metadata, checked on load)."""
    return hashlib.sha256(features.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _load_cached(path: Path) -> torch.Tensor | None:
    """Cached real features, or None when absent, unreadable or not matching their checksum (then
    they are recomputed and the file rewritten): damaged features would give a wrong FID silently."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            expected = (f.metadata() or {}).get("sha256")
            features = f.get_tensor("features").clone()
    except Exception as err:  # a damaged cache file must not stop an evaluation
        warnings.warn(f"ignoring unreadable metrics cache {path}: {err}", stacklevel=2)
        return None
    if expected != features_sha256(features):
        why = "has no checksum" if expected is None else "does not match its checksum"
        warnings.warn(f"ignoring metrics cache {path}: it {why}; recomputing", stacklevel=2)
        return None
    return features


def _fidelity(fake: torch.Tensor, real: torch.Tensor, cache_file: Path, info: ExtractorInfo,
              weights: str | None, kid_subset: int, precision_recall: bool, batch_size: int,
              cuda: bool) -> tuple[dict, bool]:
    """Run torch_fidelity.calculate_metrics, reusing/writing our cached real features.

    torch-fidelity's own cache pickles its files and loads them with weights_only=False, so it only
    ever sees a private temporary directory: we copy our safetensors features in before the call
    (a hit: the real images are not processed) and copy them out after it (a miss).
    """
    features = _load_cached(cache_file)
    name = cache_file.stem
    layer = info.feature_layer
    with tempfile.TemporaryDirectory(prefix="ganbench-fidelity-") as tmp:
        fidelity_file = Path(tmp) / f"{name}-{info.fidelity_name}-features-{layer}.pt"
        if features is not None:
            torch.save(features, fidelity_file)
        raw = torch_fidelity.calculate_metrics(
            input1=ImageTensorDataset(fake), input2=ImageTensorDataset(real),
            input2_cache_name=name, cache_root=tmp, cache=True,
            fid=True, kid=True, prc=precision_recall,
            feature_extractor=info.fidelity_name, feature_extractor_weights_path=weights,
            feature_layer_fid=layer, feature_layer_kid=layer, feature_layer_prc=layer,
            kid_subset_size=kid_subset, batch_size=batch_size, cuda=cuda,
            save_cpu_ram=True,  # no DataLoader worker processes for in-memory tensors
            verbose=False,
        )
        if features is None:
            new = torch.load(fidelity_file, map_location="cpu", weights_only=True)
            meta = {"extractor": info.fidelity_name, "feature_layer": layer,
                    "torch_fidelity": torch_fidelity.__version__, "sha256": features_sha256(new)}
            _save_atomic({"features": new.contiguous()}, cache_file, meta)
    return raw, features is not None


def failed_result(reason: str) -> dict:
    """The metrics of an evaluation that could not be scored (the run goes on)."""
    return {"quality/status": "failed", "quality/reason": reason}


def compute_metrics(fake: torch.Tensor, real: torch.Tensor, real_key: str, cfg: MetricConfig,
                    device: str | torch.device = "cpu") -> dict:
    """FID, KID (and precision/recall) of generated vs real images; call on ONE process (the main one).

    fake: uint8 [N, C, H, W] (float in [-1, 1] is accepted and converted; NaN/inf gives the failed
    dict); real: uint8 [M, C, H, W] with M >= N, same C, H, W. Keys: quality/{fid, kid_mean, kid_std,
    precision, recall, extractor, num_samples (= N), num_real, kid_subset_size, real_cached, eval_s}.
    `device` picks where the extractor runs (torch-fidelity's `cuda` flag).
    """
    t0 = time.perf_counter()
    cfg.validate()
    if torch.is_tensor(fake) and fake.is_floating_point():
        if not torch.isfinite(fake).all():
            return failed_result(NONFINITE_REASON)
        fake = to_uint8(fake)
    _check_images("generated", fake)
    _check_images("real", real)
    if fake.shape[1:] != real.shape[1:]:
        raise UserError(f"generated images are {tuple(fake.shape[1:])} but real images are "
                        f"{tuple(real.shape[1:])}; generate at the target's channels and size")
    num_fake, num_real = fake.shape[0], real.shape[0]
    if num_fake < MIN_SAMPLES:
        raise UserError(f"{num_fake} generated images: expected at least {MIN_SAMPLES}")
    if not cfg.more_fake_than_real:
        check_counts(num_fake, num_real)
    if cfg.kid_subset_size is not None and cfg.kid_subset_size > num_fake:
        raise UserError(f"metrics kid_subset_size={cfg.kid_subset_size} exceeds the {num_fake} generated "
                        f"images; lower it or leave it None")
    info = EXTRACTORS.get(cfg.extractor)
    weights = resolve_weights(cfg.extractor, cfg.inception_weights, cfg.allow_download)
    subset = kid_subset_size(cfg, num_fake, num_real)
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    raw, cached = _fidelity(fake.cpu(), real.cpu(), real_cache_path(real, real_key, cfg), info, weights,
                            subset, cfg.precision_recall, cfg.batch_size, cuda)

    out = {
        "quality/fid": float(raw[torch_fidelity.KEY_METRIC_FID]),
        "quality/kid_mean": float(raw[torch_fidelity.KEY_METRIC_KID_MEAN]),
        "quality/kid_std": float(raw[torch_fidelity.KEY_METRIC_KID_STD]),
    }
    if cfg.precision_recall:
        out["quality/precision"] = float(raw[torch_fidelity.KEY_METRIC_PRECISION])
        out["quality/recall"] = float(raw[torch_fidelity.KEY_METRIC_RECALL])
    if not all(math.isfinite(v) for v in out.values()):
        return failed_result(f"torch-fidelity returned non-finite metrics {out}")
    out.update({
        "quality/extractor": cfg.extractor, "quality/num_samples": num_fake, "quality/num_real": num_real,
        "quality/kid_subset_size": subset, "quality/real_cached": cached,
        "quality/eval_s": time.perf_counter() - t0,
    })
    return out


def _share(total: int, num_processes: int, index: int) -> int:
    """How many of `total` samples process `index` generates (the first total % P get one more)."""
    return total // num_processes + (1 if index < total % num_processes else 0)


def evaluate_generator(accelerator, G: torch.nn.Module, real: torch.Tensor, real_key: str,
                       cfg: MetricConfig, seed: int, batch_size: int = 256, transform_z=None,
                       extra=None) -> dict:
    """Generate `cfg.num_samples` images across all processes and score them; call on EVERY process.

    Each process draws its share of latents from a CPU generator seeded with `seed + process_index`,
    runs G (unwrapped from DDP) in eval mode under no_grad, and converts to uint8; exactly
    num_samples images reach the main process (padding is trimmed), which runs compute_metrics;
    every process returns the same dict. NaN/inf output -> failed dict everywhere. `transform_z`
    maps z -> z' before G (e.g. MineGAN's miner). G's train/eval mode is restored afterwards.
    `extra(fake) -> dict` runs on the main process with the same uint8 images [N, C, H, W] (CPU)
    after a successful scoring, and its keys join the result (e.g. ganlib.fewshot's metrics), so
    further metrics need no second generation and still reach every process.
    """
    cfg.validate()                                     # everything that can raise does so before collectives,
    if not cfg.more_fake_than_real:                    # identically on every process
        check_counts(cfg.num_samples, real.shape[0])
    resolve_weights(cfg.extractor, cfg.inception_weights, cfg.allow_download)
    if cfg.num_samples < accelerator.num_processes:
        raise UserError(f"metrics num_samples={cfg.num_samples} is below the {accelerator.num_processes} "
                        "processes; every process must generate at least one sample")
    model = unwrap(accelerator, G)
    was_training = model.training
    rank, world = accelerator.process_index, accelerator.num_processes
    local_n = _share(cfg.num_samples, world, rank)
    gen = torch.Generator().manual_seed(seed + rank)
    chunks, all_finite = [], torch.ones((), dtype=torch.bool, device=accelerator.device)
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, local_n, batch_size):
                z = torch.randn(min(batch_size, local_n - start), model.latent_dim, generator=gen)
                z = z.to(accelerator.device)
                if transform_z is not None:
                    z = transform_z(z)
                x = model(z)
                all_finite &= torch.isfinite(x).all()  # no host sync per batch
                chunks.append(to_uint8(x))
    finally:
        model.train(was_training)

    if not all(gather_floats(accelerator, float(all_finite))):
        return failed_result(NONFINITE_REASON)
    local = torch.cat(chunks)
    if world > 1:
        padded = accelerator.gather(accelerator.pad_across_processes(local, dim=0))
        width = padded.shape[0] // world
        fake = torch.cat([padded[r * width:r * width + _share(cfg.num_samples, world, r)] for r in range(world)])
    else:
        fake = local

    payload = None
    if accelerator.is_main_process:
        try:
            scores = compute_metrics(fake, real, real_key, cfg, device=accelerator.device)
            if extra is not None and scores.get("quality/status") != "failed":
                scores.update(extra(fake.cpu()))
            payload = ("ok", scores)
        except Exception as err:  # every process must leave the broadcast, then all raise
            payload = ("error", err)
    kind, value = broadcast_object(accelerator, payload)
    if kind == "error":
        if accelerator.is_main_process:
            raise value
        raise (UserError(str(value)) if isinstance(value, UserError)
               else RuntimeError(f"metrics failed on the main process: {value!r}"))
    return value

