# Copyright (c) boat-mm contributors. All rights reserved.
"""Stochastic depth that also works at rate 1."""
import torch
from mmcv.cnn.bricks.drop import DropPath
from torch import Tensor

from boat_mm.registry import MODELS

__all__ = ['BOATDropPath']


@MODELS.register_module()
class BOATDropPath(DropPath):
    """mmcv's :class:`DropPath`, except that rate 1 drops every sample.

    mmcv divides by the keep probability, which is 0 at rate 1, and returns
    NaN there; the published BOAT code (timm's DropPath) returns zeros.
    Below rate 1 this is mmcv's DropPath, random draws included.

    Args:
        drop_prob (float): Probability of dropping a sample's residual.
            Defaults to 0.1.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Drop whole samples' residuals (all of them at rate 1).

        Args:
            x (Tensor): The residual branch, batch first.

        Returns:
            Tensor: ``x`` with dropped samples zeroed.
        """
        if self.training and self.drop_prob >= 1.:
            return torch.zeros_like(x)
        return super().forward(x)
