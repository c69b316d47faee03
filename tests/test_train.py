"""dvsft train: config, model setup, objectives, the Trainer recipe, resume, final dir (tiny real models)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import losses, make_records, overrides
from PIL import Image
from transformers import TrainerCallback

from dvsft.objectives.base import (
    HEADS_ATTR,
    Objective,
    base_model,
    language_model_of,
    register_objective,
    vision_tower_of,
)
from dvsft.objectives.registry import method_names, objective_class
from dvsft.testing.tiny import TinyConfig
from dvsft.training.config import CONFIGS_DIR, _sections, flat_keys, load_config, validate
from dvsft.training.train import prepare, train

# ----------------------------------------------------------------------------- config


def test_config_defaults_are_table4():
    cfg = load_config(None, [], check=False)
    assert cfg.learning_rate == 5e-6 and cfg.warmup_steps == 0.03 and cfg.lr_scheduler_type == "cosine"
    assert cfg.max_grad_norm == 1.0 and cfg.weight_decay == 0.0 and cfg.max_length == 8192
    assert cfg.num_train_epochs == 1.0 and cfg.per_device_train_batch_size == 1
    assert cfg.min_pixels == 32 * 32 * 64 and cfg.max_pixels == 32 * 32 * 2048
    assert cfg.train_vision is False and cfg.lora is False
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (64, 128, 0.0)
    assert cfg.remove_unused_columns is False  # the collator needs the raw records
    assert all(help_ for _, _, help_ in flat_keys().values())


def test_config_sections_aliases_and_any_training_arguments_key(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model: tiny\nlora: {r: 16}\nlearning_rate: 5e-6\nadam_beta2: 0.98\noptim: adamw_torch\n")
    cfg = load_config(
        yaml_file,
        ["--lora.r", "8", "--lora", "--learning_rate=1e-5", "--align.max_subtokens", "2"],
        check=False,
    )
    assert cfg.lora_r == 8 and cfg.lora is True and cfg.learning_rate == 1e-5
    assert cfg.align_max_subtokens == 2 and cfg.model == "tiny"
    assert cfg.adam_beta2 == 0.98 and cfg.optim == "adamw_torch"  # TrainingArguments keys from the YAML
    cfg = load_config(
        yaml_file, ["--adam_beta2", "0.95", "--ddp_timeout", "60", "--torch_compile", "false"], check=False
    )
    assert cfg.adam_beta2 == 0.95 and cfg.ddp_timeout == 60 and cfg.torch_compile is False
    cfg = load_config(yaml_file, ["--model.llm", "a", "--model_vision_from", "b"], check=False)
    assert (cfg.model_llm, cfg.model_vision_from) == ("a", "b")
    cfg = load_config(yaml_file, ["--objectives.basic.lambda2", "0.5", "--resume"], check=False)
    assert cfg.objectives == {"basic": {"lambda2": 0.5}} and cfg.resume_from_checkpoint == "last"
    with pytest.raises(
        ValueError, match=r"command line: unknown config key 'learning_rat' \(did you mean learning_rate"
    ):
        load_config(yaml_file, ["--learning_rat", "1"], check=False)
    with pytest.raises(ValueError, match=r"command line: argument --lora_r.*invalid int value: 'many'"):
        load_config(yaml_file, ["--lora.r", "many"], check=False)
    (tmp_path / "bad.yaml").write_text("modle: tiny\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown config key 'modle'"):
        load_config(tmp_path / "bad.yaml", check=False)
    with pytest.raises(ValueError, match="set either model or model_llm"):
        load_config(yaml_file, ["--model.llm", "a", "--model.vision_from", "b"], check=True)


@pytest.mark.parametrize(
    "name", ["tiny_cpu", "qwen3vl_2b_full", "qwen3vl_8b_lora", "qwen3_1.7b_graft", "finevit_stage1"]
)
def test_presets_parse(name):
    cfg = load_config(CONFIGS_DIR / f"{name}.yaml", ["--bf16", "false"], check=False)  # the GPU recipes set bf16
    validate(cfg, paths=False)  # their model dirs and data are the user's
    assert cfg.gradient_accumulation_steps == cfg.global_batch_size // cfg.per_device_train_batch_size
    first = objective_class(method_names(cfg.method)[0])  # registered objectives, the text loss first
    assert "sft" in first.provides
    # every key of the file reached the config with the file's value (a section S: {k: v} is the key S_k)
    tree = dict(_sections(yaml.safe_load((CONFIGS_DIR / f"{name}.yaml").read_text())))
    assert len(tree) >= 15
    for key, value in tree.items():
        got = getattr(cfg, key)
        if key == "bf16":
            continue  # overridden above
        if key == "data" and isinstance(value, str):
            value = [value]
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, (key, got, value)


def _qa_file(path: Path, n_images: int, pairs: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        Image.new("RGB", (32, 32), "white").save(path.parent / f"{path.stem}{i}.png")
        qa = [({"role": "user", "content": f"Q{k}"}, {"role": "assistant", "content": f"A{k}"}) for k in range(pairs)]
        turns = [m for pair in qa for m in pair]
        turns[0]["content"] = "<image>" + turns[0]["content"]
        rows.append({"id": f"{path.stem}{i}", "image": f"{path.stem}{i}.png", "messages": turns})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_recipes_choose_qa_pairs_as_the_paper(tmp_path):
    """Qwen3-VL recipes: 1 pair per image (2 for InfoVQA, one sample); the graft recipe: every pair."""
    from dvsft.training.train import load_dataset

    data = [str(_qa_file(tmp_path / d / f"{d}.jsonl", 3, 4)) for d in ("docvqa", "infovqa")]
    out = str(tmp_path / "run")
    gpu_free = {"data": data, "output_dir": out, "bf16": False}  # the recipes set bf16 (a GPU's)
    for name in ("qwen3vl_2b_full", "qwen3vl_8b_lora"):
        cfg = load_config(CONFIGS_DIR / f"{name}.yaml", gpu_free, check=False)
        validate(cfg, paths=False)  # the recipes' model dirs are the user's
        samples = load_dataset(cfg)
        turns = [sum(m["role"] == "assistant" for m in s["messages"]) for s in samples]
        assert turns == [1, 1, 1, 2, 2, 2], name
    cfg = load_config(CONFIGS_DIR / "qwen3_1.7b_graft.yaml", gpu_free, check=False)
    validate(cfg, paths=False)
    samples = load_dataset(cfg)
    assert len(samples) == 2 * 3 * 4 and all(len(s["messages"]) == 2 for s in samples)
    with pytest.raises(ValueError, match="config: qa_per_image: infovq names no data file"):
        load_config(None, {"model": "tiny", "data": data, "qa_per_image": {"infovq": 2}})
    with pytest.raises(ValueError, match="command line: qa_per_image: 0 is not a count"):
        load_config(None, ["--model", "tiny", "--data", *data, "--qa_per_image", "0"])
    assert load_config(None, ["--model", "tiny", "--data", *data, "--qa_per_image", "2"]).qa_per_image == 2
    with pytest.raises(ValueError, match="streaming makes one sample of each record"):
        validate(
            load_config(
                CONFIGS_DIR / "qwen3_1.7b_graft.yaml", {**gpu_free, "streaming": True, "max_steps": 9}, check=False
            ),
            paths=False,
        )


def test_method_names_count_text_once():
    assert method_names("sft") == ["sft"]
    assert method_names("dvsft") == ["dvsft"]  # DV-SFT's loss includes the text loss
    assert method_names("basic") == ["sft", "basic"]
    assert method_names("basic+dvsft") == ["dvsft", "basic"]  # dvsft meets basic's requirement of the text loss
    assert method_names("dvsft+probe+dvsft") == ["dvsft", "probe"]
    for method in ("sft+dvsft", "basic+dvsft+sft"):
        with pytest.raises(ValueError, match=r"'(sft|dvsft)' and '(sft|dvsft)' both compute 'sft' \(sft is dvsft"):
            method_names(method)
    with pytest.raises(ValueError, match="unknown objective 'nope'"):
        method_names("dvsft+nope")


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", ["sft", "dvsft"])
@pytest.mark.slow
def test_losses_fall_on_a_repeated_batch(tiny_dir, tmp_path, method):
    data = make_records(tmp_path / "data", n=2, seed=1)
    out = tmp_path / "run"
    result = train(load_config(None, overrides(tiny_dir, data, out, method=method, max_steps=6, save_final=False)))
    text = losses(result.log, "text_loss")
    assert len(text) == 6 and text[-1] < text[0] - 0.5, text
    if method == "dvsft":
        vision = losses(result.log, "vision_loss")
        assert vision[-1] < vision[0] - 0.5, vision
        assert all(row["vision_tokens"] > 0 for row in result.log if "vision_tokens" in row)
        assert all(0.0 <= row["vision_acc"] <= 1.0 for row in result.log if "vision_acc" in row)
    else:
        assert "vision_loss" not in result.log[0]
    row = result.log[0]
    assert row["samples_per_s"] > 0 and row["tokens_per_s"] > 0 and "learning_rate" in row
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()][:6] == list(range(1, 7))


def test_gradients_reach_llm_and_projector_not_frozen_vision(tiny_dir, train_records, tmp_path):
    run = prepare(load_config(None, overrides(tiny_dir, train_records, tmp_path / "run", method="dvsft")))
    model = run.model
    batch = next(iter(run.trainer.get_train_dataloader()))
    assert batch["vision_positions"].shape[0] > 0
    seen = {}
    blocks = vision_tower_of(model).blocks
    blocks[-1].register_forward_hook(lambda m, i, o: seen.setdefault("vit", o))
    model.train()
    loss = run.trainer.compute_loss(model, batch)
    loss.backward()
    vit_out = seen["vit"][0] if isinstance(seen["vit"], tuple) else seen["vit"]
    assert not vit_out.requires_grad and vit_out.grad_fn is None  # the frozen ViT kept no autograd graph
    assert all(p.grad is None and not p.requires_grad for p in blocks.parameters())
    proj = vision_tower_of(model).merger
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    layers = language_model_of(model).layers
    assert all(p.grad is not None for p in layers[0].parameters())
    assert layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_lora_trains_only_adapters(tiny_dir, train_records, tmp_path):
    from safetensors.torch import load_file

    args = overrides(tiny_dir, train_records, tmp_path / "run", **{"lora": True, "lora.r": 4, "lora_alpha": 8})
    run = prepare(load_config(None, args))
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(".language_model." in n for n in trainable)  # adapters on the LLM's linear layers only
    targets = {n.split(".lora_")[0].removeprefix("base_model.model.") + ".weight" for n in trainable}
    result = train(load_config(None, args))
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    final, base = load_file(result.final_dir / "model.safetensors"), load_file(tiny_dir / "model.safetensors")
    assert final.keys() == base.keys()  # merged: a plain model, no adapter keys
    changed = {k for k in base if not torch.equal(final[k], base[k])}
    assert changed and changed <= targets  # only the adapted linear layers moved (merged adapters)


@pytest.mark.slow
def test_basic_trains_projector_and_first_layer(tiny_dir, train_records, tmp_path):
    run = prepare(load_config(None, overrides(tiny_dir, train_records, tmp_path / "run", method="basic", max_steps=2)))
    model = run.model
    proj = {id(p) for p in vision_tower_of(model).merger.parameters()}
    first = {id(p) for p in language_model_of(model).layers[0].parameters()}
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert {id(named[n]) for n in trainable} == proj | first
    before = {n: p.detach().clone() for n, p in named.items()}
    run.trainer.train()
    changed = {n for n, p in named.items() if not torch.equal(before[n], p.detach())}
    assert changed == trainable
    rows = [r for r in run.log_callback.rows if "basic_loss" in r]
    assert rows and all(r["basic_loss"] > 0 and r["basic_kl"] >= 0 and 0 <= r["basic_dir"] <= 4 for r in rows)
    assert all("text_loss" in r for r in rows)


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_losses(tiny_dir, train_records, tmp_path):
    args = dict(max_steps=4, save_steps=2, save_final=False)
    full = train(load_config(None, overrides(tiny_dir, train_records, tmp_path / "a", **args)))
    part = overrides(tiny_dir, train_records, tmp_path / "b", **args)
    first = train(load_config(None, part), callbacks=[_StopAt(2)])
    assert losses(first.log) == pytest.approx(losses(full.log)[:2], abs=1e-6)
    assert (tmp_path / "b" / "checkpoint-2" / "model.safetensors").is_file()
    resumed = train(load_config(None, [*part, "--resume"]))
    assert losses(resumed.log) == pytest.approx(losses(full.log), abs=1e-5)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [s for s in steps if steps.count(s) == 1] == [1, 3]  # steps 2 and 4 also carry the run summary
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(load_config(None, overrides(tiny_dir, train_records, tmp_path / "c", resume_from_checkpoint="last")))


class _ProbeObjective(Objective):
    """A trainable head on the visual positions' hidden states (exercises heads: optimise, checkpoint, drop)."""

    requires = ("sft",)

    def setup(self, model, config):
        torch.manual_seed(0)
        self.head = torch.nn.Linear(model.config.get_text_config().hidden_size, 1)

    def modules(self):
        return {"head": self.head}

    def weights(self):
        return {"probe_loss": 1.0}

    def loss(self, model, batch, hidden):
        vis = hidden.last[hidden.image_mask]
        return {"probe_loss": (self.head(vis) - 1.0).pow(2).mean()}


register_objective("probe", _ProbeObjective)


@pytest.mark.slow
def test_final_dir_loads_and_objective_heads_are_trained_not_saved(tiny_dir, train_records, tmp_path):
    from transformers import AutoModelForImageTextToText

    from dvsft.models.loading import load_model, load_processor

    args = overrides(tiny_dir, train_records, tmp_path / "run", method="dvsft+probe", max_steps=2, save_steps=2)
    run_args = load_config(None, args)
    result = train(run_args)
    from safetensors.torch import load_file

    assert len(losses(result.log, "probe_loss")) == 2
    heads = load_file(tmp_path / "run" / "checkpoint-2" / "objective_heads.safetensors")
    torch.manual_seed(0)
    initial = torch.nn.Linear(64, 1)
    assert set(heads) == {"probe_head.weight", "probe_head.bias"}
    assert not torch.equal(heads["probe_head.weight"], initial.weight.detach())  # the head was optimised
    final = result.final_dir
    assert final == tmp_path / "run" / "final"
    model = load_model(final)
    processor = load_processor(final)
    assert not any(HEADS_ATTR in k for k in model.state_dict())
    again = AutoModelForImageTextToText.from_pretrained(final)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    base = load_model(tiny_dir)
    assert not torch.equal(base.lm_head.weight, model.lm_head.weight)  # it did train
    assert processor.tokenizer.get_vocab() == load_processor(tiny_dir).tokenizer.get_vocab()
    assert processor.image_processor.size["longest_edge"] == 32 * 32 * 16


@pytest.mark.slow
def test_cli_train_and_unknown_key(tiny_dir, train_records, tmp_path):
    from typer.testing import CliRunner

    from dvsft.cli import app

    runner = CliRunner()
    with pytest.raises(ValueError, match=r"command line: unknown config key 'lerning_rate' \(did you mean"):
        app(args=["--debug", "train", "--model", "tiny", "--lerning_rate", "1"], prog_name="dvsft")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_dir}\ndata: {train_records}\nmethod: sft\n")
    args = overrides(tiny_dir, train_records, tmp_path / "run", max_steps=1)
    args = [a for a in args if a not in ("--model", str(tiny_dir), "--data", str(train_records))]
    res = runner.invoke(app, ["train", str(cfg), *args])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "run" / "dvsft_train.json").read_text())
    assert saved["method"] == "sft" and saved["max_steps"] == 1
    keys = runner.invoke(app, ["train", "--keys"])
    assert keys.exit_code == 0 and "vision_lambda" in keys.output


# ----------------------------------------------------------------------------- graft

# Published sizes (config.json of Qwen/Qwen3-1.7B and Qwen/Qwen3-VL-2B-Instruct): the two LLMs are the same shape.
QWEN3_1_7B = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16)
QWEN3_1_7B.update(num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)
QWEN3_VL_2B_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048)
QWEN3_VL_2B_VISION.update(patch_size=16, spatial_merge_size=2, deepstack_visual_indexes=[5, 11, 17])


def test_graft_of_qwen3_1_7b_copies_the_whole_visual_of_qwen3_vl_2b(qwen_tok):
    """At the real sizes (meta tensors) every vision-side tensor, merger and DeepStack mergers included, fits."""
    from transformers import Qwen3Config, Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    from dvsft.training.model_setup import graft_config

    vl = Qwen3VLConfig(
        text_config={**QWEN3_1_7B, "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20]}},
        vision_config=QWEN3_VL_2B_VISION,
    )
    config = graft_config(Qwen3Config(**QWEN3_1_7B), vl, qwen_tok)
    assert config.text_config.hidden_size == vl.text_config.hidden_size == 2048
    with torch.device("meta"):
        ours = Qwen3VLVisionModel._from_config(config.vision_config).state_dict()
        theirs = Qwen3VLVisionModel._from_config(vl.vision_config).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert sum(k.startswith("deepstack_merger_list.") for k in ours) == 3 * 6  # 3 mergers: norm, fc1, fc2


def test_graft_of_an_equally_wide_llm_copies_merger_and_deepstack_mergers(tmp_path):
    from transformers import AutoModelForImageTextToText, Qwen3Config, Qwen3ForCausalLM

    from dvsft.models.loading import save_processor
    from dvsft.testing.tiny import build_model_config, tiny_processor, train_tokenizer
    from dvsft.training.model_setup import PROJECTOR_PREFIXES, graft

    tok = train_tokenizer(600)
    config = build_model_config(TinyConfig(), tok)
    config.vision_config.deepstack_visual_indexes = [0]  # as Qwen3-VL: DeepStack mergers beside the merger
    torch.manual_seed(3)
    vl = AutoModelForImageTextToText.from_config(config)
    vl.save_pretrained(tmp_path / "vl")
    save_processor(tiny_processor(tok, 32 * 32 * 4, 32 * 32 * 64), tmp_path / "vl")
    text = config.text_config
    llm = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tok),
            hidden_size=text.hidden_size,  # as wide as the VL model's own LLM, like Qwen3-1.7B and Qwen3-VL-2B
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=text.head_dim,
        )
    )
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    source = vision_tower_of(vl).state_dict()
    model, _ = graft(tmp_path / "llm", tmp_path / "vl")
    record = model.config.dvsft_graft
    assert record["fresh"] == [] and record["copied"] == sorted(source)
    assert any(k.startswith("deepstack_merger_list.0.") for k in record["copied"])
    got = vision_tower_of(model).state_dict()
    assert all(torch.equal(got[k], source[k]) for k in source)
    model, _ = graft(tmp_path / "llm", tmp_path / "vl", fresh_projector=True)
    record = model.config.dvsft_graft
    assert record["fresh"] == sorted(k for k in source if k.startswith(PROJECTOR_PREFIXES))
    assert {"merger.linear_fc1.weight", "deepstack_merger_list.0.linear_fc2.weight"} <= set(record["fresh"])
    got = vision_tower_of(model).state_dict()
    assert not torch.equal(got["merger.linear_fc2.weight"], source["merger.linear_fc2.weight"])
    assert torch.equal(got["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])


def _llm_tokenizer():
    """A BPE tokenizer with ChatML tokens but no vision tokens (like a text LLM's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dvsft.sources.corpora import corpus_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().split("\n")[:3000], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.mark.slow
def test_graft_llm_onto_vision_tower(tiny_dir, train_records, tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = _llm_tokenizer()
    torch.manual_seed(1)
    llm = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            tie_word_embeddings=False,
        )
    )
    llm_dir = tmp_path / "llm"
    llm.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    args = overrides(tiny_dir, train_records, tmp_path / "run", max_steps=2)
    args = [a for a in args if a not in ("--model", str(tiny_dir))]
    cfg = load_config(None, [*args, "--model.llm", str(llm_dir), "--model.vision_from", str(tiny_dir)])
    run = prepare(cfg)
    model = base_model(run.model)
    graft = model.config.dvsft_graft
    assert set(graft["added_tokens"]) >= {"<|image_pad|>", "<|vision_start|>", "<|vision_end|>"}
    assert model.get_input_embeddings().weight.shape[0] == len(run.processor.tokenizer) > len(tokenizer)
    assert torch.equal(language_model_of(model).layers[1].mlp.up_proj.weight, llm.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(model.lm_head.weight[: len(tokenizer)], llm.lm_head.weight)
    vl = base_model(__import__("dvsft.models.loading", fromlist=["load_model"]).load_model(tiny_dir))
    ours, theirs = vision_tower_of(model), vision_tower_of(vl)
    assert torch.equal(ours.blocks[0].attn.qkv.weight, theirs.blocks[0].attn.qkv.weight)
    assert ours.merger.linear_fc2.weight.shape == (48, theirs.merger.linear_fc2.weight.shape[1])
    # a 48-wide LLM on a 64-wide VL model: only the projector's output layer cannot be copied
    assert graft["fresh"] == ["merger.linear_fc2.bias", "merger.linear_fc2.weight"]
    assert set(graft["copied"]) == set(theirs.state_dict()) - set(graft["fresh"])
    run.trainer.train()
    vision = [r["vision_loss"] for r in run.log_callback.rows if "vision_loss" in r]
    assert len(vision) == 2 and all(v == v for v in vision)
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


# ----------------------------------------------------------------------------- other families


def _save_family(kind: str, tiny_dir: Path, out: Path) -> Path:
    """A tiny Qwen2-VL / Qwen2.5-VL dir built from a config (28 px cells), with the tiny tokenizer."""
    import transformers
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    from dvsft.models.loading import CHAT_TEMPLATE, build_processor, save_processor

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
        tie_word_embeddings=True,
    )
    if kind == "qwen2_5_vl":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
        vision.update(fullatt_block_indexes=[0], window_size=112)
        cfg_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=1, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=2)
        cfg_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    ids = tok.convert_tokens_to_ids
    config = cfg_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model_cls(config).save_pretrained(out)
    ip = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, size={"shortest_edge": 3136, "longest_edge": 50176})
    save_processor(build_processor(ip, tok, kind, CHAT_TEMPLATE), out)
    return out


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.slow
def test_qwen2_families_train_through_the_same_path(kind, tiny_dir, tmp_path):
    from dvsft.models.loading import load_model

    model_dir = _save_family(kind, tiny_dir, tmp_path / kind)
    data = make_records(tmp_path / "data", n=2, seed=1)
    args = overrides(model_dir, data, tmp_path / "run", max_steps=4, min_pixels=3136, max_pixels=50176)
    result = train(load_config(None, args))
    vision, text = losses(result.log, "vision_loss"), losses(result.log, "text_loss")
    assert all(row["vision_tokens"] > 0 for row in result.log if "vision_tokens" in row)
    assert vision[-1] < vision[0] and text[-1] < text[0], (vision, text)
    assert load_model(result.final_dir).config.model_type == kind
