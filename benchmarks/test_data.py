"""A batch draw from the device-held dataset (the loop's only data work per step)."""

from benchmarks.timing import device, measure
from ganlib.data import DeviceBatcher, load_images

BATCH = 32            # images per draw, the training benchmarks' batch
DRAWS_PER_ROUND = 50  # a draw takes microseconds: one round makes many, so the timer's resolution and
                      # a single preemption do not dominate the round
# Random rows of a 16 MB tensor: the time follows the host's shared-cache contention, which the
# calibration kernel does not (+-15% between unchanged runs on our CI box). A draw is <1% of a
# step, so only a gross change (say, a host round trip per draw) matters here.
TOLERANCE = 0.25


def test_batch_draw(benchmark):
    images = load_images("mnist5k", 28, 1).images
    batcher = DeviceBatcher(images, device(), seed=0)

    def draws() -> None:
        for _ in range(DRAWS_PER_ROUND):
            batcher.next(BATCH)

    measure(benchmark, draws, images_per_call=BATCH * DRAWS_PER_ROUND, rounds=200, tolerance=TOLERANCE,
            dataset="mnist5k", batch=BATCH, draws_per_round=DRAWS_PER_ROUND)
