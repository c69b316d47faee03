"""ASVR: k-means codes of the tiny model's own visual features (deterministic, cached) and the code head."""

import os
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dvsft.core.records import write_jsonl
from dvsft.objectives.asvr import ASVRHead, asvr_loss
from dvsft.objectives.codes import Codebook, Encoder, features_of_images, fit_codebook, fit_from_files, kmeans


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from dvsft.models.loading import load_model, load_processor

    return load_model(tiny_dir).eval(), load_processor(tiny_dir)


@pytest.fixture(scope="session")
def pages_dir(tmp_path_factory):
    """Three rendered text pages and their word records."""
    from dvsft.sources.corpora import corpus_text
    from dvsft.sources.render import Renderer
    from dvsft.testing.tiny import TinyConfig

    cfg = TinyConfig()
    d = tmp_path_factory.mktemp("asvr_pages")
    r = Renderer("qwen3-vl", cols=8, max_rows=4, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    pages = r.render_text(corpus_text()[2000:2600], random.Random(1))[:3]
    rows = []
    for i, p in enumerate(pages):
        p.save(d / f"p{i}.png")
        messages = [
            {"role": "user", "content": "<image>Read the text."},
            {"role": "assistant", "content": p.text},
        ]
        rows.append(
            {
                "id": f"p{i}",
                "image": f"p{i}.png",
                "width": p.width,
                "height": p.height,
                "words": p.words,
                "messages": messages,
            }
        )
    write_jsonl(d / "words.jsonl", rows)
    return d


def test_kmeans_recovers_separated_clusters_deterministically():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(40)
    x = centres[truth] + 0.3 * torch.randn(120, 2, generator=g)
    c1, codes1 = kmeans(x, 3, seed=5)
    c2, codes2 = kmeans(x, 3, seed=5)
    assert torch.equal(c1, c2) and torch.equal(codes1, codes2)
    # same partition as the truth (up to a permutation of code ids)
    pairs = set(zip(truth.tolist(), codes1.tolist(), strict=True))
    assert len(pairs) == 3
    with pytest.raises(ValueError, match="exceeds the 120 feature vectors"):
        kmeans(x, 121)


def test_residual_levels_reduce_error_and_encode_is_nearest():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 6, generator=g)
    cb = fit_codebook(x, 8, levels=3, seed=2)
    assert cb.meta["mse"][0] > cb.meta["mse"][1] > cb.meta["mse"][2]
    codes = cb.encode(x)
    # brute force: level by level nearest centroid of the residual
    residual = x.numpy().astype(np.float64)
    for level, c in enumerate(cb.centroids):
        c = c.numpy().astype(np.float64)
        d = ((residual[:, None, :] - c[None]) ** 2).sum(-1)
        assert np.array_equal(d.argmin(1), codes[:, level].numpy())
        residual = residual - c[codes[:, level].numpy()]


def test_fit_is_deterministic_and_encode_reads_the_cache(tiny, tiny_dir, pages_dir, tmp_path):
    model, processor = tiny
    paths = sorted(pages_dir.glob("p*.png"))
    cb1, codes1 = fit_from_files(model, processor, paths, tmp_path / "c1", k=8, levels=2, seed=3)
    cb2, codes2 = fit_from_files(model, processor, paths, tmp_path / "c2", k=8, levels=2, seed=3)
    assert cb1.id == cb2.id
    assert all(np.array_equal(a, b) for a, b in zip(codes1, codes2, strict=True))
    # one code row per visual token of each image, one column per level
    from PIL import Image

    from dvsft.models.geometry import grid_for

    for p, c in zip(paths, codes1, strict=True):
        with Image.open(p) as im:
            assert c.shape == (grid_for(processor, *im.size).num_tokens, 2)
    # codes are the nearest centroids of the model's own post-projector features
    feats = features_of_images(model, processor, [Image.open(paths[0]).convert("RGB")])[0]
    assert np.array_equal(cb1.encode(feats).numpy(), codes1[0])

    loaded = Codebook.load(tmp_path / "c1")
    assert loaded.id == cb1.id and loaded.meta["model_fingerprint"]
    enc = Encoder(model, processor, loaded, tmp_path / "c1")
    assert enc.fingerprint_matches
    again = enc.encode_files(paths)
    assert (enc.cache.hits, enc.cache.misses) == (3, 0)  # fit already cached every image
    assert all(np.array_equal(a, b) for a, b in zip(again, codes1, strict=True))
    # a touched image (new mtime) is encoded again, the others are still read
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    enc2 = Encoder(model, processor, loaded, tmp_path / "c1")
    enc2.encode_files(paths)
    assert (enc2.cache.hits, enc2.cache.misses) == (2, 1)
    # another resolution is another cache entry
    from dvsft.models.loading import load_processor

    upscale = load_processor(tiny_dir, min_pixels=32 * 32 * 64)
    enc3 = Encoder(model, upscale, loaded, tmp_path / "c1")
    bigger = enc3.encode_files(paths[:1])
    assert (enc3.cache.hits, enc3.cache.misses) == (0, 1) and len(bigger[0]) > len(codes1[0])


def test_cli_codes_fit_and_encode(tiny_dir, pages_dir, tmp_path):
    from dvsft.cli import app

    runner = CliRunner()
    out = tmp_path / "codes"
    records = pages_dir / "words.jsonl"
    res = runner.invoke(
        app, ["codes", "fit", "--model", str(tiny_dir), "--records", str(records), "--k", "4", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert (out / "codebook.safetensors").is_file() and "k=4" in res.output
    res = runner.invoke(app, ["codes", "encode", "--codes", str(out), "--records", str(records)])
    assert res.exit_code == 0, res.output
    assert "3 cached, 0 encoded" in res.output
    res = runner.invoke(app, ["codes", "encode", "--codes", str(tmp_path / "none"), "--records", str(records)])
    assert res.exit_code == 2 and "not a codes directory" in res.output


@pytest.mark.parametrize("levels", [1, 3])
@pytest.mark.slow
def test_head_learns_codes_of_visual_hidden_states(levels):
    torch.manual_seed(0)
    hidden = torch.randn(64, 32)
    proj = torch.randn(32, 8)
    codes = torch.stack([(hidden @ proj)[:, i * 2 : i * 2 + 2].argmax(-1) for i in range(levels)], 1) % 6
    head = ASVRHead(32, k=6, levels=levels, dim=32)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = asvr_loss(head, hidden, codes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert head(hidden, codes).shape == (64, levels, 6)
    with pytest.raises(ValueError, match="code rows"):
        asvr_loss(head, hidden[:3], codes)


def train_config(model_dir, data, out, method, **extra):
    return {
        "model": str(model_dir),
        "data": str(data),
        "output_dir": str(out),
        "method": method,
        "max_steps": 12,
        "global_batch_size": 3,
        "per_device_train_batch_size": 3,
        "learning_rate": 2e-3,
        "warmup_steps": 0.0,
        "lr_scheduler_type": "constant",
        "min_pixels": 32 * 32 * 4,
        "max_pixels": 32 * 32 * 256,
        "report_to": "none",
        "save_steps": 1000,
        "logging_steps": 1,
        **extra,
    }


@pytest.mark.slow
def test_asvr_objective_trains_from_the_cache_and_is_dropped_from_the_saved_model(tiny, tiny_dir, pages_dir, tmp_path):
    from safetensors import safe_open

    from dvsft.training.train import prepare

    model, processor = tiny
    paths = sorted(pages_dir.glob("p*.png"))
    codes_dir = tmp_path / "codes"
    fit_from_files(model, processor, paths, codes_dir, k=8, levels=2, seed=0)
    cfg = train_config(
        tiny_dir,
        pages_dir / "words.jsonl",
        tmp_path / "run",
        "sft+asvr",
        objectives={"asvr": {"codes": str(codes_dir)}},
    )
    run = prepare(cfg)
    asvr = next(o for o in run.objectives if o.name == "asvr")
    run.trainer.train()
    # every image's codes came from the cache that `fit` wrote (same images, same resolution, same tower)
    assert asvr.cache.hits == 12 * 3 and asvr.cache.misses == 0
    losses = [r["asvr_loss"] for r in run.log_callback.rows if "asvr_loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.85 * sum(losses[:3]), losses
    from dvsft.training.train import save_final

    final = tmp_path / "run" / "final"
    save_final(run.trainer, run.model, run.processor, run.cfg, final)
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and not [n for n in names if "asvr" in n or "dvsft_heads" in n]
    # the saved model loads without the head and still runs
    from dvsft.models.loading import load_model

    reloaded = load_model(final)
    assert not hasattr(reloaded, "dvsft_heads")


def test_asvr_needs_codes(tiny_dir, pages_dir, tmp_path):
    from dvsft.training.train import prepare

    with pytest.raises(ValueError, match="objectives.asvr.codes is not set"):
        prepare(train_config(tiny_dir, pages_dir / "words.jsonl", tmp_path / "r", "asvr"))
