"""`load_images`: a `DataSpec` -> uint8 images at the requested size and channels (+ labels).

Order of work: native arrays -> class selection -> seeded few-shot subset -> resize + channel
conversion. The subset is chosen on indices before any pixel work, so it depends only on the
spec (dataset, classes, n, seed), never on size or channels.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F

from ganlib.data.sources import FOLDER, list_image_files, native_images, read_image
from ganlib.data.spec import DataSpec, compact_ranges
from ganlib.errors import UserError

LUMA_601 = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights for RGB -> grey
_CHUNK = 1024                     # images converted per float chunk (bounds peak memory)


@dataclasses.dataclass
class ImageSet:
    """Images ready for training or metrics, on the CPU."""

    images: torch.Tensor               # uint8 [N, C, H, W], 0..255
    labels: torch.Tensor | None = None  # int64 [N], or None for unlabelled data

    def __len__(self) -> int:
        return self.images.shape[0]


def to_float(img: torch.Tensor) -> torch.Tensor:
    """uint8 images 0..255 -> float32 in [-1, 1] (the networks' range); same device."""
    return img.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (any float dtype; clamped) -> uint8 0..255; same device."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def convert_images(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """uint8 [N, C, h, w] -> a new uint8 [N, channels, size, size] tensor.

    Resizing is antialiased bilinear on float, rounded once at the end; it is skipped when h == w
    == size. Grey -> RGB repeats the channel; RGB -> grey uses ITU-R 601 luma. Non-square images
    are centre-cropped to a square first. Never returns (a view of) the input.
    """
    if images.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got images of shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        images = images[..., top:top + side, left:left + side]
    needs_resize = images.shape[-1] != size
    needs_luma = images.shape[1] == 3 and channels == 1
    if not needs_resize and not needs_luma:
        out = images.clone() if images.shape[1] == channels else images.repeat(1, channels, 1, 1)
        return out.contiguous()
    chunks = []
    for start in range(0, images.shape[0], _CHUNK):
        x = images[start:start + _CHUNK].float()
        if needs_luma:
            weights = torch.tensor(LUMA_601, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * weights).sum(dim=1, keepdim=True)
        if needs_resize:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        chunks.append(x.round_().clamp_(0, 255).to(torch.uint8))
    out = torch.cat(chunks)
    return out.repeat(1, channels, 1, 1) if out.shape[1] != channels else out


def choose_subset(count: int, n: int | None, seed: int) -> torch.Tensor:
    """Positions (int64, ascending) of a seeded few-shot subset of n out of `count`; all when n is None."""
    if n is None:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)[:n].sort().values


def load_images(spec: DataSpec | str | dict, size: int, channels: int,
                root: str | os.PathLike | None = None, download: bool = False) -> ImageSet:
    """Load the images a spec names as uint8 [N, channels, size, size] (CPU) with int64 labels or None.

    root: torchvision data root (default $GANBENCH_DATA, else ~/.cache/ganbench/data); download:
    let torchvision fetch missing files (needs internet). The result never shares memory with the
    in-process memo, so callers may change it freely.
    """
    spec = DataSpec.parse(spec)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"image size must be a positive integer (pixels), got {size!r}")
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    if spec.name == FOLDER:
        return _load_folder(spec, size, channels)

    images, labels = native_images(spec.name, spec.split, root, download)
    keep = None
    if spec.classes is not None:
        if labels is None:
            raise UserError(f"dataset {spec.name!r} has no labels, so classes= cannot select from it; drop classes= from {str(spec)!r}")
        present = set(labels.unique().tolist())
        missing = [c for c in spec.classes if c not in present]
        if missing:
            raise UserError(f"class(es) {missing} not in dataset {spec.name!r} (it has classes {min(present)}-{max(present)}); fix classes= in {str(spec)!r}")
        keep = torch.isin(labels, torch.tensor(spec.classes)).nonzero().squeeze(1)
    available = keep.numel() if keep is not None else images.shape[0]
    _check_n(spec, available)
    pick = choose_subset(available, spec.n, spec.seed)
    index = keep[pick] if keep is not None else pick
    if spec.n is not None or keep is not None:
        images = images[index]
        labels = labels[index] if labels is not None else None
    elif labels is not None:
        labels = labels.clone()
    return ImageSet(convert_images(images, size, channels), labels)


def _load_folder(spec: DataSpec, size: int, channels: int) -> ImageSet:
    """Folder datasets: choose the subset on the sorted file list, then read only those files."""
    if spec.classes is not None:
        raise UserError(f"image folders have no labels, so classes= cannot select from them; drop classes= from {str(spec)!r}")
    files = list_image_files(spec.path)
    _check_n(spec, len(files))
    chosen = [files[i] for i in choose_subset(len(files), spec.n, spec.seed).tolist()]
    images = [read_image(path) for path in chosen]
    converted = [convert_images(img.unsqueeze(0), size, channels) for img in images]
    return ImageSet(torch.cat(converted), None)


def _check_n(spec: DataSpec, available: int) -> None:
    if spec.n is not None and spec.n > available:
        within = f" in classes {compact_ranges(spec.classes, ',')}" if spec.classes is not None else ""
        raise UserError(f"{str(spec)!r} asks for n={spec.n} images but only {available} exist{within}; lower n")
