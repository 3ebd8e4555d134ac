"""The generator's sampling throughput: latents to uint8 images, eval mode, no autograd, fp32."""

import pytest
import torch

from benchmarks.cases import SAMPLE_BATCH, SAMPLE_CALLS, SHAPES
from benchmarks.timing import device, measure
from ganlib.data import to_uint8
from ganlib.nets import NetConfig, build_networks


@pytest.mark.parametrize("net", list(SHAPES))
def test_sampling(benchmark, net):
    size, width = SHAPES[net]
    G, _ = build_networks(NetConfig(net, size, 1, 100, width))
    G.to(device()).eval()
    z = torch.randn(SAMPLE_CALLS, SAMPLE_BATCH, G.latent_dim, device=device())

    def sample() -> None:
        with torch.no_grad():
            for batch in z:
                to_uint8(G(batch))

    measure(benchmark, sample, images_per_call=SAMPLE_CALLS * SAMPLE_BATCH, rounds=50, net=net, size=size,
            width=width, batch=SAMPLE_BATCH, calls_per_round=SAMPLE_CALLS)
