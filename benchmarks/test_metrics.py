"""FID + KID of 500 generated images against mnist5k, with the real statistics already cached.

The warm-up call computes and caches the real set's features; every timed call is what an
evaluation during training costs: generated-image features plus the FID and KID arithmetic.
"""

import torch

from benchmarks.timing import device, measure
from ganlib.data import load_images, to_uint8
from ganlib.metrics import MetricConfig, compute_metrics
from ganlib.nets import NetConfig, build_networks

NUM_FAKE = 500


def test_fid_kid_cached(benchmark, tmp_path):
    real = load_images("mnist5k", 28, 1).images
    G, _ = build_networks(NetConfig("dcgan", 28, 1, 100, 16))
    G.to(device()).eval()
    with torch.no_grad():
        fake = to_uint8(G(torch.randn(NUM_FAKE, G.latent_dim, device=device()))).cpu()
    cfg = MetricConfig(extractor="lenet-mnist5k", num_samples=NUM_FAKE, precision_recall=False,
                       cache_dir=str(tmp_path))
    assert not compute_metrics(fake, real, "mnist5k/train", cfg, device())["quality/real_cached"]
    last = {}

    def evaluate() -> None:
        last.update(compute_metrics(fake, real, "mnist5k/train", cfg, device()))

    measure(benchmark, evaluate, images_per_call=NUM_FAKE, rounds=40, warmup=1, num_fake=NUM_FAKE,
            num_real=real.shape[0], extractor=cfg.extractor)
    assert last["quality/real_cached"]  # the timed calls never recomputed the real features
