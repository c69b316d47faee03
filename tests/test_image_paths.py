"""One image decoder everywhere: labeling, alignment, training, evaluation and the lens see the pixels of
``dvsft.core.images.load_image`` for the inputs naive decoding gets wrong.

The inputs: an EXIF-rotated JPEG (stored 160x96, upright 96x160), a 16-bit PNG of mid-grey values, RGBA and LA
PNGs with black text on a transparent background, a palette PNG whose transparent index is black, and a CMYK
JPEG. Each path runs for real on the tiny Qwen3-VL and its processor; what reaches the model (or the OCR
engine, or the grid) is compared with what ``load_image`` makes of the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from dvsft.core.images import load_image
from dvsft.sources.ocr import register_engine

SIZE = (160, 96)  # stored size of every input; the EXIF one is 96x160 upright
KINDS = ("exif_rotated", "gray16", "rgba", "la", "palette", "cmyk")


def _font() -> ImageFont.FreeTypeFont:
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 18)


def _text(image: Image.Image, fill) -> Image.Image:
    draw = ImageDraw.Draw(image)
    draw.text((8, 10), "Potter", fill=fill, font=_font())
    draw.text((70, 55), "stone", fill=fill, font=_font())
    return image


def write_inputs(folder: Path) -> dict[str, Path]:
    """The six inputs as files in ``folder``: {kind: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / f"{kind}.{'jpg' if kind in ('exif_rotated', 'cmyk') else 'png'}" for kind in KINDS}
    page = _text(Image.new("RGB", SIZE, (250, 240, 200)), (20, 40, 160))
    page.paste((200, 30, 30), (0, 0, 30, 20))  # a corner mark: the rotation shows in the pixels, not only the size
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    page.save(paths["exif_rotated"], quality=95, exif=exif)
    ramp = np.linspace(20000, 45000, SIZE[0] * SIZE[1]).reshape(SIZE[1], SIZE[0]).astype(np.uint16)
    gray16 = Image.fromarray(ramp)
    assert gray16.mode == "I;16"
    gray16.save(paths["gray16"])
    _text(Image.new("RGBA", SIZE, (0, 0, 0, 0)), (0, 0, 0, 255)).save(paths["rgba"])
    _text(Image.new("LA", SIZE, (0, 0)), (0, 255)).save(paths["la"])
    palette = Image.new("P", SIZE, 0)
    palette.putpalette([0, 0, 0, 30, 90, 200] + [0, 0, 0] * 254)  # index 0 black (transparent), 1 blue
    _text(palette, 1).save(paths["palette"], transparency=0)
    page.convert("CMYK").save(paths["cmyk"], quality=95)
    return paths


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return write_inputs(tmp_path_factory.mktemp("image_paths"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from dvsft.models.loading import load_model, load_processor

    return load_model(tiny_dir).eval(), load_processor(tiny_dir)


def test_the_inputs_are_ones_naive_decoding_gets_wrong(inputs):
    assert load_image(inputs["exif_rotated"]).size == (96, 160)
    assert 70 < np.asarray(load_image(inputs["gray16"])).mean() < 180  # mid-grey
    for kind in ("rgba", "la", "palette"):
        pixels = np.asarray(load_image(inputs[kind]))
        assert (pixels == 255).all(axis=-1).mean() > 0.8, kind  # the transparent background is white
        assert (pixels.min(axis=-1) < 100).any(), kind  # and the text is there
    assert Image.open(inputs["cmyk"]).mode == "CMYK"
    for kind in ("exif_rotated", "gray16", "rgba", "la", "palette"):  # Image.open(...).convert("RGB") differs
        naive = Image.open(inputs[kind]).convert("RGB")
        assert naive.size != load_image(inputs[kind]).size or not np.array_equal(naive, load_image(inputs[kind]))


def model_pixels(processor, image: Image.Image) -> torch.Tensor:
    """The pixel_values the processor makes of ``image``."""
    return processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]


def differing(inputs: dict[str, Path], seen: dict[str, np.ndarray | torch.Tensor], expected) -> list[str]:
    """The kinds whose pixels in ``seen`` differ from ``expected(load_image(path))``."""
    bad = []
    for kind, path in inputs.items():
        want, got = expected(load_image(path)), seen[kind]
        same = torch.equal(got, want) if isinstance(want, torch.Tensor) else np.array_equal(got, want)
        if not same:
            bad.append(kind)
    return bad


PROBED: list[Image.Image] = []


@register_engine("test-pixel-probe")
class PixelProbe:
    """An OCR engine that keeps the image it was given and finds no words."""

    def __init__(self, **_):
        pass

    def __call__(self, image: Image.Image) -> list:
        PROBED.append(image.copy())
        return []


def test_labeling_ocrs_load_images_pixels(inputs, tmp_path):
    from dvsft.core.records import read_jsonl
    from dvsft.sources.image_to_label import LabelInput, label_inputs

    seen = {}
    for kind, path in inputs.items():
        PROBED.clear()
        out = tmp_path / f"{kind}.jsonl"
        label_inputs([LabelInput(kind, str(path), path)], out, engine="test-pixel-probe")
        (record,) = read_jsonl(out)
        assert (record["width"], record["height"]) == load_image(path).size
        seen[kind] = np.asarray(PROBED[0])
    assert differing(inputs, seen, np.asarray) == []


def test_alignment_grids_use_load_images_size(inputs, tiny, tmp_path):
    from dvsft.align.run import align_file
    from dvsft.models.geometry import grid_for

    _, processor = tiny
    words = tmp_path / "words.jsonl"
    words.write_text("".join(json.dumps({"id": k, "image": str(p), "words": []}) + "\n" for k, p in inputs.items()))
    align_file(words, tmp_path / "aligned.jsonl", source=processor, tokenizer=processor.tokenizer)
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "aligned.jsonl").read_text().splitlines())}
    for kind, path in inputs.items():
        size = load_image(path).size
        grid = grid_for(processor, *size)
        assert (rows[kind]["width"], rows[kind]["height"]) == size, kind
        assert rows[kind]["grid"] == [grid.rows, grid.cols], kind
    assert rows["exif_rotated"]["grid"] == [5, 3]  # upright 96x160: 5 rows of 3 cells


def test_alignment_overlays_are_drawn_on_load_images_pixels(inputs, tiny, tmp_path):
    """No words: an overlay is the grid drawn over the image, so all else must be load_image's pixels (a 16-bit
    PNG decoded naively comes out white, a transparent one black)."""
    from dvsft.align.overlay import draw_overlay
    from dvsft.align.run import align_file
    from dvsft.models.geometry import grid_for

    _, processor = tiny
    words = tmp_path / "words.jsonl"
    words.write_text("".join(json.dumps({"id": k, "image": str(p), "words": []}) + "\n" for k, p in inputs.items()))
    counts = align_file(words, tmp_path / "aligned.jsonl", source=processor, overlay_dir=tmp_path / "overlays")
    assert counts["overlays"] == len(inputs)
    seen = {kind: np.asarray(Image.open(tmp_path / "overlays" / f"{kind}.png")) for kind in inputs}

    def grid_drawn(image: Image.Image) -> np.ndarray:
        return np.asarray(draw_overlay(image, grid_for(processor, *image.size), []))

    assert differing(inputs, seen, grid_drawn) == []


def test_the_training_collator_feeds_load_images_pixels(inputs, tiny):
    from dvsft.data.collator import VisionCollator

    _, processor = tiny
    collator = VisionCollator(processor)
    messages = [{"role": "user", "content": "<image>Read it."}, {"role": "assistant", "content": "Potter stone"}]
    seen = {
        kind: collator([{"id": kind, "image": str(path), "words": [], "messages": messages}])["pixel_values"]
        for kind, path in inputs.items()
    }
    assert differing(inputs, seen, lambda image: model_pixels(processor, image)) == []


def test_evaluation_items_load_load_images_pixels(inputs):
    from dvsft.evaluation.items import EvalItem

    from_files = {k: np.asarray(EvalItem(k, "q", [], [p]).load_images()[0]) for k, p in inputs.items()}
    from_bytes = {k: np.asarray(EvalItem(k, "q", [], [p.read_bytes()]).load_images()[0]) for k, p in inputs.items()}
    decoded = {k: np.asarray(EvalItem(k, "q", [], [Image.open(p)]).load_images()[0]) for k, p in inputs.items()}
    assert differing(inputs, from_files, np.asarray) == []
    assert differing(inputs, from_bytes, np.asarray) == []
    assert differing(inputs, decoded, np.asarray) == []  # a loader's decoded image gets the same treatment


class VisionInputs:
    """The pixel_values every forward of the model hands its vision tower (a forward pre-hook)."""

    def __init__(self, model):
        self.seen: list[torch.Tensor] = []
        self.handle = model.model.visual.register_forward_pre_hook(self.keep, with_kwargs=True)

    def keep(self, module, args, kwargs) -> None:
        self.seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    def __enter__(self) -> VisionInputs:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_lens_records_feeds_load_images_pixels(inputs, tiny, tmp_path):
    from dvsft.lens.run import lens_records

    model, processor = tiny
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"id": k, "image": str(p), "words": []}) + "\n" for k, p in inputs.items()))
    with VisionInputs(model) as probe:
        lens_records(model, processor, records, tmp_path / "records_lens")
    assert differing(inputs, dict(zip(inputs, probe.seen, strict=True)), lambda im: model_pixels(processor, im)) == []


def test_lens_image_feeds_load_images_pixels(inputs, tiny, tmp_path):
    from dvsft.lens.run import lens_image

    model, processor = tiny
    seen = {}
    for kind, path in inputs.items():
        with VisionInputs(model) as probe:
            overlay, _ = lens_image(model, processor, path, tmp_path / kind)
        (seen[kind],) = probe.seen
        assert Image.open(overlay).size == load_image(path).size, kind  # labels drawn on the upright image
    assert differing(inputs, seen, lambda image: model_pixels(processor, image)) == []


def test_prepare_writes_images_with_load_images_pixels(inputs, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dvsft.core.records import image_path, read_jsonl
    from dvsft.sources.prepare import prepare_dataset

    rows = [
        {"questionId": kind, "question": "What is written?", "answers": ["Potter"], "image": {"bytes": p.read_bytes()}}
        for kind, p in inputs.items()
    ]
    schema = pa.schema(
        [
            ("questionId", pa.string()),
            ("question", pa.string()),
            ("answers", pa.list_(pa.string())),
            ("image", pa.struct([("bytes", pa.binary())])),
        ]
    )
    (tmp_path / "DocVQA").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "DocVQA" / "train-00000-of-00001.parquet")
    stats = prepare_dataset("docvqa", tmp_path / "DocVQA", tmp_path / "out", split="train", instructions=False)
    seen = {
        r["id"].removeprefix("docvqa-"): np.asarray(load_image(image_path(r, stats.out))) for r in read_jsonl(stats.out)
    }
    assert differing(inputs, seen, np.asarray) == []  # a JPEG is written upright, CMYK as RGB; PNGs as they were
