"""`DeviceBatcher`: a whole (small) dataset kept on the training device, sampled without host work.

GAN transfer datasets are small (few-shot to ~100k images), so the data lives on the device as
float in [-1, 1], converted once; a batch is one `randint` plus one gather, with no DataLoader
workers, no per-sample Python and no host-device sync.
"""

from __future__ import annotations

from typing import Any

import torch

from ganlib.data.images import to_float, to_uint8
from ganlib.errors import UserError


class DeviceBatcher:
    """Draws uniform batches, with replacement, from images held on `device`.

    images: uint8 [N, C, H, W] (any device); device: where batches are made (from Accelerate,
    never chosen here); seed: this batcher's stream (give each process its own, e.g. seed + rank);
    dtype: dtype of the stored images and of the batches.
    """

    def __init__(self, images: torch.Tensor, device: torch.device | str, seed: int, dtype: torch.dtype = torch.float32):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"DeviceBatcher needs uint8 images [N>0, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.device = torch.device(device)
        self.images = to_float(images.to(self.device)).to(dtype)  # [N, C, H, W] in [-1, 1]
        self.generator = torch.Generator(device=self.images.device)
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return self.images.shape[0]

    def next(self, batch_size: int) -> torch.Tensor:
        """A batch [batch_size, C, H, W] in [-1, 1] on the device, indices uniform with replacement."""
        index = torch.randint(len(self), (batch_size,), generator=self.generator, device=self.images.device)
        return self.images.index_select(0, index)

    def state_dict(self) -> dict[str, Any]:
        """The sampling state (generator state, a CPU uint8 tensor) for a bitwise-identical resume."""
        return {"generator": self.generator.get_state(), "num_images": len(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; the dataset must have the same number of images as when saved."""
        if state["num_images"] != len(self):
            raise UserError(f"cannot resume sampling: checkpoint was made with {state['num_images']} real images, "
                            f"this dataset has {len(self)}; resume with the same dataset spec")
        self.generator.set_state(state["generator"])

    to_uint8 = staticmethod(to_uint8)  # batch in [-1, 1] -> uint8, for saving or metrics
