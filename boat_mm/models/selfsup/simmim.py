# Copyright (c) boat-mm contributors. All rights reserved.
"""BOAT backbones for SimMIM pre-training (masked image modelling).

mmpretrain's ``SimMIM`` algorithm calls its backbone as ``backbone(images,
mask)``: the patch tokens where ``mask`` is 1 are replaced by a learned
mask token before the first stage, and the first output (the last
stage's map, by default) goes to the decoder (``SimMIMLinearDecoder``).
``SimMIMSwinTransformer`` adds this to mmpretrain's Swin;
:class:`MaskedImageMixin` adds it to any BOAT family, and
:class:`SimMIMBOATSwin` and :class:`SimMIMBOATCSWin` are the two families
with it. Their weights are the family's plus ``mask_token``, so a
pre-trained checkpoint loads into the family's backbone for fine-tuning
(``mask_token`` is left out with the other keys it does not use).
"""
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.model.weight_init import trunc_normal_
from torch import Tensor

from boat_mm.registry import MODELS
from ..backbones import BOATCSWin, BOATSwin

__all__ = ['MaskedImageMixin', 'SimMIMBOATSwin', 'SimMIMBOATCSWin']


class MaskedImageMixin:
    """A learned mask token for a BOAT backbone (a subclass of
    :class:`~boat_mm.models.backbones.BaseBOATBackbone` listed after this
    mixin), as SimMIM pre-training needs.

    The mask token is ``(1, 1, C_0)``, initialised truncated normal (std
    0.02, as mmpretrain's ``SimMIMSwinTransformer``) before the backbone's
    own initialisation, so that a ``Pretrained`` ``init_cfg`` holding one
    overrides it. The masked tokens replace the stem's output before what
    follows it (BOAT-Swin's ``drop_after_pos``), as in mmpretrain's Swin.

    Args:
        *args: The backbone's positional arguments.
        out_indices (Sequence[int] | int): The backbone's; the last stage
            by default (as mmpretrain's ``SimMIMSwinTransformer``), the
            one map that ``SimMIM`` decodes (``latent[0]``). Defaults to
            ``(-1,)``.
        **kwargs: The backbone's keyword arguments.
    """

    def __init__(self,
                 *args: Any,
                 out_indices: Union[Sequence[int], int] = (-1, ),
                 **kwargs: Any) -> None:
        super().__init__(*args, out_indices=out_indices, **kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dims))

    def init_weights(self) -> None:
        """The mask token, then the backbone's initialisation."""
        trunc_normal_(self.mask_token, mean=0., std=.02)
        super().init_weights()

    def forward(self,
                x: Tensor,
                mask: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
        """Forward, with the patch tokens that ``mask`` marks replaced.

        Args:
            x (Tensor): ``(B, C, H, W)`` images.
            mask (Tensor, optional): ``(B, H_0, W_0)`` (or ``(B, H_0 *
                W_0)``), 1 where the patch token is masked, at the stem's
                resolution (``H_0 = ceil(H / stem_stride)``, 4 by default:
                ``SimMIMMaskGenerator``'s ``model_patch_size``). None runs
                the plain backbone, as SimMIM's ``extract_feat`` does.
                Defaults to None.

        Returns:
            tuple[Tensor]: The maps of ``out_indices``, as the backbone's.
        """
        return self._outputs(self._stage_tokens(x, mask))

    def _mask_tokens(self, x: Tensor, hw_shape: Sequence[int],
                     mask: Tensor) -> Tensor:
        """``x`` ``(B, N, C_0)`` with the masked tokens replaced."""
        batch, num_tokens = x.shape[:2]
        # (B, H_0, W_0) or (B, N): a transposed mask of a non-square map
        # has the right size but masks other patches.
        if tuple(mask.shape) not in ((batch, *hw_shape), (batch, num_tokens)):
            raise ValueError(
                f'{type(self).__name__}: the mask has shape '
                f'{tuple(mask.shape)}, but the stem gives {batch} x '
                f'{hw_shape[0]} x {hw_shape[1]} patch tokens: give one mask '
                f'per image at the stem\'s resolution, {hw_shape[0]} x '
                f'{hw_shape[1]} (SimMIMMaskGenerator: model_patch_size='
                f'{self.stem_stride} and input_size the square crop size).')
        w = mask.reshape(batch, num_tokens, 1).to(x.dtype)
        return x * (1. - w) + self.mask_token.to(x.dtype) * w


@MODELS.register_module()
class SimMIMBOATSwin(MaskedImageMixin, BOATSwin):
    """:class:`~boat_mm.models.backbones.BOATSwin` for SimMIM pre-training:
    ``forward(x, mask)`` replaces masked patch tokens by a learned mask
    token (see :class:`MaskedImageMixin`).

    Args:
        **kwargs: The arguments of
            :class:`~boat_mm.models.backbones.BOATSwin` (``arch``,
            ``window_size``, ``out_indices``, ``drop_path_rate``, ...).
    """


@MODELS.register_module()
class SimMIMBOATCSWin(MaskedImageMixin, BOATCSWin):
    """:class:`~boat_mm.models.backbones.BOATCSWin` for SimMIM
    pre-training: ``forward(x, mask)`` replaces masked patch tokens by a
    learned mask token (see :class:`MaskedImageMixin`).

    Args:
        **kwargs: The arguments of
            :class:`~boat_mm.models.backbones.BOATCSWin` (``arch``,
            ``out_indices``, ``drop_path_rate``, ...).
    """
