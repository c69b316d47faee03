"""GranViT's localized self-distillation (LSD): ROIAlign of the student's feature grid over a region must match
what an EMA teacher vision tower sees in the crop of that region.

L_distill = MSE(teacher(crop) pooled, ROIAlign(student features, box)); teacher = alpha * teacher +
(1 - alpha) * student after every optimizer step (alpha 0.9, lambda 1 in the paper). The teacher never
receives gradients. ROIAlign (:func:`roi_align`) is ``torchvision.ops.roi_align`` where torchvision is
importable, elsewhere (or with ``use_torchvision=False``) plain torch with torchvision's semantics
(``aligned=True``: pixel centres sit at half-integers; bins are averaged over a regular grid of bilinear
samples; samples beyond the map count zero, as in torchvision's kernel); tests/test_lsd.py compares it
with torchvision's own code.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dvsft.models.geometry import TRAIN_MAX_PIXELS, TRAIN_MIN_PIXELS
from dvsft.objectives.base import Objective

log = logging.getLogger(__name__)


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


@functools.cache
def torchvision_roi_align() -> Callable[..., torch.Tensor] | None:
    """``torchvision.ops.roi_align`` when torchvision is importable, else None (looked up once)."""
    try:
        from torchvision.ops import roi_align as op
    except (ImportError, RuntimeError) as err:  # absent, or built for another torch
        log.debug("ROIAlign in plain torch: torchvision.ops.roi_align is not importable (%s)", err)
        return None
    return op


def roi_align(
    features: torch.Tensor,
    boxes: torch.Tensor | Sequence[Sequence[float]],
    output_size: int | tuple[int, int] = 2,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
    use_torchvision: bool | None = None,
) -> torch.Tensor:
    """Bilinear ROIAlign of one feature map ``(C, H, W)`` over ``boxes`` ``(K, 4)`` ``(x0, y0, x1, y1)``.

    Returns ``(K, C, out_h, out_w)``. Boxes are in input coordinates that ``spatial_scale`` maps to the
    feature grid; ``sampling_ratio <= 0`` uses ``ceil(bin size)`` samples per bin (torchvision's rule).
    ``use_torchvision``: ``torchvision.ops.roi_align`` (True), the plain-torch implementation here (False),
    or the first where torchvision is importable (None, :func:`torchvision_roi_align`). Gradients flow to
    ``features`` either way.
    """
    if features.dim() != 3:
        raise ValueError(f"roi_align expects one (C, H, W) feature map, got shape {tuple(features.shape)}")
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    boxes_t = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    op = torchvision_roi_align() if use_torchvision is not False else None
    if use_torchvision and op is None:
        raise ImportError("roi_align(use_torchvision=True): torchvision.ops.roi_align is not importable")
    if op is None:
        return _plain_roi_align(features, boxes_t, size, spatial_scale, sampling_ratio, aligned)
    rois = torch.cat([boxes_t.new_zeros(len(boxes_t), 1), boxes_t], 1).to(features.device, features.dtype)
    return op(features[None], rois, size, spatial_scale, sampling_ratio, aligned)


def _plain_roi_align(features, boxes, size, spatial_scale, sampling_ratio, aligned) -> torch.Tensor:
    """:func:`roi_align` in plain torch; ``boxes`` float64 ``(K, 4)``, ``size`` ``(out_h, out_w)``.

    Separable: each bin's value is ``Wy @ F @ Wx^T`` with per-axis averaged bilinear weights.
    """
    oh, ow = size
    _, h, w = features.shape
    offset = 0.5 if aligned else 0.0
    wys, wxs = [], []
    for x0, y0, x1, y1 in boxes.tolist():
        sx0, sy0 = x0 * spatial_scale - offset, y0 * spatial_scale - offset
        rw, rh = (x1 - x0) * spatial_scale, (y1 - y0) * spatial_scale
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        # torchvision's adaptive rule: a box of zero height (width) gets no samples and pools to zero
        gy = sampling_ratio if sampling_ratio > 0 else max(0, math.ceil(rh / oh))
        gx = sampling_ratio if sampling_ratio > 0 else max(0, math.ceil(rw / ow))
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


# ---------------------------------------------------------------- the `lsd` training objective


@dataclass
class LSDOptions:
    weight: float = 1.0  # lambda (GranViT: 1)
    alpha: float = 0.9  # EMA decay of the teacher (GranViT: 0.9)
    output_size: int = 2  # ROIAlign bins per side
    regions_per_image: int = 4  # word/phrase boxes distilled per image and step
    level: str = "word"  # word | phrase
    max_words: int = 10  # words per phrase at level phrase
    pad: float = 0.0  # crop padding, in units of the region's height
    seed: int = 0


def crop_image_processor(config: Any) -> Any:
    """A PIL image processor like the training one: crops reach the teacher the way images reach the model
    (``config``'s min / max pixels; the training defaults where it lacks them, as the collator's)."""
    from transformers import Qwen2VLImageProcessorPil

    path = getattr(config, "model_vision_from", None) or getattr(config, "model", None)
    if path == "tiny" or path is None:
        ip = Qwen2VLImageProcessorPil(
            patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
    else:
        ip = Qwen2VLImageProcessorPil.from_pretrained(path)
    ip.size["shortest_edge"] = int(getattr(config, "min_pixels", TRAIN_MIN_PIXELS))
    ip.size["longest_edge"] = int(getattr(config, "max_pixels", TRAIN_MAX_PIXELS))
    return ip


class LSDObjective(Objective):
    """GranViT's localized self-distillation on word/phrase boxes of each training image."""

    requires = ("sft",)
    needs_records = True  # the batch must carry the records (image path, size, words)
    Options = LSDOptions

    def setup(self, model: nn.Module, config: Any) -> None:
        from dvsft.objectives.base import base_model, vision_tower_of

        opts = self.options
        if opts.level not in ("word", "phrase"):
            raise ValueError(f"objectives.lsd.level must be word or phrase, got {opts.level!r}")
        student = vision_tower_of(base_model(model))
        encoder = [p for n, p in student.named_parameters() if "merger" not in n]  # the ViT without projector
        if not any(p.requires_grad for p in encoder):
            # LSD exists to train the vision encoder; frozen, it would only move the projector
            log.warning("lsd: the vision encoder was frozen; making it trainable (set train.vision: true to silence)")
            for p in encoder:
                p.requires_grad_(True)
        self.student = student
        self.teacher = EMATeacher(student, opts.alpha)
        self.image_processor = crop_image_processor(config)
        self.rng = random.Random(opts.seed)
        self._captured: Any = None
        self._hook = student.register_forward_hook(self._capture)

    def callbacks(self) -> list[Any]:
        """The EMA teacher follows the student after every optimizer step (a ``TrainerCallback``)."""
        from transformers import TrainerCallback

        objective = self

        class EMAUpdate(TrainerCallback):
            def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                objective.teacher.update(objective.student)

        return [EMAUpdate()]

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self._captured = getattr(output, "pooler_output", output)

    def close(self) -> None:
        """Remove the forward hook (the objective stops reading the student's features)."""
        self._hook.remove()

    def weights(self) -> dict[str, float]:
        return {"lsd_loss": float(self.options.weight)}

    def regions(self, record: dict[str, Any]) -> list[tuple[float, float, float, float]]:
        from dvsft.sources.region_tasks import regions_of

        regs = regions_of(record, self.options.level, self.options.max_words)
        regs = [r for r in regs if r.box[2] - r.box[0] >= 2 and r.box[3] - r.box[1] >= 2]
        regs = [
            r
            for r in regs
            if max(r.box[2] - r.box[0], r.box[3] - r.box[1]) < 150 * min(r.box[2] - r.box[0], r.box[3] - r.box[1])
        ]
        if len(regs) > self.options.regions_per_image:
            regs = self.rng.sample(regs, self.options.regions_per_image)
        return [r.box for r in regs]

    def teacher_features(
        self, crops: list[Any], device: torch.device
    ) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        from dvsft.objectives.codes import tower_features

        out = self.image_processor(images=crops, return_tensors="pt")
        thw = out["image_grid_thw"]
        self.teacher.module.to(device)
        feats = tower_features(self.teacher.module, out["pixel_values"].to(device), thw.to(device))
        merge = self.image_processor.merge_size
        return feats, [(int(t[1]) // merge, int(t[2]) // merge) for t in thw]

    def loss(self, model, batch, hidden):
        from dvsft.core.images import load_image

        records = batch.get("records")
        if records is None:
            raise ValueError("the lsd objective needs the batch records (VisionCollator(keep_records=True))")
        captured, self._captured = self._captured, None
        zero = hidden.last.sum() * 0.0
        if captured is None:
            return {"lsd_loss": zero, "lsd_regions": zero.detach()}
        thw = batch["image_grid_thw"]
        merge = self.student.spatial_merge_size
        sizes = (thw.prod(-1) // merge**2).tolist()
        per_image = torch.split(captured, sizes)
        total, n = zero, 0
        for rec, feats, grid in zip(records, per_image, thw.tolist(), strict=True):
            boxes = self.regions(rec)
            if not boxes:
                continue
            image = load_image(rec["image"])
            crops = crop_regions(image, boxes, self.options.pad)
            t_feats, t_grids = self.teacher_features(crops, feats.device)
            rows, cols = grid[1] // merge, grid[2] // merge
            student = feature_grid(feats, rows, cols)
            total = total + distill_loss(student, image.size, boxes, t_feats, t_grids, self.options.output_size) * len(
                boxes
            )
            n += len(boxes)
        value = total / n if n else zero
        return {"lsd_loss": value, "lsd_regions": hidden.last.new_tensor(float(n))}
