"""The embedded `lenet-mnist5k` feature extractor: a small MNIST classifier that works offline.

Its features (the 128-d penultimate layer) make FID/KID/precision-recall cheap and download-free
for small grey images. Its numbers are NOT comparable with Inception FID; every result records the
extractor name. Weights come from `scripts/train_extractor.py` and are committed next to this file
with a sha256 checksum that is verified on every load.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from ganlib.errors import UserError

NAME = "lenet-mnist5k"
INPUT_SIZE = 28                                         # px; inputs of any size are resized to this
FEATURE_DIM = 128                                       # width of the penultimate layer ("128")
WEIGHTS_PATH = Path(__file__).with_name(f"{NAME}.safetensors")
CHECKSUM_PATH = Path(__file__).with_name(f"{NAME}.sha256")
_RETRAIN = "rerun scripts/train_extractor.py"


class LeNet(nn.Module):
    """2 conv + 2 fc digit classifier: [N, 1, 28, 28] float in [-1, 1] -> (features [N, 128], logits [N, 10]).

    Features are the penultimate activations times a constant `feature_scale` fixed after training
    so that mean(|f|^2) / 128 = 1 on the training images: KID's polynomial kernel (x.y / d + 1)^3
    assumes features of about unit size (as Inception's are), else large norms swamp it.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=5, padding=2)    # 28 -> pool -> 14
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5, padding=2)   # 14 -> pool -> 7
        self.fc1 = nn.Linear(32 * 7 * 7, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, num_classes)
        self.register_buffer("feature_scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        # Leaky: with plain ReLU ~45% of fc1 units start (and stay) dead, wasting feature dimensions.
        hidden = F.leaky_relu(self.fc1(x.flatten(1)), 0.2)
        return hidden * self.feature_scale, self.fc2(hidden)


def to_lenet_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] (C = 1 or 3) -> float [N, 1, 28, 28] in [-1, 1], the classifier's input.

    RGB is reduced to grey with ITU-R 601 luma weights (they sum to 1, so grey repeated to 3 channels
    stays grey); other sizes are resized bilinearly with antialiasing. Training uses the same function.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images [N, 1|3, H, W], got {images.dtype} {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 3:
        luma = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        x = (x * luma).sum(dim=1, keepdim=True)
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x / 127.5 - 1


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def expected_checksum(checksum_path: Path = CHECKSUM_PATH) -> str:
    """The committed checksum (first field of a `sha256sum`-format line)."""
    if not Path(checksum_path).is_file():
        raise UserError(f"extractor checksum file {checksum_path} is missing; {_RETRAIN}")
    return Path(checksum_path).read_text().split()[0]


def load_weights(weights_path: Path = WEIGHTS_PATH, checksum_path: Path = CHECKSUM_PATH) -> dict:
    """Read the committed LeNet state dict after checking its sha256 (mismatch -> UserError)."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise UserError(f"extractor weights {weights_path} are missing; {_RETRAIN}")
    if sha256_of(weights_path) != expected_checksum(checksum_path):
        raise UserError(f"extractor weights corrupt ({weights_path} does not match {checksum_path}); {_RETRAIN}")
    return load_file(str(weights_path))


class FeatureExtractorLeNet(FeatureExtractorBase):
    """torch-fidelity adapter: uint8 [N, 3, H, W] (any H, W) -> features named "128" and "logits".

    torch-fidelity constructs it as `cls(name, features_list, **calculate_metrics_kwargs)`; a given
    `feature_extractor_weights_path` replaces the embedded weights (its checksum is not checked).
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = LeNet()
        if feature_extractor_weights_path is None:
            state = load_weights()
        else:
            state = load_file(str(feature_extractor_weights_path))
        self.net.load_state_dict(state)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        features, logits = self.net(to_lenet_input(x))
        named = {"128": features, "logits": logits}
        return tuple(named[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "128", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "128", "kid": "128", "prc": "128"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8)
