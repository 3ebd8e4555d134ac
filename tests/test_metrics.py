"""Tests for ganlib/metrics.py and ganlib/extractors: FID/KID/PR through torch-fidelity, offline."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch_fidelity
from safetensors.torch import load_file
from torch.utils.data import Dataset

from ganlib.data import load_images
from ganlib.errors import UserError
from ganlib.extractors import EXTRACTORS, INCEPTION_WEIGHTS_ENV, lenet, resolve_weights
from ganlib.metrics import MetricConfig, compute_metrics, evaluate_generator, real_cache_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnist() -> torch.Tensor:
    """All 5,000 mnist5k digits, uint8 [5000, 1, 28, 28], in a seeded random order (classes mixed)."""
    images = load_images("mnist5k", 28, 1).images
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """One stats cache for the module, so real features of a given set are extracted once."""
    return str(tmp_path_factory.mktemp("stats-cache"))


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """An empty torch hub and no weights env var: nothing cached, and any download attempt fails loudly."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download weights")

    import torch_fidelity.feature_extractor_inceptionv3 as inception
    monkeypatch.setattr(inception, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)


def noisy(images: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    """Images plus Gaussian pixel noise of `sigma` grey levels, back in uint8."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * sigma
    return (images.float() + noise).clamp(0, 255).round().to(torch.uint8)


class Grey3(Dataset):
    """Our own minimal torch-fidelity input (independent of ganlib.metrics.ImageTensorDataset)."""

    def __init__(self, images):
        self.images = images.repeat(1, 3, 1, 1)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


# ---------------------------------------------------------------- extractors


def test_registry_lists_extractors_and_torch_fidelity_knows_lenet():
    assert {"lenet-mnist5k", "inception-v3-compat"} <= set(EXTRACTORS.names())
    for name in EXTRACTORS.names():
        info = EXTRACTORS.get(name)
        assert info.fidelity_name in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY
        assert info.description
    assert EXTRACTORS.get("lenet-mnist5k").offline and not EXTRACTORS.get("inception-v3-compat").offline
    assert MetricConfig().extractor == "lenet-mnist5k"


def test_lenet_weights_are_small_verified_and_accurate(mnist):
    assert lenet.WEIGHTS_PATH.stat().st_size < 1_000_000
    assert lenet.sha256_of(lenet.WEIGHTS_PATH) == lenet.expected_checksum()
    net = lenet.LeNet()
    net.load_state_dict(lenet.load_weights())
    data = load_images("mnist5k", 28, 1)       # 90% of it was the training split
    with torch.no_grad():
        _, logits = net(lenet.to_lenet_input(data.images))
    assert (logits.argmax(1) == data.labels).float().mean() > 0.95


def test_corrupt_lenet_weights_give_one_line_user_error(tmp_path):
    bad = tmp_path / "w.safetensors"
    data = bytearray(lenet.WEIGHTS_PATH.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt.*train_extractor.py") as err:
        lenet.load_weights(bad, lenet.CHECKSUM_PATH)
    assert "\n" not in str(err.value)


def test_lenet_extractor_treats_grey_rgb_and_sizes_alike(mnist):
    fe = lenet.FeatureExtractorLeNet(lenet.NAME, ["128"])
    grey = mnist[:16]
    (f1,) = fe(grey)
    (f3,) = fe(grey.repeat(1, 3, 1, 1))
    assert f1.shape == (16, lenet.FEATURE_DIM)
    torch.testing.assert_close(f1, f3, atol=1e-4, rtol=1e-4)
    big = torch.nn.functional.interpolate(grey.float(), size=56, mode="nearest").to(torch.uint8)
    (f56,) = fe(big.repeat(1, 3, 1, 1))
    assert f56.shape == f1.shape and torch.isfinite(f56).all()


# ---------------------------------------------------------------- FID/KID/PR values


def test_fid_of_a_set_against_itself_is_zero(mnist, cache_dir):
    cfg = MetricConfig(num_samples=300, cache_dir=cache_dir)
    out = compute_metrics(mnist[:300], mnist[:300], "mnist5k-first300", cfg)
    assert abs(out["quality/fid"]) < 1e-3
    # Identical sets: the unbiased MMD estimate is (2/m)(mean off-diagonal K - mean diagonal K) <= 0.
    assert -0.1 < out["quality/kid_mean"] <= 0
    assert out["quality/precision"] == 1.0 and out["quality/recall"] == 1.0


def test_fid_grows_with_noise(mnist, cache_dir):
    cfg = MetricConfig(num_samples=300, precision_recall=False, cache_dir=cache_dir)
    real = mnist[1000:3000]
    fids = [compute_metrics(noisy(mnist[:300], s), real, "mnist5k-1000:3000", cfg)["quality/fid"]
            for s in (0, 20, 50, 100)]
    assert all(a < b for a, b in zip(fids, fids[1:], strict=False)), fids


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # torch-fidelity's default workers
def test_matches_torch_fidelity_called_directly(mnist, tmp_path):
    fake, real = noisy(mnist[:400], 30), mnist[1000:2000]
    direct = torch_fidelity.calculate_metrics(
        input1=Grey3(fake), input2=Grey3(real), fid=True, kid=True, prc=True,
        feature_extractor="lenet-mnist5k", kid_subset_size=400, cache=False, cuda=False, verbose=False)
    cfg = MetricConfig(num_samples=400, cache_dir=str(tmp_path))
    for expect_cached in (False, True):  # computing real features, then reading them from our cache
        ours = compute_metrics(fake, real, "mnist5k-1000:2000", cfg)
        assert ours["quality/real_cached"] is expect_cached
        for key, ref in [("fid", "frechet_inception_distance"), ("kid_mean", "kernel_inception_distance_mean"),
                         ("kid_std", "kernel_inception_distance_std"), ("precision", "precision"),
                         ("recall", "recall")]:
            assert ours[f"quality/{key}"] == pytest.approx(direct[ref], rel=1e-4), key


def test_float_input_is_converted_and_nan_gives_failed_result(mnist, cache_dir):
    cfg = MetricConfig(num_samples=100, precision_recall=False, cache_dir=cache_dir)
    real = mnist[1000:3000]
    as_float = mnist[:100].float() / 127.5 - 1
    assert compute_metrics(as_float, real, "mnist5k-1000:3000", cfg)["quality/fid"] == pytest.approx(
        compute_metrics(mnist[:100], real, "mnist5k-1000:3000", cfg)["quality/fid"], rel=1e-6)
    as_float[3, 0, 5, 5] = float("nan")
    assert compute_metrics(as_float, real, "mnist5k-1000:3000", cfg) == {
        "quality/status": "failed", "quality/reason": "generator produced NaN/inf images"}


def test_kid_subset_adapts_to_small_counts(mnist, cache_dir):
    cfg = MetricConfig(num_samples=50, cache_dir=cache_dir)
    out = compute_metrics(noisy(mnist[:50], 10), mnist[1000:1060], "mnist5k-1000:1060", cfg)
    assert out["quality/kid_subset_size"] == 50
    assert out["quality/num_samples"] == 50 and out["quality/num_real"] == 60
    assert all(math.isfinite(out[f"quality/{k}"]) for k in ("fid", "kid_mean", "precision", "recall"))


# ---------------------------------------------------------------- cache


def test_real_features_are_cached_and_recomputed_when_deleted(mnist, tmp_path, monkeypatch):
    seen = []
    forward = lenet.FeatureExtractorLeNet.forward

    def counting_forward(self, x):
        seen.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(lenet.FeatureExtractorLeNet, "forward", counting_forward)
    cfg = MetricConfig(num_samples=100, precision_recall=False, cache_dir=str(tmp_path))
    fake, real = noisy(mnist[:100], 30), mnist
    path = real_cache_path(real, "mnist5k", cfg)
    assert path.parent == tmp_path / "stats" and not path.exists()

    first = compute_metrics(fake, real, "mnist5k", cfg)
    assert path.is_file() and not first["quality/real_cached"] and sum(seen) == 100 + 5000
    seen.clear()
    second = compute_metrics(fake, real, "mnist5k", cfg)
    assert second["quality/real_cached"] and sum(seen) == 100       # real images not processed again
    assert second["quality/fid"] == first["quality/fid"]
    assert second["quality/eval_s"] < first["quality/eval_s"]
    assert not list(path.parent.glob("*.tmp"))                       # atomic write left nothing behind

    path.unlink()
    seen.clear()
    third = compute_metrics(fake, real, "mnist5k", cfg)
    assert path.is_file() and not third["quality/real_cached"] and sum(seen) == 5100
    assert third["quality/fid"] == pytest.approx(first["quality/fid"], rel=1e-6)


def test_zeroed_cached_features_are_detected_and_recomputed(mnist, tmp_path):
    cfg = MetricConfig(num_samples=100, precision_recall=False, cache_dir=str(tmp_path))
    fake, real = noisy(mnist[:100], 30), mnist
    first = compute_metrics(fake, real, "mnist5k", cfg)
    path = real_cache_path(real, "mnist5k", cfg)
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # keep the header: the file still loads, as zeros
    raw[start:] = bytes(len(raw) - start)
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="does not match its checksum; recomputing"):
        second = compute_metrics(fake, real, "mnist5k", cfg)
    assert not second["quality/real_cached"]
    assert second["quality/fid"] == pytest.approx(first["quality/fid"], rel=1e-6)
    assert compute_metrics(fake, real, "mnist5k", cfg)["quality/real_cached"]  # rewritten, sound again


def test_cache_key_depends_on_what_changes_the_features(mnist, tmp_path):
    cfg = MetricConfig(cache_dir=str(tmp_path))
    base = real_cache_path(mnist[:2000], "mnist5k", cfg)
    assert real_cache_path(mnist[:2000].clone(), "mnist5k", cfg) == base
    assert real_cache_path(mnist[:1999], "mnist5k", cfg) != base
    assert real_cache_path(mnist[1:2001], "mnist5k", cfg) != base          # same name, other pixels
    assert real_cache_path(mnist[:2000], "mnist5k:classes=0-4", cfg) != base


# ---------------------------------------------------------------- bad input


def test_bad_config_and_input_are_one_line_user_errors(mnist):
    cases = [
        (MetricConfig(extractor="vgg-nope"), "unknown extractor 'vgg-nope'"),
        (MetricConfig(num_samples=5), "num_samples=5"),
        (MetricConfig(num_samples=100, kid_subset_size=500), "kid_subset_size=500"),
        (MetricConfig(batch_size=0), "batch_size=0"),
    ]
    for cfg, message in cases:
        with pytest.raises(UserError, match=message) as err:
            compute_metrics(mnist[:100], mnist[:200], "x", cfg)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"40 images, fewer than the 50 generated.*num_samples <= 40"):
        compute_metrics(mnist[:50], mnist[:40], "x", MetricConfig(num_samples=50))
    with pytest.raises(UserError, match="expected a uint8 tensor"):
        compute_metrics(mnist[:50].long(), mnist[:100], "x", MetricConfig(num_samples=50))
    with pytest.raises(UserError, match="real images are"):
        compute_metrics(mnist[:50], mnist[:100, :, :20, :20], "x", MetricConfig(num_samples=50))


def test_missing_inception_weights_offline_is_one_clear_line(mnist, offline_torch_home, tmp_path):
    cfg = MetricConfig(extractor="inception-v3-compat", num_samples=10, cache_dir=str(tmp_path))
    with pytest.raises(UserError, match=f"inception_weights or \\${INCEPTION_WEIGHTS_ENV}") as err:
        compute_metrics(mnist[:10], mnist[:20], "x", cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        resolve_weights("inception-v3-compat", tmp_path / "nope.pth")
    assert resolve_weights("inception-v3-compat", allow_download=True) is None   # torch-fidelity may download


@pytest.fixture
def random_inception_weights(tmp_path, monkeypatch) -> Path:
    """A state dict for torch-fidelity's Inception built without downloading: its own layers, random
    init, conv weights rescaled by sqrt(6) (He gain over PyTorch's default) so activations neither
    vanish nor explode through ~90 layers."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with monkeypatch.context() as m:
        m.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    state = {k: v * math.sqrt(6) if k.endswith("conv.weight") else v for k, v in net.state_dict().items()}
    path = tmp_path / "inception-random.pth"
    torch.save(state, path)
    return path


@pytest.mark.slow  # 299-px forward passes and torch-fidelity's 2048x2048 eigvals: 7-12 s on 2 cores
def test_inception_runs_offline_from_a_weights_file(mnist, offline_torch_home, random_inception_weights,
                                                    tmp_path, monkeypatch):
    cfg = MetricConfig(extractor="inception-v3-compat", num_samples=10, cache_dir=str(tmp_path),
                       inception_weights=str(random_inception_weights))
    out = compute_metrics(noisy(mnist[:10], 60), mnist[10:20], "mnist5k-10:20", cfg)
    assert out["quality/extractor"] == "inception-v3-compat" and out["quality/num_samples"] == 10
    assert math.isfinite(out["quality/fid"]) and out["quality/fid"] > 0
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(random_inception_weights))    # the env var works too
    assert resolve_weights("inception-v3-compat") == str(random_inception_weights)


# ---------------------------------------------------------------- evaluate_generator


class TinyG(nn.Module):
    """z [N, 8] -> images [N, 1, 28, 28] in [-1, 1]; `poison` makes it emit NaN."""

    def __init__(self):
        super().__init__()
        self.latent_dim = 8
        self.fc = nn.Linear(8, 28 * 28)
        self.drop = nn.Dropout(0.5)
        self.poison = False

    def forward(self, z):
        x = torch.tanh(self.drop(self.fc(z))).view(-1, 1, 28, 28)
        return x * float("nan") if self.poison else x


class LinearG(nn.Module):
    """z [N, 8] -> images [N, 1, 28, 28]; no dropout or batch statistics, so any split of the latents
    gives the same images."""

    def __init__(self):
        super().__init__()
        self.latent_dim = 8
        self.fc = nn.Linear(8, 28 * 28)

    def forward(self, z):
        return torch.tanh(self.fc(z)).view(-1, 1, 28, 28)


@pytest.fixture
def accelerator():
    """A one-process Accelerator on whatever device this machine has (conftest resets its state)."""
    from accelerate import Accelerator

    return Accelerator()


def test_evaluate_generator_single_process(mnist, cache_dir, accelerator):
    torch.manual_seed(0)
    G = accelerator.prepare(TinyG()).train()
    cfg = MetricConfig(num_samples=101, precision_recall=False, cache_dir=cache_dir)
    real = mnist[1000:3000]
    a = evaluate_generator(accelerator, G, real, "mnist5k-1000:3000", cfg, seed=3, batch_size=32)
    assert G.training                                                     # mode restored
    assert a["quality/num_samples"] == 101
    b = evaluate_generator(accelerator, G, real, "mnist5k-1000:3000", cfg, seed=3, batch_size=64)
    assert b["quality/fid"] == a["quality/fid"]                           # seeded; eval mode (no dropout)
    calls = []
    c = evaluate_generator(accelerator, G, real, "mnist5k-1000:3000", cfg, seed=3,
                           transform_z=lambda z: calls.append(len(z)) or 3 * z)
    assert sum(calls) == 101 and c["quality/fid"] != a["quality/fid"]
    seen = []
    d = evaluate_generator(accelerator, G, real, "mnist5k-1000:3000", cfg, seed=3,
                           extra=lambda fake: seen.append(fake) or {"extra/n": fake.shape[0]})
    assert d == {**a, "quality/eval_s": d["quality/eval_s"], "quality/real_cached": True, "extra/n": 101}
    assert len(seen) == 1 and seen[0].dtype == torch.uint8 and seen[0].shape == (101, 1, 28, 28)
    accelerator.unwrap_model(G).poison = True
    failed = evaluate_generator(accelerator, G, real, "mnist5k-1000:3000", cfg, seed=3, extra=seen.append)
    assert failed["quality/status"] == "failed" and len(seen) == 1  # nothing to score, extra not called
    assert G.training


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_gathers_exactly_n_and_agrees(tmp_path, accelerator):
    script = tmp_path / "eval2.py"
    script.write_text(textwrap.dedent(f"""
        import json, os
        import torch
        from accelerate import Accelerator
        from safetensors.torch import save_file
        from ganlib.data import load_images
        from ganlib.distributed import shutdown, unwrap
        from ganlib.metrics import MetricConfig, evaluate_generator
        from test_metrics import LinearG

        accelerator = Accelerator()
        rank = accelerator.process_index
        torch.manual_seed(0)                       # same weights on both processes
        model = accelerator.prepare(LinearG())     # DDP-wrapped: evaluate_generator must unwrap it
        real = load_images("mnist5k", 28, 1).images[:2000]
        cfg = MetricConfig(num_samples=301, precision_recall=True, cache_dir={str(tmp_path)!r})
        seen = []                                  # the latents this process evaluated
        out = evaluate_generator(accelerator, model, real, "mnist5k-first2000", cfg, seed=7, batch_size=64,
                                 transform_z=lambda z: seen.append(z.cpu()) or z,
                                 extra=lambda fake: {{"extra/n": fake.shape[0], "extra/sum": int(fake.long().sum()),
                                                     "extra/rank": accelerator.process_index}})
        with open(os.path.join({str(tmp_path)!r}, f"rank{{rank}}.json"), "w") as f:
            json.dump(out, f)                      # one file per rank: stdout lines would interleave
        save_file({{"z": torch.cat(seen)}}, os.path.join({str(tmp_path)!r}, f"rank{{rank}}-z.safetensors"))
        if rank == 0:
            save_file(unwrap(accelerator, model).state_dict(), os.path.join({str(tmp_path)!r}, "G.safetensors"))
        shutdown(accelerator)
    """))
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        accelerate = shutil.which("accelerate")
    pythonpath = os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    # CPU processes on gloo; GPUs hidden, else accelerate's barrier asks for cuda:<rank> on a 1-GPU box.
    env = dict(os.environ, ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=pythonpath,
               OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
         str(script)],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if "Error" in line]
    assert proc.returncode == 0, "\n".join(errors[:20]) + proc.stderr[-2000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["quality/num_samples"] for r in results] == [301, 301]     # no padded duplicates
    assert results[0] == results[1]                                       # the same dict everywhere
    assert (results[0]["extra/n"], results[0]["extra/rank"]) == (301, 0)  # extra: main process, all samples
    assert math.isfinite(results[0]["quality/fid"])

    # each process evaluated its own share of latents: none is a duplicate of the other's
    z0, z1 = (load_file(str(tmp_path / f"rank{rank}-z.safetensors"))["z"] for rank in (0, 1))
    assert (len(z0), len(z1)) == (151, 150)
    assert not (z0[:, None] == z1[None]).all(-1).any()
    # and the gathered result is the one process scoring those same 301 latents itself
    G = LinearG()
    G.load_state_dict(load_file(str(tmp_path / "G.safetensors")))
    latents, used = torch.cat([z0, z1]), [0]

    def replay(z):
        start, used[0] = used[0], used[0] + len(z)
        return latents[start:used[0]]

    cfg = MetricConfig(num_samples=301, precision_recall=True, cache_dir=str(tmp_path))
    one = evaluate_generator(accelerator, G, load_images("mnist5k", 28, 1).images[:2000], "mnist5k-first2000",
                             cfg, seed=7, batch_size=64, transform_z=replay)
    assert used[0] == 301
    assert one.pop("quality/real_cached") is True  # the real features the two processes cached
    assert one.keys() == results[0].keys() - {"quality/real_cached", "extra/n", "extra/sum", "extra/rank"}
    for key, value in one.items():
        if key.endswith("_s"):  # seconds, not scores
            continue
        assert results[0][key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key
