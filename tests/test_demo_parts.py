"""The demo's parts on real tiny models: oracle pages, the graft, the image swap, preset overrides."""

from dataclasses import replace

import pytest
import torch

from dvsft.core.records import read_jsonl
from dvsft.data.collator import VisionCollator
from dvsft.experiments.demo import PRESETS, apply_overrides, build_data, page_pixels
from dvsft.experiments.demo_eval import resolved, swapped, teacher_forced
from dvsft.experiments.demo_text import graft, oracle_batch, oracle_encode, oracle_forward
from dvsft.models.loading import load_model, load_processor
from dvsft.testing.tiny import save_tiny


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    preset = PRESETS["toy"]
    files = build_data(preset, out)
    pixels = page_pixels(preset)
    base = save_tiny(out / "base", replace(preset.tiny, min_pixels=pixels, max_pixels=pixels))
    return preset, files, base


def records(files, name):
    return resolved(list(read_jsonl(files[name])), files[name])


def test_data_splits(toy):
    preset, files, _ = toy
    assert set(files) == {"train", "val_text", "val_random", "text", "random"}
    text, rand = records(files, "text"), records(files, "random")
    assert len(text) == len(rand) == preset.heldout_pages
    # held-out running text is never a window of the training text
    train_text = " ".join(r["messages"][-1]["content"] for r in records(files, "train"))
    assert all(r["messages"][-1]["content"] not in train_text for r in text)


def test_oracle_cells_are_the_vision_labels(toy):
    _, files, base = toy
    processor = load_processor(base)
    collator = VisionCollator(processor)
    record = records(files, "train")[0]
    enc = oracle_encode(record, collator)
    real = collator.encode(record)  # the real collator, with the image
    assert torch.equal(enc["input_ids"], real.input_ids) and torch.equal(enc["labels"], real.labels)
    # the k-th cell holds the vision label the training collator puts on the k-th image token
    labels = dict(real.vision_tokens)  # sequence position -> label id
    image_pos = torch.nonzero(real.input_ids == collator.image_token_id).flatten().tolist()
    assert labels and len(image_pos) == enc["cells"].numel()
    expected = [labels.get(pos, collator.image_token_id) for pos in image_pos]
    assert enc["cells"].tolist() == expected

    model = load_model(base)
    pair = [enc, oracle_encode(records(files, "train")[1], collator)]
    batch = oracle_batch(pair, collator.pad_token_id, collator.image_token_id)
    out = oracle_forward(model, batch)
    assert torch.isfinite(out.loss)
    # the oracle cells are what the model sees: another word in a cell changes the prediction
    batch["cells"] = torch.roll(batch["cells"], 1)
    assert not torch.allclose(oracle_forward(model, batch).logits, out.logits)


def test_graft_takes_the_llm_and_keeps_the_vision_tower(toy, tmp_path):
    preset, _, base = toy
    pixels = page_pixels(preset)
    other = save_tiny(tmp_path / "other", replace(preset.tiny, seed=5, min_pixels=pixels, max_pixels=pixels))
    before = load_model(other).state_dict()
    graft(base, other)
    after, text = load_model(other).state_dict(), load_model(base).state_dict()
    llm = [k for k in after if k.startswith("model.language_model.")]
    vision = [k for k in after if k.startswith("model.visual.")]
    assert llm and vision
    assert all(torch.equal(after[k], text[k]) for k in llm)
    assert all(torch.equal(after[k], before[k]) for k in vision)
    assert not all(torch.equal(before[k], text[k]) for k in llm)


def test_image_swap_scores_another_pages_image(toy):
    _, files, base = toy
    text = records(files, "text")
    swap = swapped(text)
    assert [r["messages"] for r in swap] == [r["messages"] for r in text]
    assert all(a["image"] != b["image"] for a, b in zip(swap, text, strict=True))
    assert sorted(r["image"] for r in swap) == sorted(r["image"] for r in text)
    # same transcription targets, other pixels
    collator = VisionCollator(load_processor(base), vision_labels=False)
    a, b = collator(text), collator(swap)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["pixel_values"], b["pixel_values"])
    assert 0.0 <= teacher_forced(load_model(base).eval(), collator, swap) <= 1.0


def test_overrides_are_typed_and_checked():
    p = apply_overrides(PRESETS["toy"], ["noncontextual=0.5", "text_steps=7", "tiny.layers=3", "lr_scheduler=constant"])
    assert p.noncontextual == 0.5 and p.text_steps == 7 and p.tiny.layers == 3 and p.lr_scheduler == "constant"
    with pytest.raises(ValueError, match="no_such_key=1.*expected KEY=VALUE"):
        apply_overrides(PRESETS["toy"], ["no_such_key=1"])
    with pytest.raises(ValueError, match="text_steps=many"):
        apply_overrides(PRESETS["toy"], ["text_steps=many"])


def test_a_family_gets_its_own_learning_rate_unless_set():
    """Text models without QK-norm (LLaVA-OneVision's Qwen2, Idefics3 / SmolVLM's Llama) run the cpu preset at 1e-3;
    ``--set learning_rate=...`` still wins, and the other families keep the preset's rate."""
    from dvsft.experiments.demo import demo_preset

    assert PRESETS["cpu"].family_learning_rate == {"llava_onevision": 1e-3, "idefics3": 1e-3, "smolvlm": 1e-3}
    assert demo_preset("cpu", family="idefics3").learning_rate == 1e-3
    assert demo_preset("cpu", ["tiny.family=llava_onevision"]).learning_rate == 1e-3
    assert demo_preset("cpu", ["learning_rate=0.003"], family="idefics3").learning_rate == 3e-3
    assert demo_preset("cpu", family="internvl").learning_rate == demo_preset("cpu").learning_rate == 2e-3
    assert demo_preset("toy", family="idefics3").learning_rate == PRESETS["toy"].learning_rate  # toy sets none


def test_a_family_is_named_as_the_registry_names_it():
    """``--family llava-onevision`` (an alias) or ``qwen3_5`` (a spelling of the model type) is the tiny family of
    that name, with its learning rate; a family no tiny model has is refused naming the tiny ones."""
    from dvsft.experiments.demo import demo_preset

    preset = demo_preset("cpu", family="llava-onevision")
    assert preset.tiny.family == "llava_onevision" and preset.learning_rate == 1e-3
    assert demo_preset("cpu", family="qwen3_5").tiny.family == "qwen3.5"
    with pytest.raises(ValueError, match="family must be one of qwen3-vl, .*smolvlm; got 'llama'"):
        demo_preset("cpu", family="llama")


def test_presets_come_typed_from_the_packaged_yaml(tmp_path):
    from dvsft.experiments.compare import PRESETS as COMPARE
    from dvsft.experiments.settings import DemoPreset, typed

    assert list(PRESETS) == ["cpu", "reads", "gpu", "toy"] and list(COMPARE) == ["cpu", "gpu", "toy"]
    cpu = PRESETS["cpu"]
    assert cpu.name == "cpu" and cpu.learning_rate == 2e-3 and isinstance(cpu.vision_lambda, float)
    assert cpu.tiny.hidden_size == 128 and cpu.lr_scheduler == "constant_with_warmup" and cpu.text_steps == 0
    assert PRESETS["gpu"].device == "cuda" and COMPARE["cpu"].demo == "cpu" and COMPARE["toy"].asvr_k == 4
    assert isinstance(COMPARE["gpu"].methods, tuple) and "finevit-staged" in COMPARE["gpu"].methods
    fields = {k: v for k, v in vars(PRESETS["toy"]).items() if k != "tiny"}
    assert typed(DemoPreset, {**fields, "vision_lambda": 2}, "x").vision_lambda == 2.0  # an int widens to float
    with pytest.raises(ValueError, match=r"x: unknown field\(s\) colour"):
        typed(DemoPreset, {**fields, "colour": 1}, "x")
    with pytest.raises(ValueError, match="x.learning_rate: expected float, got '2e-3'"):
        typed(DemoPreset, {**fields, "learning_rate": "2e-3"}, "x")  # YAML reads 2e-3 as a string
    with pytest.raises(ValueError, match="x.tiny.layers: expected int"):
        typed(DemoPreset, {**fields, "tiny": {"layers": 1.5}}, "x")


def test_bad_demo_options_are_usage_errors(tmp_path):
    from typer.testing import CliRunner

    from dvsft.cli import app

    for args, message in (
        (["--set", "no_such_key=1"], "expected KEY=VALUE"),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--methods", "sft,nope"], "methods must be among"),
        (["--split", "test"], "split must be heldout or val"),
    ):
        res = CliRunner().invoke(app, ["demo", *args, "--out", str(tmp_path / "demo")])
        assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    assert not (tmp_path / "demo").exists()
