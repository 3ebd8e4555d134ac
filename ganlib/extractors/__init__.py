"""Feature extractors for quality metrics, by name; weights are resolved here without surprise downloads.

Each entry names the torch-fidelity extractor and feature layer it stands for. Importing this module
registers the embedded `lenet-mnist5k` extractor with torch-fidelity so `calculate_metrics` finds it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ganlib.errors import UserError
from ganlib.extractors import lenet
from ganlib.registry import Registry

INCEPTION_WEIGHTS_ENV = "GANBENCH_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class ExtractorInfo:
    """One registered extractor: how torch-fidelity knows it and whether it needs the network."""

    fidelity_name: str      # name in torch-fidelity's FEATURE_EXTRACTORS_REGISTRY
    feature_layer: str      # layer used for FID, KID and precision/recall
    offline: bool           # True: weights ship with ganbench; False: a weights file or a download
    description: str


EXTRACTORS: Registry[ExtractorInfo] = Registry("extractor")

EXTRACTORS.register("lenet-mnist5k", ExtractorInfo(
    fidelity_name=lenet.NAME, feature_layer="128", offline=True,
    description="embedded 2-conv LeNet trained on mnist5k, 128-d penultimate features; grey, resized "
                "to 28 px; default; NOT comparable with Inception FID"))
EXTRACTORS.register("inception-v3-compat", ExtractorInfo(
    fidelity_name="inception-v3-compat", feature_layer="2048", offline=False,
    description="torch-fidelity's TF-compatible Inception-v3 (standard FID), 2048-d pool features; "
                f"offline needs a local weights file (MetricConfig.inception_weights or ${INCEPTION_WEIGHTS_ENV})"))

if lenet.NAME not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(lenet.NAME, lenet.FeatureExtractorLeNet)


def _inception_hub_cache() -> Path:
    """Where torch-fidelity's own download would have left the Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


_checked_weights: set[tuple[str, int, int]] = set()


def _check_plain_state_dict(path: Path) -> None:
    """Refuse a weights file that needs pickle beyond tensors (torch-fidelity loads it with weights_only=False)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _checked_weights:
        return
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"Inception weights {path} are not a plain state-dict file ({type(err).__name__}); "
                        f"use torch-fidelity's {INCEPTION_WEIGHTS_FILE}") from None
    _checked_weights.add(key)


def resolve_weights(name: str, inception_weights: str | os.PathLike | None = None,
                    allow_download: bool = False) -> str | None:
    """Weights path to pass as torch-fidelity's `feature_extractor_weights_path`, or None.

    Embedded extractors return None (they load and checksum their own file). For Inception the order
    is: `inception_weights`, then $GANBENCH_INCEPTION_WEIGHTS, then torch-fidelity's hub cache; with
    none of them, None (= let torch-fidelity download) only when `allow_download`, else a UserError.
    We never probe the network: offline runs decide from files alone.
    """
    if EXTRACTORS.get(name).offline:
        return None
    path, missing = _local_weights(name, inception_weights)
    if path is not None:
        _check_plain_state_dict(path)
        return str(path)
    if allow_download and not (inception_weights or os.environ.get(INCEPTION_WEIGHTS_ENV)):
        return None
    raise UserError(missing)


def missing_weights(name: str, inception_weights: str | os.PathLike | None = None) -> str | None:
    """Why extractor `name` cannot run offline on this machine, with how to get its weights (None: it can)."""
    if EXTRACTORS.get(name).offline:
        return None
    return _local_weights(name, inception_weights)[1]


def _local_weights(name: str, inception_weights: str | os.PathLike | None) -> tuple[Path | None, str]:
    """(the Inception weights file this machine has, or None; why there is none)."""
    given = inception_weights or os.environ.get(INCEPTION_WEIGHTS_ENV) or None
    if given is not None:
        path = Path(given).expanduser()
        return (path, "") if path.is_file() else \
            (None, f"Inception weights file {path} does not exist; point inception_weights or "
                   f"${INCEPTION_WEIGHTS_ENV} at a copy of {URL_INCEPTION_V3}")
    cached = _inception_hub_cache()
    if cached.is_file():
        return cached, ""
    return None, (f"extractor {name!r} needs Inception weights and none are local: download {URL_INCEPTION_V3} "
                  f"and set inception_weights or ${INCEPTION_WEIGHTS_ENV} to it, or use extractor 'lenet-mnist5k'")


def weights_fingerprint(name: str, weights_path: str | None) -> str:
    """A short string that changes when the extractor's weights change (part of the real-stats cache key)."""
    if EXTRACTORS.get(name).offline:
        return lenet.expected_checksum()
    if weights_path is None:
        return INCEPTION_WEIGHTS_FILE
    return f"{Path(weights_path).name}:{Path(weights_path).stat().st_size}"
