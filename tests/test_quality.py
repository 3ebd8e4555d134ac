"""A quality check that means something: training must move FID a long way from initialisation.

`dcgan` trained on mnist5k with the default configuration (TrainConfig defaults: 300 steps, batch
64) must reach an FID (embedded extractor, 500 samples) at most half its FID at initialisation. The
fully connected `mlp` learns more slowly (300 steps take it from about 120 to 80): it must gain 10%.
"""

from __future__ import annotations

import pytest
import torch

from ganlib.config import TrainConfig
from ganlib.distributed import make_accelerator
from ganlib.data import load_images
from ganlib.metrics import MetricConfig, evaluate_generator
from ganlib.nets import NetConfig, build_networks
from ganlib.train import train

SAMPLES = 500


def _fid(accelerator, G, real, cache_dir) -> float:
    cfg = MetricConfig(num_samples=SAMPLES, precision_recall=False, cache_dir=str(cache_dir))
    return evaluate_generator(accelerator, G, real, "mnist5k|28px|1ch", cfg, seed=4242)["quality/fid"]


@pytest.mark.slow
@pytest.mark.parametrize("net, max_ratio", [("dcgan", 0.5), ("mlp", 0.9)])
def test_default_training_cuts_fid(net, max_ratio, tmp_path):
    accelerator = make_accelerator("no")
    real = load_images("mnist5k", 28, 1).images
    cfg = TrainConfig(net=net, data="mnist5k", out=str(tmp_path / "run"), progress=False)
    torch.manual_seed(cfg.seed)
    G0, _ = build_networks(NetConfig(net, cfg.size, 1, cfg.latent_dim, cfg.width))
    fid_init = _fid(accelerator, G0, real, tmp_path / "cache")
    result = train(cfg, accelerator)
    fid_trained = _fid(accelerator, result.generator, real, tmp_path / "cache")
    print(f"{net}: FID at init {fid_init:.2f}, after {cfg.steps} steps {fid_trained:.2f}")
    assert fid_trained <= max_ratio * fid_init, (fid_init, fid_trained)
