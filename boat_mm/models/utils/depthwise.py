# Copyright (c) boat-mm contributors. All rights reserved.
"""The depthwise 3x3 convolution of the values (CSWin's LePE, FSLA's local
term), whose weight gradient keeps the weight's strides."""
from typing import Tuple

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ['DepthwiseConv2d']


class _GradLikeWeight(torch.autograd.Function):
    """Identity on the weight; its gradient is given the weight's strides.

    A depthwise weight ``(C, 1, 3, 3)`` has strides ``(9, 9, 3, 1)``; from
    channels-last inputs (CSWin's windows are views of ``(n, h, w, C)``)
    its gradient comes as ``(9, 1, 3, 1)``: the same memory, as dimension
    1 has size 1, but DDP, whose buckets take the parameters' strides,
    warns ("Grad strides do not match bucket view strides") and copies.
    Which layout comes depends on the branch and the batch, so no layout
    of the weight fits them all.
    """

    # torch.func transforms (grad, vmap, jacrev) need the forward without
    # ctx and a vmap rule; the identity's is torch's generated one.
    generate_vmap_rule = True

    @staticmethod
    def forward(weight: Tensor) -> Tensor:
        return weight.view_as(weight)

    @staticmethod
    def setup_context(ctx, inputs: Tuple[Tensor], output: Tensor) -> None:
        ctx.strides = inputs[0].stride()

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        # A view, as the forward returns one.
        return tangent.view_as(tangent)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        strides: Tuple[int, ...] = ctx.strides
        if grad.stride() == strides:
            return grad
        return grad.new_empty_strided(grad.shape, strides).copy_(grad)


class DepthwiseConv2d(nn.Conv2d):
    """A 3x3 convolution of one filter per channel, padded to keep the
    size, whose weight gradient has the weight's strides while training
    eagerly (see :class:`_GradLikeWeight`); the weights (``weight``,
    ``bias``) are :class:`torch.nn.Conv2d`'s.

    Args:
        channels (int): Input and output channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, padding=1, groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        """Convolve a map.

        Args:
            x (Tensor): ``(N, C, H, W)``.

        Returns:
            Tensor: ``(N, C, H, W)``.
        """
        weight = self.weight
        # Not under torch.compile: torch 2.4's dynamo cannot trace the
        # strides the function reads (DDP's buckets are its matter then).
        if (weight.requires_grad and torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            weight = _GradLikeWeight.apply(weight)
        return self._conv_forward(x, weight, self.bias)
