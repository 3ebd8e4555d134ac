"""A quality check that means something: training must move FID a long way from initialisation.

`dcgan` trained on mnist5k with the default configuration (TrainConfig defaults: 300 steps, batch
64) must reach an FID (embedded extractor, 500 samples) at most half its FID at initialisation. The
fully connected `mlp` learns more slowly (300 steps take it from about 120 to 80): it must gain 10%.
"""

from __future__ import annotations

import os

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


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("GANBENCH_SLOW_QUALITY"), reason="800 StyleGAN2 steps (3.5 minutes on an idle 2-core "
                    "machine): set GANBENCH_SLOW_QUALITY=1 to run it")
def test_stylegan2_small_preset_pretraining_cuts_fid(tmp_path):
    """The `stylegan2-small` preset's source pretraining, exactly as the preset configures it, must
    take a 32 px StyleGAN2 to at most half its FID at initialisation on the source digits."""
    from bench.matrix import load_matrix

    matrix = load_matrix("stylegan2-small")
    cfg = matrix.source_config(matrix.cells()[0], out=str(tmp_path / "source"), progress=False)
    accelerator = make_accelerator("no")
    real = load_images(cfg.data, cfg.size, 1).images
    metric = MetricConfig(num_samples=SAMPLES, precision_recall=False, cache_dir=str(tmp_path / "cache"))

    def fid(G):
        return evaluate_generator(accelerator, G, real, f"{cfg.data}|{cfg.size}px|1ch", metric, seed=4242)["quality/fid"]

    torch.manual_seed(cfg.seed)
    G0, _ = build_networks(NetConfig(cfg.net, cfg.size, 1, cfg.latent_dim, cfg.width))
    fid_init = fid(G0.eval())
    result = train(cfg, accelerator)
    fid_trained = fid(result.generator)
    print(f"stylegan2-small: FID at init {fid_init:.2f}, after {cfg.steps} source steps {fid_trained:.2f}")
    assert fid_trained <= 0.5 * fid_init, (fid_init, fid_trained)
