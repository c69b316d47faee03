"""Patch embeddings as one matrix product.

Qwen-VL vision towers embed patches with an ``nn.Conv3d`` whose kernel equals its stride, run on input that is
already cut into patches (``[patches, 3, 2, 16, 16]``): each output is one dot product of a flattened patch with a
flattened kernel. PyTorch's CPU convolution (oneDNN) takes that case slowly: 8.5 ms for the forward and backward of
a 160-patch page, about a fifth of the demo's whole training step, where the same product as ``F.linear`` takes a
fraction of a millisecond. :func:`linear_patch_convs` makes such layers compute it that way; their parameters,
state dict, hooks and class checks stay those of the ``nn.Conv3d``, and any other input takes the convolution.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class PatchConv3d(nn.Conv3d):
    """An ``nn.Conv3d`` with kernel = stride that runs input of exactly one kernel's size as ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or tuple(x.shape[2:]) != tuple(self.kernel_size):
            return super().forward(x)
        out = F.linear(x.flatten(1), self.weight.flatten(1), self.bias)
        return out.view(*out.shape, 1, 1, 1)


def is_patch_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a plain 3-D convolution whose windows tile its input (kernel = stride, no padding)."""
    return (
        type(module) is nn.Conv3d
        and tuple(module.kernel_size) == tuple(module.stride)
        and tuple(module.padding) == (0, 0, 0)
        and tuple(module.dilation) == (1, 1, 1)
        and module.groups == 1
    )


def linear_patch_convs(model: Any) -> int:
    """Make every patch convolution of ``model`` a :class:`PatchConv3d` in place; the number changed."""
    changed = 0
    for module in model.modules():
        if is_patch_conv(module):
            module.__class__ = PatchConv3d
            changed += 1
    return changed
