"""Freeze options as users expect them (issue #24).

Every parameter of each family's tiny model is named here by the part a user reads from the model's own
module tree (HF's parameter names, written per family in this file, independent of dvsft's family
modules): ``train_vision`` owns the ViT (patch / position embeddings, blocks, its norms and pooling head),
``train_projector`` the merger / projector / connector, every DeepStack merger and LLaVA-OneVision's
``image_newline`` (the separator embedding the projector's output rows end with), ``train_llm`` the
decoder (embeddings, layers, final norm) and the LM head. Each flag must train exactly its part, and
``trainable_counts`` must count every parameter in that part: none may be left in no part.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from dvsft.objectives.base import Objective
from dvsft.testing.tiny import TINY_FAMILIES, TinyConfig, build_tiny
from dvsft.training.model_setup import part_parameters, set_trainable, trainable_counts

LLM = [r"model\.language_model\.(embed_tokens|layers|norm)\.", r"lm_head\."]
QWEN = {
    "vision": [r"model\.visual\.(patch_embed|pos_embed|blocks)\."],
    "projector": [r"model\.visual\.(merger|deepstack_merger_list)\."],
    "llm": LLM,
}
INTERNVL = {
    "vision": [r"model\.vision_tower\.(embeddings|encoder)\."],  # InternViT: cls token, layer scales inside
    "projector": [r"model\.multi_modal_projector\."],
    "llm": LLM,
}
SIGLIP = r"(embeddings|encoder|post_layernorm|head)\."
LLAVA_ONEVISION = {
    "vision": [r"model\.vision_tower\." + SIGLIP],
    "projector": [r"model\.multi_modal_projector\.", r"model\.image_newline$"],
    "llm": LLM,
}
IDEFICS3 = {
    "vision": [r"model\.vision_model\." + SIGLIP],
    "projector": [r"model\.connector\."],
    "llm": [r"model\.text_model\.(embed_tokens|layers|norm)\.", r"lm_head\."],
}
FIRST, TEXT_FIRST = "model.language_model.layers.0.", "model.text_model.layers.0."  # train_llm: first_layer
# model name -> (its groups, the name prefix of the LLM's first decoder layer)
QWEN_MODELS = ("qwen3-vl", "qwen3.5", "qwen3-vl-moe", "qwen2-vl", "qwen2.5-vl", "qwen3-vl+deepstack+untied")
GROUPS = {
    **{name: (QWEN, FIRST) for name in (*QWEN_MODELS, "qwen3-vl-moe+deepstack")},
    "internvl": (INTERNVL, FIRST),
    "llava_onevision": (LLAVA_ONEVISION, FIRST),
    "idefics3": (IDEFICS3, TEXT_FIRST),
    "smolvlm": (IDEFICS3, TEXT_FIRST),
}
PARTS = ("vision", "projector", "llm")
# (train_vision, train_projector, train_llm) -> the parts (or "first_layer") that train
FLAGS = {
    (True, False, "none"): {"vision"},
    (False, True, "none"): {"projector"},
    (False, False, "all"): {"llm"},
    (False, False, "first_layer"): {"first_layer"},
    (False, False, "none"): set(),
}


def _qwen2(kind: str):
    """A tiny Qwen2-VL / Qwen2.5-VL built from its config (their published layout at toy size)."""
    import transformers

    text = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    text.update(num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})
    if kind == "qwen2.5-vl":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
        vision.update(fullatt_block_indexes=[0], window_size=112)
        config_class = transformers.Qwen2_5_VLConfig
    else:
        vision = dict(depth=1, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=2)
        config_class = transformers.Qwen2VLConfig
    ids = dict(image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)
    return transformers.AutoModelForImageTextToText.from_config(
        config_class(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    )


def _deepstack(family: str, untied: bool = False):
    """The tiny ``family`` model with one DeepStack merger (as the released Qwen3-VL models), optionally
    with an LM head of its own."""
    from transformers import AutoModelForImageTextToText

    config = copy.deepcopy(build_tiny(TinyConfig(family=family, vocab_size=600))[0].config)
    config.vision_config.deepstack_visual_indexes = [0]
    if untied:
        config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    return AutoModelForImageTextToText.from_config(config)


def _build(name: str):
    torch.manual_seed(0)
    if name in TINY_FAMILIES:
        return build_tiny(TinyConfig(family=name, vocab_size=600))[0]
    if name.startswith("qwen2"):
        return _qwen2(name)
    return _deepstack(name.split("+")[0], untied="untied" in name)


@pytest.fixture(scope="module", params=list(GROUPS))
def model(request):
    return request.param, _build(request.param)


def expected_group(name: str, groups: dict[str, list[str]]) -> str:
    """The one group whose patterns match the parameter ``name``."""
    hits = [g for g, patterns in groups.items() if any(re.match(p, name) for p in patterns)]
    assert len(hits) == 1, f"{name}: in groups {hits}; expected exactly one"
    return hits[0]


def expected_counts(named: list[tuple[str, torch.nn.Parameter]], group: dict[str, str]) -> dict[str, int]:
    counts = {f"{part}_{kind}": 0 for part in (*PARTS, "heads", "other") for kind in ("trainable", "total")}
    seen: set[int] = set()
    for n, p in named:
        if id(p) not in seen:
            seen.add(id(p))
            counts[f"{group[n]}_total"] += p.numel()
            counts[f"{group[n]}_trainable"] += p.numel() if p.requires_grad else 0
    return counts


def test_models_carry_the_parts_they_are_tested_for(model):
    """The variants hold what their names promise (DeepStack mergers, an untied head, image_newline)."""
    name, m = model
    names = {n for n, _ in m.named_parameters(remove_duplicate=False)}
    assert any(".deepstack_merger_list.0." in n for n in names) == ("deepstack" in name)
    assert (m.lm_head.weight is m.get_input_embeddings().weight) == ("untied" not in name)
    assert ("model.image_newline" in names) == (name == "llava_onevision")


def test_every_parameter_is_in_the_part_users_expect(model):
    name, m = model
    groups, _ = GROUPS[name]
    part_of = {id(p): part for part, params in part_parameters(m).items() for p in params}
    got = {n: part_of.get(id(p), "no part") for n, p in m.named_parameters(remove_duplicate=False)}
    assert got == {n: expected_group(n, groups) for n in got}


@pytest.mark.parametrize("flags", list(FLAGS), ids=["vision", "projector", "llm_all", "llm_first_layer", "none"])
def test_each_flag_trains_exactly_its_part(model, flags):
    name, m = model
    groups, first_layer = GROUPS[name]
    named = list(m.named_parameters(remove_duplicate=False))  # tied weights under both names
    group = {n: expected_group(n, groups) for n, _ in named}
    on = FLAGS[flags]
    want = {n for n in group if group[n] in on or ("first_layer" in on and n.startswith(first_layer))}

    counts = set_trainable(m, *flags)

    assert {n for n, p in named if p.requires_grad} == want
    assert counts == trainable_counts(m) == expected_counts(named, group)


class _HeadObjective(Objective):
    """An objective that owns a trainable head (as ASVR's), attached by the Trainer's own code."""

    def setup(self, model, config):
        self.head = torch.nn.Linear(model.config.get_text_config().hidden_size, 3)

    def modules(self):
        return {"head": self.head}


def test_objective_heads_are_a_part_of_their_own_and_stay_trainable():
    from dvsft.training.trainer import attach_objectives

    m = _build("qwen3-vl")
    set_trainable(m, False, True, "none")
    attach_objectives(m, [_HeadObjective()], None)
    size = sum(p.numel() for p in m.dvsft_heads.parameters())
    counts = set_trainable(m, False, False, "first_layer")
    assert counts["heads_trainable"] == counts["heads_total"] == size == 64 * 3 + 3
    assert counts["projector_trainable"] == counts["other_total"] == 0
    assert counts["llm_trainable"] == sum(p.numel() for p in m.model.language_model.layers[0].parameters())


def test_a_parameter_outside_every_part_is_counted_frozen_and_named(caplog):
    """A family module that misses a parameter: the flags cannot reach it, and the run says so."""
    m = _build("qwen3-vl")
    m.model.stray = torch.nn.Parameter(torch.zeros(5))
    with caplog.at_level("WARNING", logger="dvsft.training.model_setup"):
        counts = set_trainable(m, True, True, "all")
    assert not m.model.stray.requires_grad
    assert counts["other_total"] == 5 and counts["other_trainable"] == 0
    assert "1 parameters belong to no part" in caplog.text and "model.stray" in caplog.text
