"""Records as JSONL, Parquet shards and `datasets` folders: lossless conversion, one reader for all, merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dvsft.core.convert import convert
from dvsft.core.record_sources import count_records, data_files, iter_entries, read_ids
from dvsft.core.record_table import ShardWriter, from_row, to_row
from dvsft.core.records import RecordError, check_record, read_jsonl, read_records, write_jsonl
from dvsft.data.dataset import load_records


def odd_records() -> list[dict]:
    """Records exercising every column and every fallback into ``extra``."""
    words = [{"text": "Invoice", "box": [1.5, 2.0, 30.25, 12.0], "score": 0.98}, {"text": "n°", "box": [0.0] * 4}]
    return [
        {
            "id": "a",
            "image": "images/a.png",
            "width": 40,
            "height": 20,
            "words": words,
            "messages": [{"role": "user", "content": "<image>Total?"}, {"role": "assistant", "content": "12 €"}],
            "grid": [1, 2],
            "vision_labels": [{"token": 0, "text": "Invoice", "token_id": 15}, {"token": 1, "text": "n°"}],
            "dropped": {"too_tall": 1},
            "align": {"source": "qwen3-vl", "min_pixels": None},
        },
        {"id": "b", "image": "images/b.png", "words": [{"text": "x", "box": [1, 2, 3, 4]}], "words_note": None},
        {"id": 7, "image": "/abs/c.png", "messages": [{"role": "user", "content": [{"type": "image"}]}]},
        {"id": "d", "title": "T", "text": "some text", "messages": [], "words": [], "score": 1e-300},
        {"id": "e", "image": "images/e.png", "width": 5, "height": 5, "words": None, "grid": [], "extra": "mine"},
    ]


def exact(records: list[dict]) -> list[str]:
    """Values and JSON types (1 vs 1.0), key order ignored."""
    return [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records]


def test_row_round_trip_keeps_values_and_types():
    for record in odd_records():
        assert exact([from_row(to_row(record))]) == exact([record])
    row = to_row(odd_records()[1])
    assert row["words"] is None and "words" in json.loads(row["extra"])  # integer box: kept exactly in extra


def test_jsonl_parquet_jsonl_is_lossless(tmp_path):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, odd_records())
    convert(src, tmp_path / "shards", "parquet", rows_per_shard=2)
    files = data_files(tmp_path / "shards")
    assert [f.name for f, _ in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert count_records(tmp_path / "shards") == 5
    convert(tmp_path / "shards", tmp_path / "back.jsonl")
    assert exact(list(read_jsonl(tmp_path / "back.jsonl"))) == exact(odd_records())
    convert(src, tmp_path / "one.parquet")
    convert(tmp_path / "one.parquet", tmp_path / "back2.jsonl")
    assert exact(list(read_jsonl(tmp_path / "back2.jsonl"))) == exact(odd_records())


def test_jsonl_datasets_jsonl_is_lossless(tmp_path):
    import datasets

    src = tmp_path / "in.jsonl"
    write_jsonl(src, odd_records())
    convert(src, tmp_path / "ds", "datasets", rows_per_shard=2)
    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    assert len(ds) == 5 and ds[0]["id"] == "a"
    convert(tmp_path / "ds", tmp_path / "back.jsonl")
    assert exact(list(read_jsonl(tmp_path / "back.jsonl"))) == exact(odd_records())
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    assert [e.record["id"] for e in iter_entries(tmp_path / "dd")] == ["a", "b", 7, "d", "e"]


def image_records(folder: Path, n: int = 3) -> Path:
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        Image.new("RGB", (32 + i, 24), "white").save(folder / "images" / f"p{i}.png")
        records.append(
            {
                "id": f"p{i}",
                "image": f"images/p{i}.png",
                "width": 32 + i,
                "height": 24,
                "words": [{"text": "w", "box": [1.0, 1.0, 9.0, 9.0]}],
                "messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "w"}],
            }
        )
    write_jsonl(folder / "words.jsonl", records)
    return folder / "words.jsonl"


def test_image_paths_follow_the_output_and_embedded_images_extract_back(tmp_path):
    src = image_records(tmp_path / "a")
    convert(src, tmp_path / "elsewhere" / "shards", "parquet")  # relative paths now point back at a/images
    assert all(r["width"] for r in read_records(tmp_path / "elsewhere" / "shards", image=True))
    convert(src, tmp_path / "packed", "parquet", embed_images=True)
    (tmp_path / "a" / "images" / "p0.png").unlink()  # the shards need no loose files
    recs = list(read_records(tmp_path / "packed", image=True))
    assert all(isinstance(r["image_bytes"], bytes) for r in recs)
    samples = load_records(tmp_path / "packed")
    assert len(samples) == 3 and not samples.skipped
    convert(tmp_path / "packed", tmp_path / "b" / "words.jsonl")
    assert (tmp_path / "b" / "images" / "p0.png").is_file()
    assert exact(read_jsonl(tmp_path / "b" / "words.jsonl")) == exact(read_jsonl(src))


def test_every_reader_names_the_shard_and_row_of_a_bad_record(tmp_path):
    rows = [{"id": f"r{i}", "words": [{"text": "w", "box": [0.0, 0.0, 1.0, 1.0]}]} for i in range(5)]
    rows[3]["words"][0]["box"] = [5.0, 0.0, 1.0, 1.0]
    with ShardWriter(tmp_path / "s", rows_per_shard=2) as writer:
        for r in rows:
            writer.write(r)
    with pytest.raises(RecordError, match=r"part-00001\.parquet:2: record r3: words\[0\] box .* is inverted"):
        list(read_records(tmp_path / "s"))
    entry = [e for e in iter_entries(tmp_path / "s") if e.record["id"] == "r3"][0]
    problems = check_record(entry.record, entry.file, entry.number, image=False)
    assert problems[0].line == 2 and problems[0].file.endswith("part-00001.parquet")
    assert read_ids(tmp_path / "s") == [f"r{i}" for i in range(5)]


def test_shard_writer_resumes_after_its_last_whole_shard(tmp_path):
    writer = ShardWriter(tmp_path / "s", rows_per_shard=2)
    for i in range(3):
        writer.write({"id": str(i)})
    (tmp_path / "s" / "part-00001.parquet.tmp").write_bytes(b"PAR1 torn")  # a kill mid-shard: never closed
    assert read_ids(tmp_path / "s") == ["0", "1"]
    with ShardWriter(tmp_path / "s", rows_per_shard=2) as again:
        again.write({"id": "2"})
    assert read_ids(tmp_path / "s") == ["0", "1", "2"]
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_mixed_folder_and_missing_source_are_clear_errors(tmp_path):
    (tmp_path / "m").mkdir()
    write_jsonl(tmp_path / "m" / "a.jsonl", [{"id": "x"}])
    convert(tmp_path / "m" / "a.jsonl", tmp_path / "m" / "b.parquet")
    with pytest.raises(ValueError, match="both .parquet and .jsonl"):
        data_files(tmp_path / "m")
    with pytest.raises(FileNotFoundError):
        data_files(tmp_path / "nothing")
    with pytest.raises(ValueError, match="--to"):
        convert(tmp_path / "m" / "a.jsonl", tmp_path / "out")


def test_align_reads_and_writes_shards_with_embedded_images(tmp_path):
    from dvsft.align.run import align_file

    src = image_records(tmp_path / "a")
    convert(src, tmp_path / "packed", "parquet", embed_images=True)
    summary = align_file(tmp_path / "packed", tmp_path / "aligned", "qwen3-vl", fmt="parquet", rows_per_shard=2)
    assert summary["aligned"] == 3 and summary["errors"] == 0
    out = list(read_records(tmp_path / "aligned", image=True))
    assert [r["id"] for r in out] == ["p0", "p1", "p2"]
    assert all(r["grid"] and isinstance(r["image_bytes"], bytes) for r in out)


def test_prepare_writes_shards(tmp_path):
    from dvsft.sources.prepare import prepare_dataset

    squad = {
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": "Paris is in France.",
                        "qas": [
                            {"id": "q1", "question": "Where?", "answers": [{"text": "France", "answer_start": 12}]}
                        ],
                    }
                ],
            }
        ]
    }
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    stats = prepare_dataset("squad", tmp_path / "squad.json", tmp_path / "out", fmt="parquet")
    assert stats.out == tmp_path / "out" / "squad" and stats.records == 1
    (record,) = [e.record for e in iter_entries(stats.out)]
    assert record["text"] == "Paris is in France." and record["messages"][1]["content"] == "France"


def test_eval_reads_record_shards_and_datasets_folders(tmp_path):
    from dvsft.evaluation.loaders import iter_items

    src = image_records(tmp_path / "a")
    convert(src, tmp_path / "packed", "parquet", embed_images=True)
    convert(src, tmp_path / "ds", "datasets")
    for path in (tmp_path / "packed", tmp_path / "packed" / "part-00000.parquet", tmp_path / "ds"):
        items = list(iter_items("docvqa", path))
        assert [i.id for i in items] == ["p0", "p1", "p2"] and items[0].answers == ["w"]
        assert [im.size for im in items[1].load_images()] == [(33, 24)]
