"""Shared fixtures, built once per test session (per worker under xdist).

- ``qwen_tok``: Qwen's real tokenizer (built once, then cached on disk);
- ``tiny_dir``: the default tiny Qwen3-VL (``TinyConfig()``) saved as an HF model directory;
- ``train_records``: four rendered pages of word records (:func:`helpers.make_records`);
- ``torchvision_roi_align``: torchvision's ROIAlign, the reference of dvsft's (tests/torchvision_reference.py);
- ``DVSFT_CACHE_DIR``: the encoded-sample cache of the session, in its temporary folder.

Plain helpers (records, run overrides, loss references) are in tests/helpers.py.
"""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def encoded_cache_in_tmp(tmp_path_factory):
    """The encoded-sample cache (``encoded_cache_dir: auto``) of every test and its subprocesses lives in the
    session's temporary folder: tests never read what another session (or the user's own runs) cached."""
    os.environ["DVSFT_CACHE_DIR"] = str(tmp_path_factory.mktemp("dvsft_cache"))


@pytest.fixture(scope="session")
def qwen_tok():
    from dvsft.testing.qwen_vocab import qwen_tokenizer

    return qwen_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The default tiny model; tests read it and never write into it."""
    from dvsft.testing.tiny import TinyConfig, save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", TinyConfig())


@pytest.fixture(scope="session")
def train_records(tmp_path_factory) -> Path:
    from helpers import make_records

    return make_records(tmp_path_factory.mktemp("train_records"), n=4)


@pytest.fixture(scope="session")
def torchvision_roi_align():
    """torchvision's ROIAlign (see tests/torchvision_reference.py): ``(function, what it is)``."""
    from torchvision_reference import torchvision_roi_align

    try:
        return torchvision_roi_align()
    except RuntimeError as err:
        pytest.skip(f"no torchvision reference: the package registry is unreachable ({err})")
