"""A batch draw from the device-held dataset (the loop's only data work per step)."""

from benchmarks.conftest import device, measure
from ganlib.data import DeviceBatcher, load_images

BATCH = 64


def test_batch_draw(benchmark):
    images = load_images("mnist5k", 28, 1).images
    batcher = DeviceBatcher(images, device(), seed=0)
    measure(benchmark, lambda: batcher.next(BATCH), images_per_call=BATCH, rounds=200)
