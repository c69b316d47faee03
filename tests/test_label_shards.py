"""`dvsft label --format parquet`, `--shard i/N` + `dvsft merge` (each input exactly once), `--device cuda`."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from dvsft.cli import app
from dvsft.core.record_sources import data_files, read_ids
from dvsft.core.records import read_jsonl, read_records
from dvsft.sources.image_to_label import collect_inputs, errors_path, label_inputs, parse_shard, shard
from dvsft.sources.merge import check_parts, merge
from dvsft.sources.ocr import cuda_params, register_engine


@register_engine("shards-blank")
class Blank:
    def __init__(self, **_):
        pass

    def __call__(self, image):
        return []


def page(path: Path, text: str) -> None:
    import matplotlib

    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), 28)
    img = Image.new("RGB", (320, 80), "white")
    ImageDraw.Draw(img).text((10, 20), text, font=font, fill="black")
    img.save(path)


@pytest.mark.slow
def test_label_writes_parquet_shards_with_real_ocr(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k, text in enumerate(["Invoice total", "Hello world", "Parquet shard"]):
        page(folder / f"{k}.png", text)
    out = tmp_path / "words"
    stats = label_inputs(collect_inputs(folder), out, engine="rapidocr", fmt="parquet", rows_per_shard=2)
    assert stats.records == 3
    assert [f.name for f, _ in data_files(out)] == ["part-00000.parquet", "part-00001.parquet"]
    records = list(read_records(out, image=True))  # images resolve relative to the shard folder
    texts = {r["id"]: " ".join(w["text"] for w in r["words"]).lower() for r in records}
    assert "invoice" in texts["0.png"] and "hello" in texts["1.png"]
    again = label_inputs(collect_inputs(folder), out, engine="rapidocr", fmt="parquet", rows_per_shard=2)
    assert again.skipped == 3 and again.records == 0


def shard_outputs(tmp_path: Path, fmt: str) -> tuple[Path, list[Path]]:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(7):
        Image.new("RGB", (30, 20), "white").save(folder / f"{k}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    parts = []
    for i in range(3):
        out = tmp_path / (f"words.{i}" + (".jsonl" if fmt == "jsonl" else ""))
        label_inputs(shard(collect_inputs(folder), *parse_shard(f"{i}/3")), out, engine="shards-blank", fmt=fmt)
        parts.append(out)
    return folder, parts


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_merge_checks_each_input_landed_exactly_once(tmp_path, fmt):
    folder, parts = shard_outputs(tmp_path, fmt)
    report = merge(parts, tmp_path / "all.jsonl", source=folder)
    assert (report.records, report.errors, report.expected) == (7, 1, 8)
    merged = [r["id"] for r in read_jsonl(tmp_path / "all.jsonl")]
    assert sorted(merged) == [f"{k}.png" for k in range(7)]
    assert [r["id"] for r in read_jsonl(errors_path(tmp_path / "all.jsonl"))] == ["broken.png"]
    assert all(r["width"] == 30 for r in read_records(tmp_path / "all.jsonl", image=True))

    with pytest.raises(ValueError, match=r"3 inputs of .* are in no part: '1.png', '4.png', 'broken.png'"):
        merge([parts[0], parts[2]], tmp_path / "x.jsonl", source=folder)
    assert not (tmp_path / "x.jsonl").exists()
    with pytest.raises(ValueError, match="ids appear more than once"):
        merge([parts[0], parts[0], parts[1], parts[2]], tmp_path / "x.jsonl", source=folder)
    (folder / "new.png").write_bytes((folder / "0.png").read_bytes())
    assert "in no part: 'new.png'" in check_parts(parts, folder).problems[0]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """The real entry point (``dvsft ...``): exit code and output."""
    with pytest.raises(SystemExit) as exit_info:
        app(args=args, prog_name="dvsft")
    out = capsys.readouterr()
    return exit_info.value.code, out.out + out.err


def test_merge_cli_to_parquet(tmp_path, capsys):
    folder, parts = shard_outputs(tmp_path, "parquet")
    args = ["merge", *map(str, parts), "--out", str(tmp_path / "all"), "--source", str(folder), "--format", "parquet"]
    code, output = run_cli(args, capsys)
    assert code == 0 and "all 8 inputs" in output
    assert sorted(read_ids(tmp_path / "all")) == [f"{k}.png" for k in range(7)]
    code, output = run_cli(["merge", str(parts[0]), "--out", str(tmp_path / "y"), "--source", str(folder)], capsys)
    assert code == 2 and output.startswith("error: merge check failed")


def test_device_cuda_without_onnxruntime_gpu_is_one_clear_error(tmp_path, capsys):
    import onnxruntime

    assert cuda_params("cpu") == {}
    with pytest.raises(ValueError, match="cpu, cuda or cuda:N"):
        cuda_params("gpu")
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert cuda_params("cuda:1")["EngineConfig.onnxruntime.cuda_ep_cfg.device_id"] == 1
        return
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        cuda_params("cuda")
    page(tmp_path / "a.png", "x")
    code, output = run_cli(
        ["label", str(tmp_path / "a.png"), "--out", str(tmp_path / "w.jsonl"), "--device", "cuda"], capsys
    )
    assert code == 2 and "CUDAExecutionProvider" in output
