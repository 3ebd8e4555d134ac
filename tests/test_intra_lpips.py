"""ganlib/intra_lpips.py: CDC's intra-LPIPS against a pair-by-pair reference, on a real LPIPS model.

The model is LPIPS with the linear layers the package ships over a randomly initialised AlexNet
(`pnet_rand=True`): nothing to download, seconds on a CPU, and the same formula as with ImageNet
weights. Where a test needs "the weights are present", it saves such a random AlexNet under the
file name torchvision's ImageNet weights have, in an empty torch hub folder.
"""

from __future__ import annotations

import dataclasses
import itertools

import lpips
import pytest
import torch
import torch.nn.functional as F
import torchvision

from bench.cell import run_cell
from bench.matrix import parse_matrix
from ganlib import intra_lpips as il
from ganlib.data import load_images
from ganlib.data.spec import DataSpec
from ganlib.distributed import make_accelerator
from ganlib.errors import UserError
from ganlib.fewshot import transfer_metrics
from test_bench_run import tiny_matrix

# lpips 0.1.4 builds its backbone with torchvision's pre-0.13 arguments (deprecated, still accepted)
pytestmark = pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")
SIZE = 64   # px: LPIPS inputs in these tests (the protocol's 256 px would only make them slower)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub folder for this test (TORCH_HOME), so no cached weights are found."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere would win over TORCH_HOME
    return tmp_path / "torch" / "hub"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()


def images(count: int, seed: int, channels: int = 3, size: int = 32) -> torch.Tensor:
    """uint8 noise images [count, channels, size, size]."""
    return torch.randint(0, 256, (count, channels, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def jitter(image: torch.Tensor, count: int, seed: int, scale: float) -> torch.Tensor:
    """`count` copies of one uint8 image, each with its own Gaussian pixel noise of std `scale`."""
    noise = torch.randn((count, *image.shape), generator=torch.Generator().manual_seed(seed)) * scale
    return (image.float() + noise).clamp(0, 255).to(torch.uint8)


def reference(fake: torch.Tensor, shots: torch.Tensor, model) -> tuple[float | None, list[int]]:
    """The protocol written the slow way: one LPIPS forward per pair, as the official code does, on
    RGB images in [0, 1] that LPIPS itself rescales (`normalize=True`)."""
    def prep(x: torch.Tensor) -> torch.Tensor:
        rgb = (x.float() / 255).expand(3, -1, -1)[None]
        return F.interpolate(rgb, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)

    with torch.no_grad():
        dist = lambda a, b: model(prep(a), prep(b), normalize=True).item()  # noqa: E731
        nearest = [min(range(len(shots)), key=lambda s: dist(f, shots[s])) for f in fake]
        clusters = [[f for f, n in zip(fake, nearest) if n == s] for s in range(len(shots))]
        means = [sum(dist(a, b) for a, b in itertools.combinations(c, 2)) / (len(c) * (len(c) - 1) / 2)
                 for c in clusters if len(c) >= 2]
    return (sum(means) / len(means) if means else None), [len(c) for c in clusters]


def test_the_model_for_these_tests_downloads_nothing(empty_hub):
    lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    assert not empty_hub.exists()


def test_identical_samples_score_zero(model):
    shots = images(3, seed=1)
    value, sizes = il.intra_lpips(shots[1:2].repeat(6, 1, 1, 1), shots, model, size=SIZE)
    assert sizes == [0, 6, 0] and value == pytest.approx(0.0, abs=1e-7)


def test_equals_the_pair_by_pair_reference(model):
    shots, fake = images(3, seed=1, channels=1), images(14, seed=2, channels=1)
    value, sizes = il.intra_lpips(fake, shots, model, batch_size=4, size=SIZE)
    ref_value, ref_sizes = reference(fake, shots, model)
    assert sizes == ref_sizes and sum(s >= 2 for s in sizes) >= 2  # the mean really is over clusters
    assert value == pytest.approx(ref_value, rel=1e-5)


def test_each_sample_joins_the_cluster_of_its_nearest_shot(model):
    shots = images(3, seed=1)
    fake = torch.cat([jitter(shots[2], 4, seed=3, scale=8), jitter(shots[0], 3, seed=4, scale=8)])
    assert il.nearest_shot(fake, shots, model, batch_size=2, size=SIZE).tolist() == [2, 2, 2, 2, 0, 0, 0]
    assert il.intra_lpips(fake, shots, model, size=SIZE)[1] == [3, 0, 4]


def test_a_collapsed_generator_scores_lower_than_a_diverse_one(model):
    shots = images(2, seed=1)
    collapsed = jitter(images(1, seed=5)[0], 20, seed=6, scale=4)   # one image, barely varied
    diverse = images(20, seed=7)
    low, _ = il.intra_lpips(collapsed, shots, model, size=SIZE)
    high, _ = il.intra_lpips(diverse, shots, model, size=SIZE)
    assert 0 < low < high / 4, (low, high)


def test_grey_images_are_scored_as_rgb(model):
    shots, fake = images(2, seed=1, channels=1), images(8, seed=2, channels=1)
    grey = il.intra_lpips(fake, shots, model, size=SIZE)
    rgb = il.intra_lpips(fake.repeat(1, 3, 1, 1), shots.repeat(1, 3, 1, 1), model, size=SIZE)
    assert grey[1] == rgb[1] and grey[0] == pytest.approx(rgb[0], rel=1e-6)


def test_no_cluster_with_two_members_is_none(model):
    shots = images(3, seed=1)
    value, sizes = il.intra_lpips(shots.flip(0), shots, model, size=SIZE)   # each sample its own shot
    assert value is None and sizes == [1, 1, 1]


def test_a_larger_cluster_is_scored_on_a_seeded_choice_of_members(model):
    shots, fake = images(1, seed=1), images(12, seed=2)
    capped = il.intra_lpips(fake, shots, model, size=SIZE, members=5, seed=0)[0]
    assert capped == il.intra_lpips(fake, shots, model, size=SIZE, members=5, seed=0)[0]
    pairs = il.cluster_lpips(fake, model, size=SIZE).double()
    assert capped != pytest.approx(pairs.mean().item(), rel=1e-6)      # not all 12 members
    assert pairs.min().item() <= capped <= pairs.max().item()


def test_missing_weights_are_named_with_how_to_fetch_them(empty_hub):
    reason = il.unavailable_reason("vgg")
    url = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    assert "vgg16-397923af.pth" in reason and str(empty_hub / "checkpoints") in reason and url in reason
    assert "\n" not in reason
    with pytest.raises(UserError, match="vgg16-397923af.pth"):
        il.build_model("vgg")                      # never lpips's own download
    (empty_hub / "checkpoints").mkdir(parents=True)
    (empty_hub / "checkpoints" / "vgg16-397923af.pth").write_bytes(b"")
    assert il.unavailable_reason("vgg") is None
    assert "alexnet-owt-7be5be79.pth" in il.unavailable_reason("alex")


def test_a_missing_package_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lpips" else real(name, *a))
    assert "lpips package is not installed" in il.unavailable_reason("vgg")


def test_metric_spec_takes_only_a_bool():
    assert parse_matrix(tiny_matrix(), "tiny").metrics.intra_lpips is False
    with pytest.raises(UserError, match="intra_lpips='yes' must be true or false"):
        parse_matrix(tiny_matrix(metrics={"num_samples": 100, "intra_lpips": "yes"}), "tiny")


@pytest.fixture
def alex_weights(empty_hub):
    """A random AlexNet saved where torchvision keeps its ImageNet weights: 'the weights are present'."""
    _, file = il.backbone_weights("alex")
    file.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), file)
    return file


def test_transfer_metrics_add_intra_lpips_only_when_asked(alex_weights, monkeypatch):
    monkeypatch.setattr(il, "NET", "alex")
    monkeypatch.setattr(il, "SIZE", SIZE)
    target = DataSpec.parse("mnist5k:classes=5-9:n=10")
    domain = load_images(dataclasses.replace(target, n=None), 28, 1)
    fake = domain.images[:40]
    off = transfer_metrics(fake, target, domain, "lenet-mnist5k", lpips=False).metrics
    assert not any(k.startswith("transfer/intra_lpips") for k in off)
    on = transfer_metrics(fake, target, domain, "lenet-mnist5k", lpips=False, intra_lpips=True).metrics
    assert {k: v for k, v in on.items() if not k.startswith("transfer/intra_lpips") and k != "transfer/eval_s"} \
        == {k: v for k, v in off.items() if k != "transfer/eval_s"}
    assert 0 < on["transfer/intra_lpips"] < 1 and on["transfer/intra_lpips_samples"] == 40
    assert on["transfer/intra_lpips_clusters"] >= 1 and "transfer/intra_lpips_reason" not in on


def test_a_cell_without_the_weights_records_why_and_finishes(tmp_path, monkeypatch, empty_hub):
    monkeypatch.setenv("GANBENCH_CACHE", str(tmp_path / "cache"))
    data = tiny_matrix(strategies=["scratch"], setups=["cpu-1proc"], transfer_steps=10)
    data["metrics"] = {**data["metrics"], "intra_lpips": True}
    matrix = parse_matrix(data, "tiny")
    record = run_cell(make_accelerator(), matrix, matrix.cells()[0], tmp_path / "run", "run-id")
    assert record["status"] == "ok", record["reason"]
    m = record["metrics"]
    assert m["transfer/intra_lpips"] is None and "vgg16-397923af.pth" in m["transfer/intra_lpips_reason"]
    assert m["transfer/diversity"] > 0 and record["config"]["metrics"]["intra_lpips"] is True
