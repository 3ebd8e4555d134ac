"""The whole-map layers compute what the convolutions they replace compute, values and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ganlib.nets.whole_map import LatentConvTranspose2d, WholeMapConv2d

FORMATS = [torch.contiguous_format, torch.channels_last]


def _twin(fast: nn.Module, plain_type: type, *args, **kwargs) -> nn.Module:
    plain = plain_type(*args, **kwargs)
    plain.load_state_dict(fast.state_dict())
    return plain


def _check_same(fast: nn.Module, plain: nn.Module, x: torch.Tensor, fmt) -> None:
    fast.to(memory_format=fmt)
    plain.to(memory_format=fmt)
    x_fast = x.clone().to(memory_format=fmt).requires_grad_(True)
    x_plain = x.clone().to(memory_format=fmt).requires_grad_(True)
    y_fast, y_plain = fast(x_fast), plain(x_plain)
    assert y_fast.shape == y_plain.shape
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y_plain)
    y_fast.backward(grad)
    y_plain.backward(grad)
    torch.testing.assert_close(x_fast.grad, x_plain.grad, rtol=1e-5, atol=1e-5)
    for (name, p_fast), p_plain in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p_fast.grad, p_plain.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias", [False, True])
def test_latent_conv_transpose_is_the_conv_transpose(fmt, bias):
    torch.manual_seed(0)
    fast = LatentConvTranspose2d(10, 6, 7, 1, 0, bias=bias)
    _check_same(fast, _twin(fast, nn.ConvTranspose2d, 10, 6, 7, 1, 0, bias=bias), torch.randn(5, 10, 1, 1), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias", [False, True])
def test_whole_map_conv_is_the_conv(fmt, bias):
    torch.manual_seed(0)
    fast = WholeMapConv2d(12, 3, 4, 1, 0, bias=bias)
    _check_same(fast, _twin(fast, nn.Conv2d, 12, 3, 4, 1, 0, bias=bias), torch.randn(5, 12, 4, 4), fmt)


def test_other_shapes_take_the_ordinary_convolution():
    torch.manual_seed(0)
    up = LatentConvTranspose2d(4, 3, 3, 1, 0)
    _check_same(up, _twin(up, nn.ConvTranspose2d, 4, 3, 3, 1, 0), torch.randn(2, 4, 5, 5), torch.contiguous_format)
    down = WholeMapConv2d(4, 3, 3, 1, 0)
    _check_same(down, _twin(down, nn.Conv2d, 4, 3, 3, 1, 0), torch.randn(2, 4, 6, 6), torch.contiguous_format)


def test_state_dict_keys_are_the_convolutions():
    assert LatentConvTranspose2d(4, 3, 7).state_dict().keys() == nn.ConvTranspose2d(4, 3, 7).state_dict().keys()
    assert WholeMapConv2d(4, 3, 4).state_dict().keys() == nn.Conv2d(4, 3, 4).state_dict().keys()
