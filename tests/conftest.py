"""Shared fixtures: Qwen's real tokenizer, built once (then cached on disk) and loaded once per session."""

import pytest


@pytest.fixture(scope="session")
def qwen_tok():
    from dvsft.training.qwen_vocab import qwen_tokenizer

    return qwen_tokenizer()
