"""`dvsft prepare coco`: COCO / LVIS instances with real PNG images into region records, joined to LLaVA / ShareGPT
conversations or given a listing question; bad annotations and images reported, the run going on; then `dvsft align
--label-policy fill` on the output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from dvsft.cli import app
from dvsft.core.records import read_jsonl

L_SHAPE = [[0, 0, 64, 0, 64, 32, 32, 32, 32, 64, 0, 64]]  # the cells (0, 0), (0, 1), (1, 0) of a 32-px grid
RLE = {"counts": [4000, 2048, 6240], "size": [96, 128]}
FILL = ["--label-policy", "fill"]


def draw(path: Path, size: tuple[int, int], shapes: list[tuple[str, list[float]]]) -> None:
    """A real PNG: white, with each (colour, polygon) filled in."""
    im = Image.new("RGB", size, "white")
    for colour, flat in shapes:
        ImageDraw.Draw(im).polygon(list(zip(flat[::2], flat[1::2], strict=True)), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def coco_set(root: Path) -> Path:
    """Images 1 (a dog polygon, a cat RLE, a crowd), 2 (its file missing), 3 (a traffic light), 4 (its file 50x40,
    the JSON says 60x40), 5 (only bad annotations); annotations with bad boxes, polygons, images and categories."""
    images = root / "images"
    draw(images / "a.png", (128, 96), [("brown", L_SHAPE[0]), ("black", [96, 32, 128, 32, 128, 96, 96, 96])])
    draw(images / "c.png", (64, 64), [("green", [0, 0, 20, 0, 20, 50, 0, 50])])
    draw(images / "d.png", (50, 40), [])
    draw(images / "e.png", (40, 40), [])
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 128, "height": 96},
            {"id": 2, "file_name": "b.png", "width": 64, "height": 64},
            {"id": 3, "file_name": "c.png", "width": 64, "height": 64},
            {"id": 4, "file_name": "d.png", "width": 60, "height": 40},
            {"id": 5, "file_name": "e.png", "width": 40, "height": 40},
            {"id": 6, "width": 40, "height": 40},
        ],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "traffic light"}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [0, 0, 64, 64], "segmentation": L_SHAPE, "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 2, "bbox": [96, 32, 32, 64], "segmentation": RLE, "iscrowd": 0},
            {"id": 13, "image_id": 1, "category_id": 1, "bbox": [0, 64, 128, 32], "segmentation": RLE, "iscrowd": 1},
            {"id": 21, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "segmentation": []},
            {
                "id": 31,
                "image_id": 3,
                "category_id": 3,
                "bbox": [0, 0, 20, 50],
                "segmentation": [[0, 0, 20, 0, 20, 50]],
            },
            {"id": 32, "image_id": 3, "category_id": 1, "bbox": [70, 70, 10, 10], "segmentation": []},
            {"id": 33, "image_id": 99, "category_id": 1, "bbox": [0, 0, 10, 10], "segmentation": []},
            {"id": 34, "image_id": 3, "category_id": 7, "bbox": [0, 0, 10, 10], "segmentation": []},
            {"id": 41, "image_id": 4, "category_id": 2, "bbox": [0, 0, 10, 10], "segmentation": []},
            {"id": 51, "image_id": 5, "category_id": 2, "bbox": [0, 0, 10, 10], "segmentation": [[0, 0, 10, 0, 10]]},
        ],
    }
    path = root / "instances_val.json"
    path.write_text(json.dumps(data))
    return path


def prepare_args(instances: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "coco", str(instances), "--images", str(images), "--out", str(out), *extra]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """The real entry point (``dvsft ...``): exit code and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        app(args=args, prog_name="dvsft")
    return exit_info.value.code, capsys.readouterr().err


def test_coco_instances_become_region_records_and_problems_are_reported(tmp_path, capsys):
    instances = coco_set(tmp_path / "coco")
    out = tmp_path / "out"
    code, err = run_cli(prepare_args(instances, tmp_path / "coco/images", out), capsys)
    assert code == 0, err
    assert "2 records, 3 regions (2 with a polygon, 1 box only)" in err and "--label-policy fill" in err
    a, c = read_jsonl(out / "instances_val.jsonl")
    assert (a["id"], a["image"], a["width"], a["height"]) == ("coco-1", "../coco/images/a.png", 128, 96)
    assert a["words"] == [
        {"text": "dog", "box": [0.0, 0.0, 64.0, 64.0], "kind": "object", "polygon": [[float(v) for v in L_SHAPE[0]]]},
        {"text": "cat", "box": [96.0, 32.0, 128.0, 96.0], "kind": "object"},  # RLE: its box alone
    ]
    assert a["messages"] == [
        {"role": "user", "content": "<image>What objects are in the image?"},
        {"role": "assistant", "content": "dog, cat."},
    ]
    assert c["id"] == "coco-3" and [w["text"] for w in c["words"]] == ["traffic light"]
    assert c["messages"][1]["content"] == "traffic light."
    errors = {row["id"]: row for row in read_jsonl(out / "instances_val.errors.jsonl")}
    assert all(row["file"] == str(instances) for row in errors.values())
    want = {
        "annotation 13": "crowd annotation",
        "annotation 32": "outside the 64x64 image",
        "annotation 33": "image_id 99 is not in images",
        "annotation 34": "category_id 7 is not in categories",
        "annotation 51": "polygon ring of 5 values",
        "image 2": "image file not found",
        "image 4": "width/height 60x40 differ from the image's 50x40",
        "image 5": "no usable annotation",
        "images[5]": "needs id, file_name",
    }
    assert sorted(errors) == sorted(want)
    for rid, reason in want.items():
        assert reason in errors[rid]["reason"], (rid, errors[rid])
    assert "9 left out" in err


def test_outputs_never_destroy_and_user_errors_are_one_line(tmp_path, capsys):
    instances = coco_set(tmp_path / "coco")
    images = tmp_path / "coco/images"
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, err = run_cli(prepare_args(instances, images, out), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "--overwrite" in err
    for _ in range(2):  # --overwrite writes beside the user's file; a rerun replaces its own files
        code, err = run_cli(prepare_args(instances, images, out, "--overwrite"), capsys)
        assert code == 0, err
    assert (out / "mine.txt").read_text() == "keep" and len(list(read_jsonl(out / "instances_val.jsonl"))) == 2
    code, err = run_cli(["prepare", "coco", str(instances), "--out", str(tmp_path / "o2")], capsys)
    assert code == 2 and err.strip() == "error: prepare coco needs --images DIR, the folder of the annotated images"
    code, err = run_cli(prepare_args(images, images, tmp_path / "o3"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "images" in err
    not_coco = tmp_path / "squad.json"
    not_coco.write_text('{"data": []}')
    code, err = run_cli(prepare_args(not_coco, images, tmp_path / "o4"), capsys)
    assert code == 2 and "not a COCO / LVIS instances file" in err and len(err.strip().splitlines()) == 1


def test_lvis_names_and_urls(tmp_path, capsys):
    """LVIS: images by ``coco_url`` (found under the URL's folder), categories with underscores and qualifiers."""
    draw(tmp_path / "images/val2017/000000000139.png", (64, 64), [("red", [0, 0, 30, 0, 30, 30])])
    data = {
        "images": [
            {"id": 139, "coco_url": "http://images.cocodataset.org/val2017/000000000139.png", "width": 64, "height": 64}
        ],
        "categories": [{"id": 1, "name": "bat_(animal)", "synonyms": ["bat_(animal)"]}, {"id": 2, "name": "tv_set"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 139,
                "category_id": 1,
                "bbox": [0, 0, 30, 30],
                "segmentation": [[0, 0, 30, 0, 30, 30]],
            },
            {"id": 2, "image_id": 139, "category_id": 2, "bbox": [32, 32, 32, 32], "segmentation": []},
        ],
    }
    (tmp_path / "lvis_v1_val.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    args = ["prepare", "coco", str(tmp_path / "lvis_v1_val.json"), "--images", str(tmp_path / "images")]
    code, err = run_cli([*args, "--out", str(out)], capsys)
    assert code == 0, err
    (record,) = read_jsonl(out / "lvis_v1_val.jsonl")
    assert record["image"] == "../images/val2017/000000000139.png"
    assert [w["text"] for w in record["words"]] == ["bat", "tv set"]
    assert record["messages"][1]["content"] == "bat, tv set."
    assert not (out / "lvis_v1_val.errors.jsonl").exists()


LLAVA = [
    {"id": "q1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat animal is on the left?"}, {"from": "gpt", "value": "A dog."}]},
    {"id": "q2", "image": "other.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Nothing."}]},
    {"id": "q3", "image": "a.png", "conversations": [
        {"from": "human", "value": "What is on the right?\n<image>"}, {"from": "gpt", "value": "A cat."}]},
    {"id": "q4", "conversations": [{"from": "human", "value": "<image>\nNo image field."}]},
]  # fmt: skip


@pytest.mark.parametrize("layout", ["llava-json", "sharegpt-jsonl"])
def test_join_with_conversations_by_image_file_name(tmp_path, capsys, layout):
    instances = coco_set(tmp_path / "coco")
    if layout == "llava-json":
        talks = tmp_path / "llava.json"
        talks.write_text(json.dumps(LLAVA))
    else:  # ShareGPT: messages + images (paths in another folder: joined by file name)
        roles = {"human": "user", "gpt": "assistant"}
        rows = [
            {"id": s["id"], "messages": [{"role": roles[t["from"]], "content": t["value"]} for t in s["conversations"]]}
            | ({"images": [f"coco/train2017/{s['image']}"]} if "image" in s else {})
            for s in LLAVA
        ]
        talks = tmp_path / "sharegpt.jsonl"
        talks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["prepare", "coco", str(instances), "--images", str(tmp_path / "coco/images"), "--out", str(out)]
    code, err = run_cli([*args, "--conversations", str(talks)], capsys)
    assert code == 0, err
    assert "joined 2 conversation samples; 1 name images the annotations lack" in err
    (record,) = read_jsonl(out / "instances_val.jsonl")  # c.png has regions but no conversation: left out
    assert record["id"] == "coco-1" and [w["text"] for w in record["words"]] == ["dog", "cat"]
    assert record["messages"] == [
        {"role": "user", "content": "<image>\nWhat animal is on the left?"},
        {"role": "assistant", "content": "A dog."},
        {"role": "user", "content": "What is on the right?"},
        {"role": "assistant", "content": "A cat."},
    ]
    errors = {row["id"]: row for row in read_jsonl(out / "instances_val.errors.jsonl")}
    assert errors["q4"]["file"] == str(talks) and "no image" in errors["q4"]["reason"]


@pytest.mark.slow
def test_align_fill_labels_the_cells_of_each_region(tmp_path, capsys):
    """The prepared records through `dvsft align --label-policy fill`: the dog's L-shaped polygon labels its three
    cells (not the fourth cell of its box), the cat's RLE box its two cells; every label an object."""
    instances = coco_set(tmp_path / "coco")
    out = tmp_path / "out"
    code, err = run_cli(prepare_args(instances, tmp_path / "coco/images", out), capsys)
    assert code == 0, err
    aligned = tmp_path / "aligned.jsonl"
    pixels = ["--min-pixels", str(32 * 32), "--max-pixels", str(32 * 32 * 64)]  # 128x96 stays: 3 x 4 cells of 32 px
    code, err = run_cli(["align", str(out / "instances_val.jsonl"), "--out", str(aligned), *pixels, *FILL], capsys)
    assert code == 0, err
    a = next(r for r in read_jsonl(aligned) if r["id"] == "coco-1")
    assert a["grid"] == [3, 4]
    got = {(lab["token"], lab["text"], lab.get("kind")) for lab in a["vision_labels"]}
    assert got == {(k, "dog", "object") for k in (0, 1, 4)} | {(k, "cat", "object") for k in (7, 11)}
