"""Outputs never destroy (dvsft.core.outputs): no command deletes or overwrites what it did not write, writes
over its own input, or ends `dvsft align` on input where nothing aligns with anything but one `error:` line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import make_records

from dvsft.cli import app
from dvsft.core.outputs import MARKER
from dvsft.core.records import read_jsonl, write_jsonl


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """The real entry point (``dvsft ...``): exit code and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        app(args=[str(a) for a in args], prog_name="dvsft")
    return exit_info.value.code, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``: relative path -> bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(code: int, err: str, *words: str) -> None:
    """The command stopped on a user error: exit code 2, no traceback, and one ``error:`` line holding ``words``
    (after the progress bar's last state, for a command that had started its work)."""
    assert code == 2 and "Traceback" not in err, err
    (line,) = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert err.strip().endswith(line) and all(w in line for w in words), line


def test_convert_into_the_folder_of_its_source_refuses_and_touches_nothing(tmp_path, capsys):
    """The issue's report: `convert data/train.jsonl data --to parquet` deleted data/ and exited 0."""
    data = tmp_path / "data"
    make_records(data, n=2)
    (data / "images").mkdir()
    (data / "images" / "keep.txt").write_text("not dvsft's")
    before = snapshot(data)
    for extra in ([], ["--overwrite"]):
        code, err = run_cli(["convert", data / "records.jsonl", data, "--to", "parquet", *extra], capsys)
        one_error(code, err, "contains the input")
        assert snapshot(data) == before


def test_a_folder_of_other_files_is_refused_and_overwrite_keeps_them(tmp_path, capsys):
    src = make_records(tmp_path / "src", n=2)
    data = tmp_path / "data"
    make_records(data, n=1)
    before = snapshot(data)
    code, err = run_cli(["convert", src, data, "--to", "parquet"], capsys)
    one_error(code, err, f"{data} exists and holds files dvsft convert did not write", "--overwrite")
    assert snapshot(data) == before
    code, err = run_cli(["convert", src, data, "--to", "parquet", "--overwrite"], capsys)
    assert code == 0, err
    after = snapshot(data)
    assert {k: after[k] for k in before} == before  # nothing of the user's replaced or deleted
    assert sorted(set(after) - set(before)) == [MARKER, "part-00000.parquet"]


def test_overwrite_replaces_only_what_convert_wrote(tmp_path, capsys):
    src = make_records(tmp_path / "src", n=4)
    shards = tmp_path / "shards"
    assert run_cli(["convert", src, shards, "--to", "parquet", "--rows-per-shard", "1"], capsys)[0] == 0
    assert len(list(shards.glob("part-*.parquet"))) == 4
    (shards / "notes.txt").write_text("mine")
    code, err = run_cli(["convert", src, shards, "--to", "parquet", "--rows-per-shard", "2", "--overwrite"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in shards.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    assert (shards / "notes.txt").read_text() == "mine"
    assert json.loads((shards / MARKER).read_text()) == {
        "command": "convert",
        "files": ["part-00000.parquet", "part-00001.parquet"],
    }


def test_convert_onto_an_existing_jsonl_is_refused_unless_overwrite(tmp_path, capsys):
    src = make_records(tmp_path / "src", n=2)
    target = tmp_path / "train.jsonl"
    target.write_text('{"id": "precious"}\n')
    code, err = run_cli(["convert", src, target], capsys)
    one_error(code, err, f"{target} exists", "--overwrite")
    assert target.read_text() == '{"id": "precious"}\n'
    assert run_cli(["convert", src, target, "--overwrite"], capsys)[0] == 0
    assert [r["id"] for r in read_jsonl(target)] == ["doc0", "doc1"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_merge_out_equal_to_a_part_is_refused(tmp_path, capsys):
    rows = list(read_jsonl(make_records(tmp_path, n=2)))
    write_jsonl(tmp_path / "a.jsonl", rows[:1])
    write_jsonl(tmp_path / "b.jsonl", rows[1:])
    before = (tmp_path / "a.jsonl").read_bytes()
    for extra in ([], ["--overwrite"]):
        code, err = run_cli(
            ["merge", tmp_path / "a.jsonl", tmp_path / "b.jsonl", "--out", tmp_path / "a.jsonl", *extra], capsys
        )
        one_error(code, err, "is the input")
        assert (tmp_path / "a.jsonl").read_bytes() == before


def sources(tmp_path: Path) -> dict[str, Path]:
    """Inputs of each command; the refusals below happen before any of them is read."""
    records = make_records(tmp_path / "in", n=1)
    (tmp_path / "doc.txt").write_text("a few words to render\n")
    (tmp_path / "squad.json").write_text('{"data": []}')
    return {"records": records, "text": tmp_path / "doc.txt", "squad": tmp_path / "squad.json"}


COMMANDS = {
    "convert": lambda s, out: ["convert", s["records"], out, "--to", "parquet"],
    "convert:datasets": lambda s, out: ["convert", s["records"], out, "--to", "datasets"],
    "align": lambda s, out: ["align", s["records"], "--out", out, "--format", "parquet"],
    "align:overlay": lambda s, out: ["align", s["records"], "--out", out.parent / "a.jsonl", "--overlay", out],
    "merge": lambda s, out: ["merge", s["records"], "--out", out, "--format", "parquet"],
    "render": lambda s, out: ["render", s["text"], "--out", out],
    "prepare": lambda s, out: ["prepare", "squad", s["squad"], "--out", out],
    "codes": lambda s, out: ["codes", "fit", "--model", s["records"].parent, "--records", s["records"], "--out", out],
    "ocr-set": lambda s, out: ["ocr-set", "contextual", "--corpus", s["text"], "--out", out],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_folder_output_refuses_a_folder_of_other_files(tmp_path, capsys, command):
    src = sources(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "part-00000.parquet").write_bytes(b"the user's own file")
    (out / "images").mkdir()
    (out / "images" / "page.png").write_bytes(b"another")
    before = snapshot(out)
    code, err = run_cli(COMMANDS[command](src, out), capsys)
    one_error(code, err, f"{out} exists and holds files dvsft {command.split(':')[0]} did not write")
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "args",
    [
        lambda s, out: ["align", s["records"], "--out", out],
        lambda s, out: ["merge", s["records"], "--out", out],
        lambda s, out: ["tasks", "finevit", s["records"], "--out", out],
        lambda s, out: ["convert", s["records"], out],
    ],
    ids=["align", "merge", "tasks", "convert"],
)
def test_every_file_output_refuses_an_existing_file(tmp_path, capsys, args):
    src = sources(tmp_path)
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    code, err = run_cli(args(src, out), capsys)
    one_error(code, err, f"{out} exists", "--overwrite")
    assert out.read_text() == "keep me\n"


def test_a_command_never_writes_over_its_input(tmp_path, capsys):
    src = sources(tmp_path)
    records = src["records"]
    before = snapshot(records.parent)
    for args in (
        ["align", records, "--out", records, "--overwrite"],
        ["tasks", "granvit", records, "--out", records, "--overwrite"],
        ["render", src["text"], "--out", tmp_path, "--overwrite"],
        ["prepare", "squad", src["squad"], "--out", tmp_path, "--overwrite"],
        ["ocr-set", "contextual", "--corpus", src["text"], "--out", tmp_path, "--overwrite"],
        ["label", records.parent, "--out", records.parent, "--format", "parquet"],
    ):
        one_error(*run_cli(args, capsys), "the input")
    assert snapshot(records.parent) == before


def test_rerunning_a_folder_command_continues_its_own_output(tmp_path, capsys):
    """A folder carrying the same command's marker is that command's to rewrite: no --overwrite needed."""
    src = make_records(tmp_path / "src", n=2)
    for _ in range(2):
        code, err = run_cli(["convert", src, tmp_path / "ds", "--to", "datasets"], capsys)
        assert code == 0, err
    assert json.loads((tmp_path / "ds" / MARKER).read_text())["command"] == "convert"


def test_ocr_set_replaces_only_what_it_wrote(tmp_path, capsys):
    """`dvsft ocr-set --out` wrote into any folder; now a folder of other files needs --overwrite, which keeps them,
    and a rerun replaces the set it wrote before (pages of a larger set included) through a temporary sibling."""
    out = tmp_path / "set"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    small = ["--cols", "24", "--max-rows", "12", "--max-chars", "300"]
    code, err = run_cli(["ocr-set", "contextual", "--out", out, "--n", "3", *small], capsys)
    one_error(code, err, f"{out} exists and holds files dvsft ocr-set did not write", "--overwrite")
    assert snapshot(out) == {"notes.txt": b"mine"}
    code, err = run_cli(["ocr-set", "contextual", "--out", out, "--n", "3", *small, "--overwrite"], capsys)
    assert code == 0, err
    pages = [f"images/contextual-{i:05d}.png" for i in range(3)]
    assert json.loads((out / MARKER).read_text()) == {
        "command": "ocr-set",
        "files": [*pages, "info.json", "words.jsonl"],
    }
    code, err = run_cli(["ocr-set", "contextual", "--out", out, "--n", "1", *small], capsys)  # its own: no --overwrite
    assert code == 0, err
    assert sorted(snapshot(out)) == [MARKER, pages[0], "info.json", "notes.txt", "words.jsonl"]
    assert (out / "notes.txt").read_text() == "mine" and len(list(read_jsonl(out / "words.jsonl"))) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no temporary sibling left


def imageless_parquet(folder: Path) -> Path:
    path = folder / "words.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "text": "no image here"}]), path)
    return path


def gzip_file(folder: Path) -> Path:
    path = folder / "words.jsonl.gz"
    path.write_bytes(gzip.compress(make_records(folder / "src", n=2).read_bytes()))
    return path


def json_array(folder: Path) -> Path:
    path = folder / "words.json"
    path.write_text(json.dumps(list(read_jsonl(make_records(folder / "src", n=2))), indent=1))
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [(gzip_file, "not UTF-8"), (json_array, "invalid JSON"), (imageless_parquet, "no image field")],
    ids=["gzip", "json-array", "parquet-without-image"],
)
def test_align_where_no_record_aligns_is_one_error_line(tmp_path, capsys, make, reason):
    words = make(tmp_path)
    out = tmp_path / "aligned.jsonl"
    code, err = run_cli(["align", words, "--out", out], capsys)
    one_error(code, err, "could be aligned", reason, "aligned.errors.jsonl")
    assert not out.exists() and list(read_jsonl(tmp_path / "aligned.errors.jsonl"))


def test_align_of_empty_input_gives_zero_records(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    code, err = run_cli(["align", tmp_path / "empty.jsonl", "--out", tmp_path / "aligned.jsonl"], capsys)
    assert code == 0, err
    assert (tmp_path / "aligned.jsonl").read_text() == ""
    assert not (tmp_path / "aligned.errors.jsonl").exists()


def test_duplicate_ids_get_distinct_overlays(tmp_path, capsys):
    path = make_records(tmp_path, n=3)
    write_jsonl(
        path,
        [{**r, "id": "same"} for r in read_jsonl(path)],
    )
    code, err = run_cli(["align", path, "--out", tmp_path / "a.jsonl", "--overlay", tmp_path / "ov"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "ov").glob("*.png")) == ["same-line2.png", "same-line3.png", "same.png"]
