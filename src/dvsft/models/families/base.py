"""What a model family tells dvsft: processor facts, views, model parts, LoRA targets.

Adding a family is one module that builds a :class:`FamilySpec` and registers it
(:func:`dvsft.models.families.register`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvsft.models.geometry import GridRule, Layout

# The linear layers of a Qwen2 / Qwen3 / Llama decoder layer: LoRA's default targets.
DENSE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def base_model(model: Any) -> Any:
    """The HF ``...ForConditionalGeneration`` inside PEFT / DDP / DeepSpeed / FSDP wrappers.

    For reading parts and config only: the forward always goes through the wrapped model.
    """
    from transformers import PreTrainedModel

    for _ in range(8):
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            model = model.get_base_model()
        elif isinstance(model, PreTrainedModel):
            break
        elif hasattr(model, "module"):  # DDP / DeepSpeed (whose engine forwards lm_head but has its own config)
            model = model.module
        elif hasattr(model, "_fsdp_wrapped_module") and not hasattr(model, "lm_head"):
            model = model._fsdp_wrapped_module
        else:
            break
    return model


def attr_path(path: str) -> Callable[[Any], Any]:
    """An accessor for a dotted attribute path below the unwrapped ``...ForConditionalGeneration``."""

    def get(model: Any) -> Any:
        obj = base_model(model)
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise ValueError(f"{type(base_model(model)).__name__} has no `{path}`")
        return obj

    get.__name__ = f"get_{path.replace('.', '_')}"
    return get


@dataclass(frozen=True)
class FamilySpec:
    """One model family.

    ``layout(width, height, **settings)`` gives the view list; ``settings_from(processor)``
    reads the settings a loaded processor (or image processor) carries; ``defaults`` are the
    released checkpoints' settings. Model parts are accessors on the ``...ForConditionalGeneration``
    (PEFT / DDP wrappers are unwrapped): ``language_model`` (the decoder stack with ``.layers``),
    ``vision_tower``, ``projector``; the LM head is ``get_output_embeddings()`` for every family.
    ``projector_extras`` are the attribute paths of the projector's other parts (modules or parameters:
    Qwen3-VL's DeepStack mergers, LLaVA-OneVision's ``image_newline``); ``train_projector`` trains them too.
    ``lora_targets`` are the suffixes of the LLM's ``nn.Linear`` layers that LoRA wraps.
    ``grid`` is the resize rule of a family whose image is one grid of tokens (Qwen-VL; None for tiled families).
    ``box_format`` is how the family's checkpoints write a box in text, the coordinate format ``dvsft tasks
    --coords <family>`` writes (:class:`dvsft.sources.region_tasks.BoxCodec`): ``thousandths`` (``[x0, y0, x1, y1]``
    in 0..1000 of the image), ``tagged-thousandths`` (``<|box_start|>(x0,y0),(x1,y1)<|box_end|>``, 0..1000) or
    ``resized-pixels`` (``[x0, y0, x1, y1]`` in pixels of the smart-resized image); None where it has none.
    ``segment_positions``, ``prepare_packing`` and ``packing_refusal`` say how the family's model takes packed
    samples (:meth:`position_ids`, :mod:`dvsft.data.packing`).
    ``image_inputs`` are the processor outputs the model's forward needs besides ``input_ids`` /
    ``attention_mask``. ``dummy_options`` are the image processor's options that make the fewest views of an
    image (:meth:`dummy_image_inputs`).
    """

    name: str
    model_types: tuple[str, ...]
    image_processor: str
    processor: str
    image_token: str
    layout: Callable[..., Layout]
    settings_from: Callable[[Any], dict[str, Any]]
    image_inputs: tuple[str, ...]
    # the parts where HF's LLaVA-style models keep them
    language_model: Callable[[Any], Any] = attr_path("model.language_model")
    vision_tower: Callable[[Any], Any] = attr_path("model.vision_tower")
    projector: Callable[[Any], Any] = attr_path("model.multi_modal_projector")
    projector_extras: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = DENSE
    defaults: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    views: str = ""
    grid: GridRule | None = None
    dummy_options: dict[str, Any] = field(default_factory=dict)
    box_format: str | None = None
    # packing (dvsft.data.packing): one sample's position-id rule (None: 0 .. n-1), what a model needs to keep packed
    # samples apart beyond the position ids (run once on it), or why it cannot take packed samples at all
    segment_positions: Callable[[Any, dict[str, Any]], Any] | None = None
    prepare_packing: Callable[[Any], None] | None = None
    packing_refusal: str | None = None

    def position_ids(self, model: Any, inputs: dict[str, Any]) -> Any:
        """The position ids of one sample alone, ``[k, n]`` (k = 1 for 1-D positions; Qwen: 4, the text positions and
        M-RoPE's three): ``inputs`` are its ``input_ids`` ``[1, n]`` and, for Qwen, ``mm_token_type_ids`` and its
        image's ``image_grid_thw``. A packed row holds each sample's own (:mod:`dvsft.data.packing`)."""
        import torch

        if self.segment_positions is not None:
            return self.segment_positions(model, inputs)
        ids = inputs["input_ids"]
        return torch.arange(ids.shape[-1], device=ids.device)[None]

    def dummy_image_inputs(self, processor: Any) -> dict[str, Any]:
        """The vision inputs of the smallest image ``processor`` makes (a blank 8 x 8 picture, scaled up to the
        processor's minimum): what a batch without an image runs the vision tower on, so that a trainable tower
        still takes part in every step (:func:`dvsft.objectives.base.forward_hidden`)."""
        from PIL import Image

        image_processor = getattr(processor, "image_processor", processor)
        blank = Image.new("RGB", (8, 8), "white")
        out = image_processor(images=[blank], return_tensors="pt", **self.dummy_options)
        return {k: out[k] for k in self.image_inputs if k in out}

    def vision_features(self, model: Any, inputs: dict[str, Any], parts: Any = None) -> list[Any]:
        """The vision tower and projector run on ``inputs`` (the image processor's outputs) by the model's own
        ``get_image_features``: the features its forward puts into the sequence, the projector's output
        (``pooler_output``) and Qwen3-VL's DeepStack features (None where the family has none). ``parts``: a copy
        of :meth:`vision_parts` (a frozen tokenizer, an EMA teacher) that runs in place of the model's own."""
        base = base_model(model)
        with _swapped(base, parts):
            out = base.get_image_features(**inputs)
        return [out.pooler_output, getattr(out, "deepstack_features", None)]

    def vision_inputs(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        """The image inputs of a collated batch (or of the image processor's output) that the model's
        ``get_image_features`` takes (sequence inputs such as ``mm_token_type_ids`` left out)."""
        import inspect

        takes = inspect.signature(base_model(model).get_image_features).parameters
        return {k: batch[k] for k in self.image_inputs if k in batch and k in takes}

    def vision_parts(self, model: Any) -> Any:
        """The modules and parameters that make :meth:`vision_features`, as one ``nn.Module`` holding the model's
        own: the vision tower, the projector where it lies outside the tower, the ``projector_extras`` outside both,
        each under its attribute path below the ``...ForConditionalGeneration`` with ``/`` for ``.``
        (``model/visual``). A deep copy of it runs in the model's place with ``vision_features(..., parts=copy)``."""
        from torch import nn

        base = base_model(model)
        paths = {id(m): name for name, m in base.named_modules()}
        found = {paths[id(self.vision_tower(model))]: None, paths[id(self.projector(model))]: None}
        found.update(dict.fromkeys(self.projector_extras))
        holder, kept = nn.Module(), []
        for path in found:
            if any(path.startswith(k + ".") for k in kept):
                continue
            kept.append(path)
            part = attr_path(path)(model)
            if isinstance(part, nn.Parameter):
                holder.register_parameter(path.replace(".", "/"), part)
            else:
                holder.add_module(path.replace(".", "/"), part)
        return holder

    def image_token_id(self, processor: Any) -> int:
        """The id of the family's image placeholder token in ``processor``'s tokenizer."""
        tok = getattr(processor, "tokenizer", processor)
        pid = getattr(processor, "image_token_id", None)
        if isinstance(pid, int):
            return pid
        tid = tok.convert_tokens_to_ids(self.image_token)
        if tid is None or tid == getattr(tok, "unk_token_id", None):
            raise ValueError(f"the tokenizer has no {self.image_token!r} token, which {self.name} needs")
        return int(tid)


def processor_of(source: Any) -> Any:
    """``source``, or for a model directory its loaded processor (what a tiled family's ``settings_from`` reads)."""
    if isinstance(source, str | Path):
        from dvsft.models.loading import load_processor

        return load_processor(source)
    return source


@contextmanager
def _swapped(base: Any, parts: Any) -> Iterator[None]:
    """Inside it, the modules and parameters of ``parts`` (a copy of :meth:`FamilySpec.vision_parts`) stand in
    ``base`` at their paths; the model's own are put back on exit."""
    if parts is None:
        yield
        return
    saved = []
    for key, part in [*parts.named_children(), *parts.named_parameters(recurse=False)]:
        owner_path, _, leaf = key.replace("/", ".").rpartition(".")
        owner = base.get_submodule(owner_path)
        saved.append((owner, leaf, getattr(owner, leaf)))
        setattr(owner, leaf, part)
    try:
        yield
    finally:
        for owner, leaf, part in reversed(saved):
            setattr(owner, leaf, part)


def get_setting(source: Any, *names: str) -> Any:
    """The first of ``names`` found as an attribute or mapping key of ``source``."""
    for n in names:
        v = source.get(n) if isinstance(source, dict) else getattr(source, n, None)
        if v is not None:
            return v
    return None


def size_dict(size: Any) -> dict[str, Any]:
    """A processor's ``size`` (dict or SizeDict) as a plain dict of its set keys."""
    if size is None:
        return {}
    if isinstance(size, dict):
        return {k: v for k, v in size.items() if v is not None}
    keys = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")
    return {k: getattr(size, k) for k in keys if getattr(size, k, None) is not None}
