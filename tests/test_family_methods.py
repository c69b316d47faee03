"""Every method on every family (issue #23): SFT, DV-SFT, BASIC, ASVR (codes fit + training), LSD and the lens on a
tiny real model of each of the eight families, with its real processor.

Each (family, method) trains one step on two rendered records through ``dvsft.training.train`` and logs the
method's terms, finite; the lens reads both records. An unknown model is an error that names the supported families.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import make_records, overrides
from typer.testing import CliRunner

from dvsft.cli import app
from dvsft.models.families import families
from dvsft.testing.tiny import TinyConfig, save_tiny
from dvsft.training.config import load_config
from dvsft.training.train import train

FAMILIES = ["qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe", "qwen3.5", "internvl", "llava_onevision", "idefics3", "smolvlm"]
# each method's logged terms (the counts positive, every term finite)
TERMS = {
    "sft": ("loss", "text_loss", "text_tokens"),
    "dvsft": ("loss", "text_loss", "vision_loss", "vision_tokens"),
    "basic": ("loss", "text_loss", "basic_loss", "basic_dir", "basic_kl"),
    "dvsft+asvr": ("loss", "vision_loss", "vision_tokens", "asvr_loss", "asvr_acc"),
    "dvsft+lsd": ("loss", "vision_loss", "vision_tokens", "lsd_loss", "lsd_regions"),
}
POSITIVE = ("loss", "tokens", "regions")  # the losses and counts (accuracies, KL and distances may be 0)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    """Two rendered pages of words, one word per 32-px cell."""
    return make_records(tmp_path_factory.mktemp("family_records"), n=2, seed=3)


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory) -> tuple[str, Path]:
    fam = request.param
    return fam, save_tiny(tmp_path_factory.mktemp(f"tiny_{fam}") / "model", TinyConfig(family=fam, vocab_size=512))


def codes_for(model_dir: Path, records: Path, out: Path) -> Path:
    """``dvsft codes fit`` on the records' images: the codebook ASVR trains on."""
    result = CliRunner().invoke(
        app, ["codes", "fit", "--model", str(model_dir), "--records", str(records), "--out", str(out), "--k", "4"]
    )
    assert result.exit_code == 0, result.output
    return out


def test_the_families_tested_are_every_registered_family_but_qwen2_vl():
    assert set(FAMILIES) == set(families()) - {"qwen2-vl"}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(TERMS))
def test_every_method_trains_on_every_family(family_dir, records, method, tmp_path):
    fam, path = family_dir
    extra: dict = {"max_steps": 1, "logging_steps": 1, "save_strategy": "no", "save_final": False, "method": method}
    if method == "dvsft+asvr":
        extra["objectives"] = {"asvr": {"codes": str(codes_for(path, records, tmp_path / "codes"))}}
    result = train(load_config(None, overrides(path, records, tmp_path / "run", **extra)))
    rows = [row for row in result.log if "train_runtime" not in row and "loss" in row]
    assert rows, result.log
    for term in TERMS[method]:
        value = rows[0][term]
        assert math.isfinite(value) and (value > 0 if term.endswith(POSITIVE) else value >= 0), (fam, method, term)


@pytest.mark.slow
def test_the_lens_reads_every_family(family_dir, records, tmp_path):
    fam, path = family_dir
    out = tmp_path / "lens"
    result = CliRunner().invoke(app, ["lens", "--model", str(path), "--records", str(records), "--out", str(out)])
    assert result.exit_code == 0, result.output
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert accuracy["n"] > 0 and 0.0 <= accuracy["top1"] <= 1.0, (fam, accuracy)


def test_squad_pages_are_drawn_on_the_models_own_grid_or_the_default_one(family_dir):
    from dvsft.evaluation.suite import render_family
    from dvsft.models.families import DEFAULT_FAMILY

    fam, path = family_dir
    assert render_family(path) == (fam if fam.startswith("qwen") else DEFAULT_FAMILY)


def test_eval_on_an_unknown_model_names_the_supported_families(tiny_dir, tmp_path):
    import shutil

    unknown = tmp_path / "model"
    shutil.copytree(tiny_dir, unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "blip-2"}))
    data = tmp_path / "ocr.jsonl"
    data.write_text("")
    result = CliRunner().invoke(
        app, ["eval", "--model", str(unknown), "--bench", "squad", "--data", str(data), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "blip-2" in result.stderr and "qwen3-vl" in result.stderr and "internvl" in result.stderr
    from dvsft.evaluation.suite import render_family

    with pytest.raises(ValueError, match="'blip-2' belongs to no supported family; supported: .*internvl"):
        render_family(unknown)  # was: the Qwen3-VL grid, without a word
