"""GranViT's localized self-distillation (LSD): ROIAlign of the student's feature grid over a region must match
what an EMA teacher vision tower sees in the crop of that region.

L_distill = MSE(teacher(crop) pooled, ROIAlign(student features, box)); teacher = alpha * teacher +
(1 - alpha) * student after every optimizer step (alpha 0.9, lambda 1 in the paper). The teacher never
receives gradients. ROIAlign is implemented here in plain torch (no torchvision), with torchvision's
``aligned=True`` semantics: pixel centres sit at half-integers, bins are averaged over a regular grid of
bilinear samples.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def _axis_weights(start: float, length: float, bins: int, grid: int, size: int) -> torch.Tensor:
    """(bins, size): average bilinear weight of each input cell for each output bin along one axis."""
    w = torch.zeros(bins, size, dtype=torch.float64)
    step = length / bins
    for b in range(bins):
        for i in range(grid):
            y = start + b * step + (i + 0.5) * step / grid
            if y < -1.0 or y > size:
                continue  # sample outside the map contributes zero (as torchvision)
            y = max(y, 0.0)
            lo = int(y)
            if lo >= size - 1:
                lo = hi = size - 1
                y = float(lo)
            else:
                hi = lo + 1
            frac = y - lo
            w[b, lo] += (1 - frac) / grid
            w[b, hi] += frac / grid
    return w


def roi_align(
    features: torch.Tensor,
    boxes: torch.Tensor | Sequence[Sequence[float]],
    output_size: int | tuple[int, int] = 2,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
) -> torch.Tensor:
    """Bilinear ROIAlign of one feature map ``(C, H, W)`` over ``boxes`` ``(K, 4)`` ``(x0, y0, x1, y1)``.

    Returns ``(K, C, out_h, out_w)``. Boxes are in input coordinates that ``spatial_scale`` maps to the
    feature grid; ``sampling_ratio <= 0`` uses ``ceil(bin size)`` samples per bin (torchvision's rule).
    Separable: each bin's value is ``Wy @ F @ Wx^T`` with per-axis averaged bilinear weights, so gradients
    flow to ``features``.
    """
    if features.dim() != 3:
        raise ValueError(f"roi_align expects one (C, H, W) feature map, got shape {tuple(features.shape)}")
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    boxes_t = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    _, h, w = features.shape
    offset = 0.5 if aligned else 0.0
    wys, wxs = [], []
    for x0, y0, x1, y1 in boxes_t.tolist():
        sx0, sy0 = x0 * spatial_scale - offset, y0 * spatial_scale - offset
        rw, rh = (x1 - x0) * spatial_scale, (y1 - y0) * spatial_scale
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        gy = sampling_ratio if sampling_ratio > 0 else max(1, math.ceil(rh / oh))
        gx = sampling_ratio if sampling_ratio > 0 else max(1, math.ceil(rw / ow))
        wys.append(_axis_weights(sy0, rh, oh, gy, h))
        wxs.append(_axis_weights(sx0, rw, ow, gx, w))
    wy = torch.stack(wys).to(features.device, features.dtype)  # (K, oh, H)
    wx = torch.stack(wxs).to(features.device, features.dtype)  # (K, ow, W)
    return torch.einsum("koh,chw,kpw->kcop", wy, features, wx)


class EMATeacher(nn.Module):
    """A frozen copy of a module that follows the student by exponential moving average."""

    def __init__(self, student: nn.Module, alpha: float = 0.9):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"EMA alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.module.eval()
        self.updates = 0

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """teacher = alpha * teacher + (1 - alpha) * student, parameter by parameter; buffers are copied."""
        t_params = dict(self.module.named_parameters())
        for name, p in student.named_parameters():
            t = t_params[name]
            t.mul_(self.alpha).add_(p.detach().to(t.dtype), alpha=1.0 - self.alpha)
        t_buffers = dict(self.module.named_buffers())
        for name, b in student.named_buffers():
            t_buffers[name].copy_(b)
        self.updates += 1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> EMATeacher:  # the teacher always runs in eval mode
        super().train(mode)
        self.module.eval()
        return self


def feature_grid(features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Row-major visual-token features (rows * cols, C) -> a (C, rows, cols) map."""
    if features.shape[0] != rows * cols:
        raise ValueError(f"{features.shape[0]} visual features do not fill a {rows}x{cols} grid")
    return features.reshape(rows, cols, -1).permute(2, 0, 1)


def crop_regions(image: Any, boxes: Sequence[Sequence[float]], pad: float = 0.0) -> list[Any]:
    """PIL crops of ``boxes`` (original pixels), each padded by ``pad`` times its height, clipped to the image."""
    crops = []
    for x0, y0, x1, y1 in boxes:
        p = pad * (y1 - y0)
        box = (
            max(0, math.floor(x0 - p)),
            max(0, math.floor(y0 - p)),
            min(image.width, math.ceil(x1 + p)),
            min(image.height, math.ceil(y1 + p)),
        )
        crops.append(image.crop(box))
    return crops


def distill_loss(
    student_grid: torch.Tensor,
    image_size: tuple[int, int],
    boxes: Sequence[Sequence[float]],
    teacher_features: Sequence[torch.Tensor],
    teacher_grids: Sequence[tuple[int, int]],
    output_size: int = 2,
) -> torch.Tensor:
    """MSE between ROIAlign of the student's (C, rows, cols) map over ``boxes`` and each crop's pooled teacher map.

    ``image_size`` is the original (width, height) the boxes are given in; teacher crop features are pooled
    to the same ``output_size`` with ROIAlign over their whole grid.
    """
    c, rows, cols = student_grid.shape
    width, height = image_size
    scaled = [
        (x0 * cols / width, y0 * rows / height, x1 * cols / width, y1 * rows / height) for x0, y0, x1, y1 in boxes
    ]
    student = roi_align(student_grid, scaled, output_size)  # (K, C, o, o)
    targets = []
    for feats, (tr, tc) in zip(teacher_features, teacher_grids, strict=True):
        grid = feature_grid(feats.to(student_grid.dtype), tr, tc)
        targets.append(roi_align(grid, [(0.0, 0.0, float(tc), float(tr))], output_size)[0])
    return F.mse_loss(student, torch.stack(targets).to(student.device).detach())
