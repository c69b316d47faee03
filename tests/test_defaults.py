"""One source of defaults (issue #24): a plain ``TrainingArguments`` trains as ``DVSFTConfig()`` does, every
default comes from its owner (the loss settings, the alignment filters, the collator), and the process that
writes run files is the one ``args`` names, not an environment variable."""

import json

import torch
from transformers import TrainingArguments

from dvsft.align.aligner import AlignConfig
from dvsft.data.collator import MAX_LENGTH, VisionCollator
from dvsft.data.dataset import load_records
from dvsft.models.geometry import TRAIN_MAX_PIXELS, TRAIN_MIN_PIXELS
from dvsft.models.loading import load_model, load_processor
from dvsft.objectives.losses import LossSettings
from dvsft.objectives.lsd import crop_processor
from dvsft.training.config import DVSFTConfig
from dvsft.training.train import report_data_skips
from dvsft.training.trainer import DVSFTTrainer


def test_plain_training_arguments_train_like_the_config_defaults(tiny_dir, train_records, tmp_path):
    plain = TrainingArguments(str(tmp_path / "plain"), remove_unused_columns=False)
    trainers = [
        DVSFTTrainer(model=load_model(tiny_dir), args=args, processing_class=load_processor(tiny_dir))
        for args in (plain, DVSFTConfig(output_dir=str(tmp_path / "config")))
    ]
    plain_collator, config_collator = (t.data_collator for t in trainers)
    assert plain_collator.align_config == config_collator.align_config == AlignConfig()
    assert plain_collator.max_length == config_collator.max_length == MAX_LENGTH
    assert [t.objectives[0].settings for t in trainers] == [LossSettings(), LossSettings()]

    samples = list(load_records(train_records, one_qa_per_image=True))[:2]
    batches = [t.data_collator(samples) for t in trainers]
    assert batches[0].keys() == batches[1].keys()
    for key, value in batches[0].items():  # same pixels, labels and vision labels
        assert torch.equal(value, batches[1][key]) if torch.is_tensor(value) else value == batches[1][key], key
    assert batches[0]["vision_label_sets"].shape[1] > 1  # vision smoothing has a label set to spread over

    with torch.no_grad():
        out = [t.compute_loss(t.model, batches[1], return_outputs=True) for t in trainers]
    assert float(out[0][0]) == float(out[1][0])  # lambda, eps and chunking are the config's
    assert out[0][1]["terms"].keys() == out[1][1]["terms"].keys()
    for name, value in out[0][1]["terms"].items():
        assert float(value) == float(out[1][1]["terms"][name]), name


def test_the_config_defaults_are_their_owners_defaults(tiny_dir, tmp_path):
    cfg = DVSFTConfig(output_dir=str(tmp_path))
    assert LossSettings.of(cfg) == LossSettings() == LossSettings.of(TrainingArguments(str(tmp_path)))
    assert AlignConfig(cfg.align_max_height_cells, cfg.align_max_subtokens, cfg.label_leading_space) == AlignConfig()
    assert (cfg.max_length, cfg.min_pixels, cfg.max_pixels) == (MAX_LENGTH, TRAIN_MIN_PIXELS, TRAIN_MAX_PIXELS)
    assert VisionCollator(load_processor(tiny_dir)).max_length == cfg.max_length


def test_lsd_crops_use_the_training_pixels_without_a_dvsft_config(tiny_dir, tmp_path):
    processor = load_processor(tiny_dir)
    plain = crop_processor(processor, TrainingArguments(str(tmp_path), remove_unused_columns=False)).image_processor
    assert plain.size == crop_processor(processor, DVSFTConfig(output_dir=str(tmp_path))).image_processor.size
    assert (plain.size["shortest_edge"], plain.size["longest_edge"]) == (TRAIN_MIN_PIXELS, TRAIN_MAX_PIXELS)


def test_skip_reasons_are_written_by_the_process_args_name(tmp_path, monkeypatch):
    from helpers import make_records

    data = make_records(tmp_path / "data", n=1)
    with data.open("a") as f:
        f.write("{not json\n")
    cfg = DVSFTConfig(output_dir=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    samples = load_records(data)
    monkeypatch.setenv("RANK", "1")  # a launcher's variable: args.process_index (0 here) decides
    assert cfg.process_index == 0 and cfg.should_save
    path = report_data_skips(cfg, samples, held_out=False)
    assert path is not None and path.is_file()
    assert [json.loads(row)["line"] for row in path.read_text().splitlines()] == [2]
