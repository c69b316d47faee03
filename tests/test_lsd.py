"""Localized self-distillation: ROIAlign (torchvision's or plain torch), the EMA teacher, the distillation loss."""

import sys

import pytest
import torch

from dvsft.objectives import lsd
from dvsft.objectives.lsd import EMATeacher, crop_regions, distill_loss, feature_grid, roi_align


def test_roi_align_matches_hand_computed_bilinear_example():
    # a 1-channel 3x4 map; value at (row r, col c) = 10 r + c
    f = torch.tensor([[0.0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23]])[None]
    # box (x0, y0, x1, y1) = (0.5, 0.5, 2.5, 1.5), 1x2 bins, one sample per bin, aligned (pixel centres at +0.5):
    # x: start 0.5 - 0.5 = 0.0, bins 1.0 wide -> samples at 0.5 and 1.5; y: start 0.0, 1.0 high -> sample at 0.5
    # f(y=0.5, x=0.5) = 0.25 * (0 + 1 + 10 + 11) = 5.5 ; f(y=0.5, x=1.5) = 0.25 * (1 + 2 + 11 + 12) = 6.5
    out = roi_align(f, [(0.5, 0.5, 2.5, 1.5)], output_size=(1, 2), sampling_ratio=1)
    assert out.shape == (1, 1, 1, 2)
    assert out[0, 0, 0].tolist() == pytest.approx([5.5, 6.5])
    # 2x2 samples per bin average four bilinear values: for bin 0, x in {0.25, 0.75}, y in {0.25, 0.75}
    # f(y, x) = 10 y + x (the map is linear inside), so the mean is 10 * 0.5 + 0.5 = 5.5 again
    out = roi_align(f, [(0.5, 0.5, 2.5, 1.5)], output_size=(1, 2), sampling_ratio=2)
    assert out[0, 0, 0].tolist() == pytest.approx([5.5, 6.5])
    # a nonlinear map makes the sample grid matter: g = f ** 2 at (y, x) = (0.5, 0.5) with one sample
    g = f**2
    one = roi_align(g, [(0.5, 0.5, 1.5, 1.5)], output_size=1, sampling_ratio=1)
    assert one.item() == pytest.approx(0.25 * (0 + 1 + 100 + 121))
    # samples clamp at the border (torchvision): a box on the last row/col reads the edge value
    edge = roi_align(f, [(3.5, 2.5, 4.5, 3.5)], output_size=1, sampling_ratio=1)
    assert edge.item() == pytest.approx(23.0)
    # samples beyond the map (past -1 or the size) count zero, as in torchvision's kernel (its pure-PyTorch
    # reference clamps them instead): a 2x2-sample bin at x in {3.5, 4.5}, y in {0.25, 0.75} of the 4-wide map
    # reads column 3 (clamped to the edge) at y = 0.25 and 0.75 (values 5.5 and 10.5) and zero twice
    assert roi_align(f, [(3.5, 0.5, 5.5, 1.5)], output_size=1, sampling_ratio=2).item() == pytest.approx(4.0)
    assert roi_align(f, [(10.0, 10.0, 12.0, 12.0)], output_size=1, sampling_ratio=1).item() == 0.0
    # and a whole-map box with the adaptive rule averages to the map mean (linear map)
    assert roi_align(f, [(0, 0, 4, 3)], output_size=1).item() == pytest.approx(f.mean().item())


def test_roi_align_scale_batching_and_gradients():
    torch.manual_seed(0)
    f = torch.randn(5, 6, 7, requires_grad=True)
    boxes = [(0, 0, 32, 32), (10.0, 20.0, 90.0, 60.0)]
    both = roi_align(f, boxes, output_size=3, spatial_scale=1 / 16)
    assert both.shape == (2, 5, 3, 3)
    single = roi_align(f, [(10.0, 20.0, 90.0, 60.0)], output_size=3, spatial_scale=1 / 16)
    assert torch.allclose(both[1], single[0])
    # the same box given in feature units gives the same result
    scaled = roi_align(f, [(10 / 16, 20 / 16, 90 / 16, 60 / 16)], output_size=3)
    assert torch.allclose(scaled[0], single[0])
    both.sum().backward()
    assert f.grad is not None and f.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one \\(C, H, W\\) feature map"):
        roi_align(torch.zeros(1, 2, 3, 4), boxes)


def random_boxes(gen, n, height, width, scale, aligned):
    """Boxes (input coordinates) whose samples stay on the map, some of zero width or height."""
    # inside the map: torchvision's pure-PyTorch reference clamps samples beyond it, its kernel (and ours) zero them
    x0 = torch.rand(n, generator=gen, dtype=torch.float64) * (width - 1.5)
    y0 = torch.rand(n, generator=gen, dtype=torch.float64) * (height - 1.5)
    x1 = x0 + torch.rand(n, generator=gen, dtype=torch.float64) * (width - x0)
    y1 = y0 + torch.rand(n, generator=gen, dtype=torch.float64) * (height - y0)
    if aligned:
        x1[0], y1[1] = x0[0], y0[1]  # zero width / zero height: no samples, zeros (torchvision's rule)
    return torch.stack([x0, y0, x1, y1], 1) / scale


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2, 3])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5, 1 / 16])
def test_roi_align_matches_torchvision(torchvision_roi_align, aligned, sampling_ratio, spatial_scale):
    reference, what = torchvision_roi_align
    gen = torch.Generator().manual_seed(int(sampling_ratio * 10 + spatial_scale * 100 + aligned))
    for c, h, w, out in [(3, 5, 7, (2, 2)), (4, 9, 6, (1, 3)), (2, 12, 20, (3, 2))]:
        features = torch.randn(c, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
        boxes = random_boxes(gen, 8, h, w, spatial_scale, aligned)
        rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], 1)
        with torch.no_grad():
            ours = roi_align(features, boxes, out, spatial_scale, sampling_ratio, aligned, use_torchvision=False)
            theirs = reference(features[None], rois, spatial_scale, out[0], out[1], sampling_ratio, aligned)
        assert ours.shape == theirs.shape == (8, c, *out)
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")
        if aligned and sampling_ratio <= 0:
            assert ours[:2].abs().max() == 0  # the zero-width and zero-height boxes get no samples
        # gradients on boxes of nonzero size (the reference's gradient is NaN for a sample-less box: 0/0 positions)
        ref_features = features.detach().clone().requires_grad_(True)
        theirs = reference(ref_features[None], rois[2:], spatial_scale, out[0], out[1], sampling_ratio, aligned)
        ours = roi_align(features, boxes[2:], out, spatial_scale, sampling_ratio, aligned, use_torchvision=False)
        weights = torch.randn(theirs.shape, generator=gen, dtype=torch.float64)
        (ours * weights).sum().backward()
        (theirs * weights).sum().backward()
        torch.testing.assert_close(features.grad, ref_features.grad, rtol=1e-10, atol=1e-12)


STANDIN_OPS = """from torchvision_reference import fetch_source, load_reference

_roi_align = load_reference(fetch_source())


def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    return _roi_align(input, boxes, spatial_scale, ph, pw, sampling_ratio, aligned)
"""


@pytest.fixture
def standin_torchvision(tmp_path, monkeypatch):
    """An importable ``torchvision`` whose ``ops.roi_align`` is torchvision's own pure-PyTorch reference
    (tests/torchvision_reference.py), in place of any installed torchvision for the test's duration."""
    from torchvision_reference import fetch_source

    try:
        fetch_source()
    except RuntimeError as err:
        pytest.skip(f"no torchvision reference: the package registry is unreachable ({err})")
    (tmp_path / "torchvision" / "ops").mkdir(parents=True)
    (tmp_path / "torchvision" / "__init__.py").write_text("")
    (tmp_path / "torchvision" / "ops" / "__init__.py").write_text(STANDIN_OPS)
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    lsd.torchvision_roi_align.cache_clear()
    yield
    lsd.torchvision_roi_align.cache_clear()
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        if (getattr(sys.modules[name], "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def test_roi_align_runs_torchvision_where_it_is_importable(standin_torchvision):
    import torchvision.ops

    assert lsd.torchvision_roi_align() is torchvision.ops.roi_align
    f = torch.tensor([[0.0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23]], dtype=torch.float64)[None]
    inside = [(0.5, 0.5, 2.5, 1.5), (0.0, 0.0, 4.0, 3.0)]
    for size, ratio in (((1, 2), 1), (1, -1), (2, 2)):
        plain = roi_align(f, inside, size, sampling_ratio=ratio, use_torchvision=False)
        torch.testing.assert_close(roi_align(f, inside, size, sampling_ratio=ratio), plain)
    # past the map's edge the two differ, which shows which one ran: the reference clamps the samples at
    # x = 3.5 and 4.5 to column 3 (values 5.5, 10.5 at y = 0.25, 0.75: mean 8), the plain one zeroes them (4)
    beyond = [(3.5, 0.5, 5.5, 1.5)]
    assert roi_align(f, beyond, output_size=1, sampling_ratio=2).item() == pytest.approx(8.0)
    assert roi_align(f, beyond, output_size=1, sampling_ratio=2, use_torchvision=True).item() == pytest.approx(8.0)
    assert roi_align(f, beyond, output_size=1, sampling_ratio=2, use_torchvision=False).item() == pytest.approx(4.0)


def test_roi_align_is_plain_torch_where_torchvision_is_not_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # what Python does for a package that is absent
    lsd.torchvision_roi_align.cache_clear()
    try:
        assert lsd.torchvision_roi_align() is None
        f = torch.tensor([[0.0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23]])[None]
        assert roi_align(f, [(3.5, 0.5, 5.5, 1.5)], output_size=1, sampling_ratio=2).item() == pytest.approx(4.0)
        with pytest.raises(ImportError, match="torchvision.ops.roi_align is not importable"):
            roi_align(f, [(0, 0, 1, 1)], use_torchvision=True)
    finally:
        lsd.torchvision_roi_align.cache_clear()


def test_distill_loss_pools_like_torchvision(torchvision_roi_align):
    """LSD's use: boxes in image pixels scaled to the token grid, aligned, 2x2 bins, adaptive sampling."""
    reference, _ = torchvision_roi_align
    gen = torch.Generator().manual_seed(3)
    rows, cols, width, height = 6, 9, 288, 192
    grid = torch.randn(5, rows, cols, generator=gen, dtype=torch.float64)
    boxes = random_boxes(gen, 6, height, width, 1.0, aligned=False)
    scaled = boxes * torch.tensor([cols / width, rows / height] * 2, dtype=torch.float64)
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), scaled], 1)
    theirs = reference(grid[None], rois, 1.0, 2, 2, -1, True)
    teacher = [torch.zeros(4, 5, dtype=torch.float64)] * len(boxes)  # a zero target: the loss is mean(pooled ** 2)
    loss = distill_loss(grid, (width, height), boxes.tolist(), teacher, [(2, 2)] * len(boxes), output_size=2)
    torch.testing.assert_close(loss, theirs.pow(2).mean(), rtol=1e-10, atol=1e-12)


def test_ema_teacher_follows_with_alpha_and_gets_no_gradients():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    teacher = EMATeacher(student, alpha=0.9)
    t0 = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    assert all(not p.requires_grad for p in teacher.module.parameters())
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    x = torch.randn(8, 4)
    student(x).pow(2).sum().backward()
    opt.step()
    teacher.update(student)
    s = student.state_dict()
    for name, p in teacher.module.named_parameters():
        assert torch.allclose(p, 0.9 * t0[name] + 0.1 * s[name]), name
    # buffers (BatchNorm running stats) are copied
    assert torch.equal(teacher.module[1].running_mean, student[1].running_mean)
    # a loss through the teacher leaves it without gradients; the student's graph is untouched
    out = teacher(x)
    assert not out.requires_grad
    teacher.train()
    assert not teacher.module.training
    with pytest.raises(ValueError, match="alpha"):
        EMATeacher(student, alpha=1.5)


def test_distill_loss_is_mse_of_pooled_regions():
    torch.manual_seed(1)
    rows, cols, c = 4, 6, 3
    student_tokens = torch.randn(rows * cols, c, requires_grad=True)
    grid = feature_grid(student_tokens, rows, cols)
    assert torch.equal(grid[:, 1, 2], student_tokens[1 * cols + 2])
    # image 120 x 80 px -> 20 px per cell; the box covers cells (row 1, cols 2..3)
    box = (40.0, 20.0, 80.0, 40.0)
    teacher = [torch.randn(2 * 2, c)]
    loss = distill_loss(grid, (120, 80), [box], teacher, [(2, 2)], output_size=1)
    expected_student = student_tokens[[1 * cols + 2, 1 * cols + 3]].mean(0)
    expected = ((expected_student - teacher[0].mean(0)) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert student_tokens.grad[1 * cols + 2].abs().sum() > 0 and student_tokens.grad[0].abs().sum() == 0


def test_crop_regions_pads_and_clips():
    from PIL import Image

    im = Image.new("RGB", (100, 50))
    a, b = crop_regions(im, [(10.2, 5.0, 30.7, 15.0), (90, 40, 100, 50)], pad=0.5)
    assert a.size == (36 - 5, 20 - 0)  # pad 5 px: x 5.2 -> 5 (floor), 35.7 -> 36 (ceil), y 0 .. 20
    assert b.size == (100 - 85, 50 - 35)


@pytest.fixture(scope="module")
def lsd_data(tmp_path_factory):
    """A tiny model dir and three rendered pages with transcription messages."""
    import random

    from dvsft.core.records import write_jsonl
    from dvsft.sources.corpora import corpus_text
    from dvsft.sources.render import Renderer
    from dvsft.testing.tiny import TinyConfig, save_tiny

    d = tmp_path_factory.mktemp("lsd")
    cfg = TinyConfig()
    save_tiny(d / "model", cfg)
    r = Renderer("qwen3-vl", cols=8, max_rows=3, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    rows = []
    for i, p in enumerate(r.render_text(corpus_text()[9000:9500], random.Random(2))[:3]):
        p.save(d / f"p{i}.png")
        messages = [{"role": "user", "content": "<image>Read."}, {"role": "assistant", "content": p.text}]
        rows.append({"id": f"p{i}", "image": f"p{i}.png", "width": p.width, "height": p.height, "words": p.words})
        rows[-1]["messages"] = messages
    write_jsonl(d / "words.jsonl", rows)
    return d


@pytest.mark.slow
def test_lsd_objective_ema_teacher_in_training(lsd_data, tmp_path):
    from transformers import TrainerCallback

    from dvsft.objectives.base import vision_tower_of
    from dvsft.training.train import prepare

    cfg = {
        "model": str(lsd_data / "model"),
        "data": str(lsd_data / "words.jsonl"),
        "output_dir": str(tmp_path / "run"),
        "method": "dvsft+lsd",
        "max_steps": 4,
        "global_batch_size": 3,
        "per_device_train_batch_size": 3,
        "learning_rate": 5e-3,
        "warmup_steps": 0.0,
        "lr_scheduler_type": "constant",
        "min_pixels": 32 * 32 * 4,
        "max_pixels": 32 * 32 * 256,
        "report_to": "none",
        "save_steps": 1000,
        "logging_steps": 1,
        "train": {"vision": False},  # LSD turns the vision tower on itself
        "objectives": {"lsd": {"alpha": 0.8, "regions_per_image": 3}},
    }
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            tower = vision_tower_of(model)
            snapshots.append({k: v.detach().clone() for k, v in tower.named_parameters()})

    run = prepare(cfg, callbacks=[Snapshot()])
    lsd = next(o for o in run.objectives if o.name == "lsd")
    student = vision_tower_of(run.model)
    assert all(p.requires_grad for p in student.parameters())  # encoder switched on, projector was on
    expected = {k: v.detach().clone() for k, v in student.named_parameters()}  # teacher starts as the student
    run.trainer.train()
    assert lsd.teacher.updates == 4 == len(snapshots)
    for snap in snapshots:  # one EMA step per optimizer step, with the configured alpha
        expected = {k: 0.8 * expected[k] + 0.2 * snap[k] for k in expected}
    teacher = dict(lsd.teacher.module.get_submodule("model/visual").named_parameters())  # the tower's copy
    for k, v in expected.items():
        assert torch.allclose(teacher[k], v, atol=1e-6), k
        assert teacher[k].grad is None and not teacher[k].requires_grad
    # the student moved (LSD and the other losses reach the vision tower) and the teacher lags behind it
    first = snapshots[0]
    assert any(not torch.equal(first[k], snapshots[-1][k]) for k in first)
    assert any(not torch.allclose(teacher[k], snapshots[-1][k]) for k in teacher)
    rows = [r for r in run.log_callback.rows if "lsd_loss" in r]
    assert len(rows) == 4 and all(r["lsd_loss"] > 0 and r["lsd_regions"] == 9 for r in rows)


def test_lsd_needs_records_in_the_batch():
    from dvsft.objectives.lsd import LSDObjective

    obj = LSDObjective()
    with pytest.raises(ValueError, match="needs the batch records"):
        obj.loss(None, {"image_grid_thw": torch.ones(1, 3)}, type("H", (), {"last": torch.zeros(1, 2, 3)})())
