"""Every TrainingArguments key is passed through, implemented by dvsft, or refused at load (dvsft.training.hf_keys)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from transformers import TrainingArguments

from dvsft.training.config import ConfigError, DVSFTConfig
from dvsft.training.hf_keys import IMPLEMENTED, PASSED, REFUSED

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"
STREAM = {"streaming": True, "max_steps": 4}
# a value dvsft cannot honour for each refused key (and the other keys it needs to be tried)
OFFENDING = {
    "remove_unused_columns": ({"remove_unused_columns": True}, {}),
    "average_tokens_across_devices": ({"average_tokens_across_devices": False}, {}),
    "use_liger_kernel": ({"use_liger_kernel": True}, {}),
    "liger_kernel_config": ({"liger_kernel_config": {"rope": True}}, {}),
    "use_cache": ({"use_cache": True}, {}),
    "auto_find_batch_size": ({"auto_find_batch_size": True}, {}),
    "do_predict": ({"do_predict": True}, {}),
    "label_names": ({"label_names": ["labels"]}, {}),
    "include_for_metrics": ({"include_for_metrics": ["inputs"]}, {}),
    "batch_eval_metrics": ({"batch_eval_metrics": True}, {}),
    "eval_accumulation_steps": ({"eval_accumulation_steps": 2}, {}),
    "eval_use_gather_object": ({"eval_use_gather_object": True}, {}),
    "eval_do_concat_batches": ({"eval_do_concat_batches": False}, {}),
    "train_sampling_strategy": ({"train_sampling_strategy": "group_by_length"}, {}),
    "length_column_name": ({"length_column_name": "n_tokens"}, {}),
    "data_seed": ({"data_seed": 3}, STREAM),
    "ignore_data_skip": ({"ignore_data_skip": True}, STREAM),
    "dataloader_persistent_workers": ({"dataloader_persistent_workers": True, "dataloader_num_workers": 1}, STREAM),
    "dataloader_multiprocessing_context": (
        {"dataloader_multiprocessing_context": "spawn", "dataloader_num_workers": 1},
        STREAM,
    ),
}


def test_every_training_arguments_key_is_classified_once():
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    handled = set(IMPLEMENTED) | set(REFUSED)
    assert not PASSED & handled, "a key is both passed through and handled by dvsft"
    assert PASSED | handled == fields, (sorted(fields - PASSED - handled), sorted((PASSED | handled) - fields))
    assert set(OFFENDING) == set(REFUSED)  # every refusal is tried below


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_refused_values_end_at_load_naming_the_key(key, tmp_path):
    bad, context = OFFENDING[key]
    allowed = {k: v for k, v in bad.items() if k != key}
    DVSFTConfig(output_dir=str(tmp_path), **context, **allowed)  # the context alone loads
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=") as err:
        DVSFTConfig(output_dir=str(tmp_path), **context, **bad)
    assert err.value.key == key and "\n" not in str(err.value)


def test_refusals_follow_the_data_path(tmp_path):
    """data_seed, ignore_data_skip and the DataLoader keys act on in-memory data and are refused for a stream."""
    for key in ("data_seed", "ignore_data_skip", "dataloader_persistent_workers"):
        bad, _ = OFFENDING[key]
        DVSFTConfig(output_dir=str(tmp_path), **bad)


def test_accumulation_that_disagrees_with_the_global_batch_is_refused(tmp_path):
    cfg = DVSFTConfig(output_dir=str(tmp_path), global_batch_size=8, per_device_train_batch_size=2)
    assert cfg.gradient_accumulation_steps == 4
    DVSFTConfig(
        output_dir=str(tmp_path), global_batch_size=8, per_device_train_batch_size=2, gradient_accumulation_steps=4
    )
    with pytest.raises(ConfigError, match="gradient_accumulation_steps 3 disagrees with global_batch_size 8"):
        DVSFTConfig(
            output_dir=str(tmp_path), global_batch_size=8, per_device_train_batch_size=2, gradient_accumulation_steps=3
        )


def test_the_trainer_checks_plain_training_arguments(tiny_dir, tmp_path):
    from dvsft.models.loading import load_model, load_processor
    from dvsft.training.trainer import DVSFTTrainer

    model, processor = load_model(tiny_dir), load_processor(tiny_dir)
    with pytest.raises(ConfigError, match="remove_unused_columns=True"):
        DVSFTTrainer(model=model, args=TrainingArguments(str(tmp_path)), processing_class=processor)


def test_docs_table_names_every_handled_key():
    text = DOCS.read_text(encoding="utf-8")
    missing = [k for k in sorted(set(IMPLEMENTED) | set(REFUSED)) if f"`{k}`" not in text]
    assert not missing, f"docs/training.md does not name {missing}"
