"""The wheel carries the packaged presets (training configs, experiment presets); ``configs/...`` paths find
them from any directory."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dvsft.experiments.settings import PRESETS_DIR
from dvsft.training.config import CONFIGS_DIR, config_file, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_repository_configs_is_the_packaged_folder():
    assert (ROOT / "configs").resolve() == CONFIGS_DIR
    assert CONFIGS_DIR == ROOT / "src" / "dvsft" / "configs"
    assert (CONFIGS_DIR / "tiny_cpu.yaml").is_file()


def test_configs_path_resolves_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_file("configs/tiny_cpu.yaml") == CONFIGS_DIR / "tiny_cpu.yaml"
    assert config_file("configs/accelerate/ddp.yaml") == CONFIGS_DIR / "accelerate" / "ddp.yaml"
    cfg = load_config("configs/tiny_cpu.yaml", ["--data", "x.jsonl"], check=False)
    assert cfg.model == "tiny" and cfg.data == ["x.jsonl"]
    # a file of that name in the working directory wins over the packaged one
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny_cpu.yaml").write_text("model: mine\n")
    assert config_file("configs/tiny_cpu.yaml") == Path("configs/tiny_cpu.yaml")
    # unknown names stay as given, so the error names the path the user wrote
    with pytest.raises(FileNotFoundError, match="configs/nope.yaml"):
        load_config("configs/nope.yaml", check=False)


def test_wheel_contains_every_config(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."]
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    (wheel,) = out.glob("dvsft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"dvsft/configs/{p.relative_to(CONFIGS_DIR).as_posix()}" for p in CONFIGS_DIR.rglob("*") if p.is_file()}
    assert len(configs) >= 13
    assert configs <= names, sorted(configs - names)
    presets = {f"dvsft/experiments/presets/{p.name}" for p in PRESETS_DIR.glob("*.yaml")}
    assert presets == {f"dvsft/experiments/presets/{k}.yaml" for k in ("demo", "compare", "scenes")}
    assert presets <= names, sorted(presets - names)
