"""GranViT's localized self-distillation (LSD): ROIAlign of the student's feature grid over a region must match
what an EMA teacher vision tower sees in the crop of that region.

L_distill = MSE(teacher(crop) pooled, ROIAlign(student features, box)); teacher = alpha * teacher +
(1 - alpha) * student after every optimizer step (alpha 0.9, lambda 1 in the paper). The teacher never
receives gradients. Every family: the student's features are the LLM's input embeddings at the image tokens (the
projector's output), the teacher an EMA copy of the model's vision parts (tower, projector) that runs through the
model's own ``get_image_features`` (:meth:`~dvsft.models.families.FamilySpec.vision_features`); both are read on
the view that sees the whole image (:func:`whole_view`), and crops reach the teacher through the run's own
processor (:func:`crop_processor`). ROIAlign (:func:`roi_align`) is ``torchvision.ops.roi_align`` where torchvision is
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


def crop_processor(processor: Any, config: Any) -> Any:
    """The processor that takes LSD's crops (and gives the student's layout): a copy of the run's own, with
    ``config``'s min / max pixels (the training defaults where it lacks them) set as the collator sets them, so
    crops reach the teacher the way images reach the model."""
    from dvsft.models.loading import set_pixels

    out = copy.copy(processor)
    out.image_processor = copy.deepcopy(processor.image_processor)
    min_pixels = int(getattr(config, "min_pixels", TRAIN_MIN_PIXELS))
    set_pixels(out, min_pixels, int(getattr(config, "max_pixels", TRAIN_MAX_PIXELS)))
    return out


def whole_view(layout: Any) -> Any:
    """The view of ``layout`` that sees the whole image, the one with the most tokens where several do (Qwen-VL's
    one view, InternVL's thumbnail or single tile, LLaVA-OneVision's crop grid, Idefics3's global image)."""
    w, h, eps = layout.width, layout.height, 1e-6
    whole = [v for v in layout.views if max(v.region[:2]) <= eps and v.region[2] >= w - eps and v.region[3] >= h - eps]
    if not whole:
        raise ValueError(f"no view of the {layout.family} layout sees the whole {w}x{h} image")
    return max(whole, key=lambda v: v.num_tokens)


def view_rows(features: torch.Tensor, view: Any) -> torch.Tensor:
    """``view``'s tokens, row-major, from one image's ``(image tokens, C)`` features (newline slots left out)."""
    return features[[view.position(k) for k in range(view.num_tokens)]]


def region_boxes(view: Any, boxes: Sequence[Sequence[float]]) -> tuple[tuple[float, float], list[list[float]]]:
    """(size, boxes) of ``boxes`` (original pixels) relative to ``view``'s region, for :func:`distill_loss`."""
    x0, y0, x1, y1 = view.region
    return (x1 - x0, y1 - y0), [[b[0] - x0, b[1] - y0, b[2] - x0, b[3] - y0] for b in boxes]


class LSDObjective(Objective):
    """GranViT's localized self-distillation on word/phrase boxes of each training image, on every family: the
    student's features are the LLM's input embeddings at the image's tokens (the projector's output), the teacher
    an EMA copy of the model's vision parts, both read on the view that sees the whole image."""

    requires = ("sft",)
    needs_records = True  # the batch must carry the records (image path, size, words)
    needs_hidden_states = True  # layers[0]: the student's features
    Options = LSDOptions

    def setup(self, model: nn.Module, config: Any) -> None:
        from dvsft.objectives.base import base_model, family_of

        opts = self.options
        if opts.level not in ("word", "phrase"):
            raise ValueError(f"objectives.lsd.level must be word or phrase, got {opts.level!r}")
        base = base_model(model)
        spec = family_of(base)
        student = spec.vision_parts(base)
        projector = {id(p) for p in spec.projector(base).parameters()}
        encoder = [p for p in spec.vision_tower(base).parameters() if id(p) not in projector]
        if not any(p.requires_grad for p in encoder):
            # LSD exists to train the vision encoder; frozen, it would only move the projector
            log.warning("lsd: the vision encoder was frozen; making it trainable (set train.vision: true to silence)")
            for p in encoder:
                p.requires_grad_(True)
        self.config = config  # its min / max pixels size the crops
        self.student = student
        self.teacher = EMATeacher(student, opts.alpha)
        self.processor: Any = None  # the run's, with the training pixels (:meth:`callbacks`)
        self.rng = random.Random(opts.seed)

    def callbacks(self) -> list[Any]:
        """The run's processor takes the crops to the teacher; the EMA teacher follows the student after every
        optimizer step."""
        from transformers import TrainerCallback

        from dvsft.objectives.base import processor_callback

        objective = self

        def receive(processor: Any) -> None:
            objective.processor = crop_processor(processor, objective.config) if processor is not None else None

        class EMAUpdate(TrainerCallback):
            def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                objective.teacher.update(objective.student)

        return [processor_callback(receive), EMAUpdate()]

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
        self, model: nn.Module, crops: list[Any], device: torch.device
    ) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """The teacher's features of each crop on the view that sees the whole crop: (its tokens' features,
        row-major, and its (rows, cols)) per crop."""
        from dvsft.models.geometry import layout_for
        from dvsft.objectives.codes import image_features, process_images, token_counts

        inputs = {k: v.to(device) for k, v in process_images(self.processor, crops).items() if torch.is_tensor(v)}
        self.teacher.module.to(device)
        with torch.no_grad():
            feats = image_features(model, inputs, token_counts(self.processor, crops), self.teacher.module)
        views = [whole_view(layout_for(self.processor, *c.size)) for c in crops]
        return [view_rows(f, v) for f, v in zip(feats, views, strict=True)], [(v.rows, v.cols) for v in views]

    def loss(self, model, batch, hidden):
        from dvsft.core.images import load_image
        from dvsft.models.geometry import layout_for

        records = batch.get("records")
        if records is None:
            raise ValueError("the lsd objective needs the batch records (VisionCollator(keep_records=True))")
        if hidden.layers is None:
            raise ValueError("the lsd objective needs all hidden states (needs_hidden_states)")
        zero = hidden.last.sum() * 0.0
        if not (model.training and torch.is_grad_enabled()):  # distillation trains; evaluation reports nothing
            return {"lsd_loss": zero, "lsd_regions": zero.detach()}
        if self.processor is None:
            raise ValueError("the lsd objective needs the run's processor (DVSFTTrainer(processing_class=...))")
        total, n = zero, 0
        for b, rec in enumerate(records):
            boxes = self.regions(rec)
            if not boxes:
                continue
            image = load_image(rec["image"])
            view = whole_view(layout_for(self.processor, *image.size))
            student = feature_grid(view_rows(hidden.layers[0][b][hidden.image_mask[b]], view), view.rows, view.cols)
            crops = crop_regions(image, boxes, self.options.pad)
            t_feats, t_grids = self.teacher_features(model, crops, student.device)
            size, in_view = region_boxes(view, boxes)
            value = distill_loss(student, size, in_view, t_feats, t_grids, self.options.output_size)
            total, n = total + value * len(boxes), n + len(boxes)
        value = total / n if n else zero
        return {"lsd_loss": value, "lsd_regions": hidden.last.new_tensor(float(n))}
