"""Shared fixtures: Qwen's real tokenizer, built once (then cached on disk) and loaded once per session."""

import pytest


@pytest.fixture(scope="session")
def qwen_tok():
    from dvsft.training.qwen_vocab import qwen_tokenizer

    return qwen_tokenizer()


@pytest.fixture(scope="session")
def torchvision_roi_align():
    """torchvision's ROIAlign (see tests/torchvision_reference.py): ``(function, what it is)``."""
    from torchvision_reference import torchvision_roi_align

    try:
        return torchvision_roi_align()
    except RuntimeError as err:
        pytest.skip(f"no torchvision reference: the package registry is unreachable ({err})")
