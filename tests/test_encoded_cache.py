"""dvsft.data.encoded_cache: a sample's collator encoding written once and read back, on the real tiny Qwen3-VL
processor and real rendered pages (tests/helpers.make_records)."""

import json
import logging
import os
import threading
import time

import pytest
import torch
from helpers import make_records, overrides, three_word_pages

from dvsft.data.collator import VisionCollator
from dvsft.data.dataset import load_records
from dvsft.models.loading import load_processor

PIXELS = {"min_pixels": 32 * 32 * 4, "max_pixels": 32 * 32 * 16}


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return load_processor(tiny_dir)


@pytest.fixture
def samples(tmp_path):
    return load_records(make_records(tmp_path / "pages", n=4))


def collator(processor, cache, **kw):
    return VisionCollator(processor, cache_dir=cache, **{**PIXELS, **kw})


def assert_same_batch(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert value.dtype == got[key].dtype and torch.equal(value, got[key]), key


def test_a_cached_sample_gives_the_batch_of_a_fresh_encoding(processor, samples, tmp_path):
    fresh = collator(processor, None)
    writer = collator(processor, tmp_path / "cache")
    writer(samples)
    assert writer.stats == {"encoded": 4, "from_cache": 0}
    for vision_labels in (True, False):  # SFT reads the same files, without the alignment
        reader = collator(processor, tmp_path / "cache", vision_labels=vision_labels)
        want = collator(processor, None, vision_labels=vision_labels)(samples)
        assert_same_batch(reader(samples), want)
        assert reader.stats == {"encoded": 0, "from_cache": 4}
    cached, encoded = collator(processor, tmp_path / "cache").encode(samples[0]), fresh.encode(samples[0])
    assert cached.alignment == encoded.alignment and cached.layout == encoded.layout
    short = collator(processor, tmp_path / "cache", max_length=int(encoded.input_ids.numel()) - 1)
    assert torch.equal(short.encode(samples[0]).labels, encoded.labels[:-1])  # max_length cuts after the cache


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3.5", "internvl", "llava_onevision", "idefics3", "smolvlm"])
def test_every_family_batches_the_same_from_the_cache(family, tmp_path):
    """Tiles, crops and the families' other image inputs come back as they went in (pages in memory)."""
    from dvsft.testing.tiny import TinyConfig, save_tiny

    processor = load_processor(save_tiny(tmp_path / "model", TinyConfig(family=family, vocab_size=512)))
    pages = three_word_pages([(160, 96), (100, 140)], [[4, 4, 28, 20], [36, 36, 70, 50], [60, 70, 90, 84]])
    VisionCollator(processor, cache_dir=tmp_path / "cache")(pages)
    reader = VisionCollator(processor, cache_dir=tmp_path / "cache")
    assert_same_batch(reader(pages), VisionCollator(processor)(pages))
    assert reader.stats == {"encoded": 0, "from_cache": 2}


def test_settings_and_contents_key_the_cache(processor, samples, tmp_path):
    cache = tmp_path / "cache"
    collator(processor, cache)(samples)
    bigger = collator(processor, cache, max_pixels=32 * 32 * 36)
    bigger(samples)
    assert bigger.stats == {"encoded": 4, "from_cache": 0}  # max_pixels changes the image processor: a new cache
    assert len(list(cache.iterdir())) == 2
    other_align = collator(processor, cache, align_config=type(bigger.align_config)(max_subtokens=1))
    other_align(samples[:1])
    assert other_align.stats["encoded"] == 1
    edited = [dict(samples[0], words=samples[0]["words"][1:]), dict(samples[1], id="renamed")]
    again = collator(processor, cache)
    again(edited)
    assert again.stats == {"encoded": 1, "from_cache": 1}  # other words: encoded; another id only: cached


def test_the_image_bytes_key_a_sample_not_its_file_stamp(processor, samples, tmp_path):
    from PIL import Image

    cache = tmp_path / "cache"
    collator(processor, cache)(samples[:1])
    path = samples[0]["image"]
    os.utime(path, ns=(1, 1))  # same pixels, another time stamp: still cached
    unchanged = collator(processor, cache)
    unchanged(samples[:1])
    assert unchanged.stats == {"encoded": 0, "from_cache": 1}
    image = Image.open(path).convert("RGB")
    image.putpixel((0, 0), (0, 0, 0))
    image.save(path)
    os.utime(path, ns=(1, 1))  # new pixels under the old time stamp and path: encoded again
    redrawn = collator(processor, cache)
    redrawn(samples[:1])
    assert redrawn.stats == {"encoded": 1, "from_cache": 0}


def test_a_torn_file_is_encoded_again_and_a_full_cache_stops_growing(processor, samples, tmp_path, caplog):
    cache = tmp_path / "cache"
    writer = collator(processor, cache)
    writer(samples[:1])
    (stored,) = writer.cache.dir.glob("*/*.safetensors")
    stored.write_bytes(stored.read_bytes()[:100])
    reader = collator(processor, cache)
    assert_same_batch(reader(samples[:1]), collator(processor, None)(samples[:1]))
    assert reader.stats == {"encoded": 1, "from_cache": 0}
    assert not list(cache.rglob("*.tmp"))
    with caplog.at_level(logging.WARNING):
        full = collator(processor, tmp_path / "small", cache_max_gb=1e-6)
        full(samples)
    assert full.stats["encoded"] == 4 and not list(full.cache.dir.glob("*/*.safetensors"))
    assert sum("no more samples are added" in r.getMessage() for r in caplog.records) == 1


def test_opening_a_cache_removes_the_settings_opened_least_recently(processor, samples, tmp_path):
    from dvsft.data.encoded_cache import folder_size

    cache = tmp_path / "cache"
    old = collator(processor, cache)
    old(samples)
    os.utime(old.cache.dir / "settings.json", (1, 1))
    new = collator(processor, cache, max_pixels=32 * 32 * 36)
    new(samples)
    budget = (folder_size(new.cache.dir) + 1) / 2**30  # both are over it, the newer one alone is not
    third = collator(processor, cache, max_pixels=32 * 32 * 25, cache_max_gb=budget)
    assert not old.cache.dir.exists() and new.cache.dir.exists() and third.cache.dir.exists()


def test_no_cache_with_none_and_a_warning_where_the_folder_cannot_be_made(processor, samples, tmp_path, caplog):
    assert collator(processor, "none").cache is None and collator(processor, None).cache is None
    (tmp_path / "file").write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        blocked = collator(processor, tmp_path / "file" / "cache")
    assert blocked.cache is None and "cannot be used" in caplog.text
    assert_same_batch(blocked(samples), collator(processor, None)(samples))


@pytest.mark.slow
def test_a_second_training_run_encodes_no_sample(tiny_dir, train_records, tmp_path):
    """The counter of the training log: the second run of the same data reads every sample from the cache."""
    from dvsft.training.config import load_config
    from dvsft.training.train import train

    def run(name: str, **kw) -> dict:
        args = overrides(tiny_dir, train_records, tmp_path / name, encoded_cache_dir=str(tmp_path / "cache"), **kw)
        train(load_config(None, args + ["--save_final", "false", "--logging_steps", "4"]))
        rows = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        return next(r for r in rows if "samples_encoded" in r)

    first, second = run("first"), run("second")
    assert first["samples_encoded"] == 4 and first["samples_from_cache"] == 8  # checked once, 4 steps of 2 read
    assert second["samples_encoded"] == 0 and second["samples_from_cache"] == 12
    third = run("third", max_pixels=32 * 32 * 36)
    assert third["samples_encoded"] == 4


def test_a_chunk_another_process_claims_is_checked_last_and_a_stale_claim_is_not_waited_for(
    processor, samples, tmp_path, monkeypatch
):
    """Claims only order the work: the outcome of every sample is the one a cacheless check gives."""
    from dvsft.data import dataset
    from dvsft.data.encoded_cache import CLAIM_STALE_SECONDS, CLAIMS, chunk_name

    monkeypatch.setattr(dataset, "CLAIM_CHUNK", 2)
    want = dataset.check_samples(samples, collator(processor, None))
    checker = collator(processor, tmp_path / "cache")
    order: list[str] = []
    check = checker.check
    monkeypatch.setattr(checker, "check", lambda s: order.append(s["id"]) or check(s))
    claim = checker.cache.dir / CLAIMS / chunk_name(samples[:2])
    claim.parent.mkdir()
    claim.touch()  # another process is encoding the first chunk
    got = dataset.check_samples(samples, checker)
    assert order == [s["id"] for s in samples[2:] + samples[:2]]
    assert list(got) == list(want) and got.labels == want.labels and got.lengths == want.lengths
    assert checker.stats == {"encoded": 4, "from_cache": 0} and claim.exists()  # not ours to remove
    assert sorted(p.name for p in claim.parent.iterdir()) == [claim.name]  # ours are gone
    order.clear()
    os.utime(claim, (1, 1))  # its process was killed long ago
    assert time.time() - claim.stat().st_mtime > CLAIM_STALE_SECONDS
    dataset.check_samples(samples, checker)
    assert order == [s["id"] for s in samples]


def test_processes_checking_the_same_samples_at_once_encode_each_about_once(processor, tmp_path, monkeypatch):
    """Two checks of 8 samples at once, each with its own collator on one cache: between them each sample is
    encoded once, but for the one chunk the other may be encoding when a check comes to it."""
    from concurrent.futures import ThreadPoolExecutor

    from dvsft.data import dataset

    monkeypatch.setattr(dataset, "CLAIM_CHUNK", 1)
    samples = load_records(make_records(tmp_path / "pages", n=8))
    checkers = [collator(processor, tmp_path / "cache") for _ in range(2)]
    start = threading.Barrier(2)

    def check(c: VisionCollator) -> dataset.RecordList:
        start.wait()
        return dataset.check_samples(samples, c)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(check, checkers))
    want = dataset.check_samples(samples, collator(processor, None))
    for got in results:
        assert list(got) == list(want) and got.labels == want.labels
    encoded = sum(c.stats["encoded"] for c in checkers)
    assert 8 <= encoded <= 8 + 2
    assert all(c.stats["encoded"] + c.stats["from_cache"] == 8 for c in checkers)
