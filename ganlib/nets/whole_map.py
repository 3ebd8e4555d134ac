"""Convolutions whose kernel covers the whole input map, computed as the matmuls they are.

DCGAN's first G layer (a transposed conv from a 1x1 latent map) and its D head (a conv over the
last 4x4 map) are dense layers written as convolutions. oneDNN runs such shapes at a few percent
of the machine's matmul rate (measured on CPU, 1 thread, batch 64: the G layer 16 GFLOP/s, the D
head's backward under 1 GFLOP/s, against a 170 GFLOP/s matmul); a matmul runs them at full rate.
The modules stay `nn.ConvTranspose2d` / `nn.Conv2d`, with the same parameters and state-dict
keys, so checkpoints and strategies see no difference; inputs of any other shape take the
ordinary convolution. Channels-last tensors are read through permuted views, without copies.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _flat_pixels_last(t: torch.Tensor) -> torch.Tensor:
    """[A, C, h, w] -> [A, h*w*C] (a view of a channels-last tensor)."""
    return t.permute(0, 2, 3, 1).flatten(1)


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


class LatentConvTranspose2d(nn.ConvTranspose2d):
    """A stride-1, unpadded transposed conv that maps a 1x1 map to a k x k map: one matmul."""

    def _is_dense(self, x: torch.Tensor) -> bool:
        return (x.dim() == 4 and x.shape[-2:] == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
                and self.output_padding == (0, 0) and self.dilation == (1, 1) and self.groups == 1)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is not None or not self._is_dense(x):
            return super().forward(x, output_size)
        n, (c_in, c_out, kh, kw) = x.shape[0], self.weight.shape
        z = x.reshape(n, c_in)
        if _is_channels_last(self.weight):  # weight stored as [in, kh, kw, out]
            y = (z @ _flat_pixels_last(self.weight)).view(n, kh, kw, c_out).permute(0, 3, 1, 2)
        else:
            y = (z @ self.weight.flatten(1)).view(n, c_out, kh, kw)
        return y if self.bias is None else y + self.bias.view(1, c_out, 1, 1)


class WholeMapConv2d(nn.Conv2d):
    """An unpadded conv whose kernel is as large as its input map: a linear layer over the map."""

    def _is_dense(self, x: torch.Tensor) -> bool:
        return (x.dim() == 4 and x.shape[-2:] == self.weight.shape[-2:] and self.padding == (0, 0)
                and self.dilation == (1, 1) and self.groups == 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._is_dense(x):
            return super().forward(x)
        n, c_out = x.shape[0], self.weight.shape[0]
        if _is_channels_last(x):
            y = F.linear(_flat_pixels_last(x), _flat_pixels_last(self.weight), self.bias)
        else:
            y = F.linear(x.flatten(1), self.weight.flatten(1), self.bias)
        return y.view(n, c_out, 1, 1)
