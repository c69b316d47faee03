"""The family registry: one module per model family (processor facts, views, model parts, LoRA targets).

Everything dvsft knows about a model family is its module's :class:`FamilySpec`; adding a family is one
module that builds a spec and registers it. A family is found by name, HF ``model_type`` or alias
(:func:`family_spec`), from a loaded model, processor or model directory (:func:`spec_for_model`,
:func:`spec_for_processor`, :func:`spec_for_model_dir`), or from any of those with the settings it carries
(:func:`family_source`). A model no registered family knows is a ``ValueError`` naming the families.

>>> from dvsft.models.families import family_spec
>>> family_spec("internvl").layout(1000, 500).views[0].kind
'tile'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvsft.models.families.base import FamilySpec
from dvsft.models.geometry import Layout

# The family a command or library call uses where neither a model nor ``--family`` names one (dvsft render /
# align / ocr-set, the SQuAD pages of a tiled model, the tiny model): the paper's model. Every default names it.
DEFAULT_FAMILY = "qwen3-vl"

_REGISTRY: dict[str, FamilySpec] = {}
_NAMES: dict[str, str] = {}


def register(spec: FamilySpec) -> FamilySpec:
    """Add a family; its name, model types and aliases all find it."""
    for key in (spec.name, *spec.model_types, *spec.aliases):
        k = key.lower()
        if _NAMES.get(k, spec.name) != spec.name:
            raise ValueError(f"family name {key!r} is taken by {_NAMES[k]}")
        _NAMES[k] = spec.name
    _REGISTRY[spec.name] = spec
    return spec


def families() -> list[str]:
    """Registered family names."""
    return list(_REGISTRY)


def family_spec(name: str) -> FamilySpec:
    """A family by name, HF ``model_type`` or alias."""
    key = _NAMES.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown model family {name!r}; {_known()}")
    return _REGISTRY[key]


def _known() -> str:
    return f"known: {', '.join(_REGISTRY)}"


def spec_for_model(model: Any) -> FamilySpec:
    """The family of a loaded HF model (by its ``config.model_type``)."""
    from dvsft.models.families.base import base_model

    mt = getattr(getattr(base_model(model), "config", None), "model_type", None)
    return family_spec(mt or type(model).__name__)


def spec_for_model_dir(model_dir: str | Path) -> FamilySpec:
    """The family of a local model directory (its ``config.json``'s ``model_type``; in a folder of the image
    processor's files alone, the image processor its ``preprocessor_config.json`` names); a ``ValueError`` naming
    the supported families for a model type no family module knows."""
    from dvsft.models.loading import model_type_of

    preprocessor = Path(model_dir) / "preprocessor_config.json"
    if not (Path(model_dir) / "config.json").is_file() and preprocessor.is_file():
        cfg = json.loads(preprocessor.read_text())
        found = _spec_for_image_processor(str(cfg.get("image_processor_type")), cfg.get("patch_size"))
        if found is None:
            raise ValueError(f"{model_dir}: no supported family uses its {cfg.get('image_processor_type')}; {_known()}")
        return found
    model_type = model_type_of(model_dir)
    try:
        return family_spec(model_type)
    except ValueError:
        raise ValueError(
            f"{model_dir}: model type {model_type!r} belongs to no supported family; supported: {', '.join(_REGISTRY)}"
        ) from None


def spec_for_processor(processor: Any) -> FamilySpec:
    """The family of a loaded processor or image processor (by class name)."""
    name = type(processor).__name__
    for spec in _REGISTRY.values():
        if name == spec.processor:
            return spec
    ip = getattr(processor, "image_processor", processor)
    found = _spec_for_image_processor(type(ip).__name__, getattr(ip, "patch_size", None))
    if found is None:
        raise ValueError(f"no registered family uses a {name} / {type(ip).__name__}; {_known()}")
    return found


def _spec_for_image_processor(name: str, patch_size: Any) -> FamilySpec | None:
    """The family of an image processor class (a bare Qwen image processor by its patch size: 16 -> ``qwen3-vl``,
    else ``qwen2.5-vl``), or None."""
    if name.startswith("Qwen2VLImageProcessor"):
        return family_spec("qwen3-vl" if patch_size == 16 else "qwen2.5-vl")
    for spec in _REGISTRY.values():
        if name in (spec.image_processor, spec.image_processor.removesuffix("Pil")):
            return spec
    return None


@dataclass(frozen=True)
class FamilySource:
    """A family with the settings of one model directory or processor (none for a family name: its defaults)."""

    spec: FamilySpec
    settings: dict[str, Any] = field(default_factory=dict)

    def layout(self, width: int, height: int, **settings: Any) -> Layout:
        """The family's view list of a ``width`` x ``height`` image; ``settings`` override the source's."""
        return self.spec.layout(int(width), int(height), **{**self.settings, **settings})


def family_source(source: Any) -> FamilySource:
    """The family of ``source`` with the settings it carries, read once: a family name, HF ``model_type`` or alias
    (the family's defaults), a local model directory, a loaded processor or image processor, a
    :class:`FamilySpec` or a :class:`FamilySource`. ``ValueError`` names the supported families."""
    if isinstance(source, FamilySource):
        return source
    if isinstance(source, FamilySpec):
        return FamilySource(source)
    if isinstance(source, str) and source.lower() in _NAMES:
        return FamilySource(family_spec(source))
    if isinstance(source, str | Path):
        if not Path(source).is_dir():
            raise ValueError(f"{str(source)!r} is neither a known model family nor a model directory; {_known()}")
        spec = spec_for_model_dir(source)
        return FamilySource(spec, spec.settings_from(source))
    spec = spec_for_processor(source)
    return FamilySource(spec, spec.settings_from(source))


def _register_builtin() -> None:
    from dvsft.models.families import idefics3, internvl, llava_onevision, qwen

    for spec in [*qwen.SPECS, internvl.SPEC, llava_onevision.SPEC, *idefics3.SPECS]:
        register(spec)


_register_builtin()

__all__ = [
    "DEFAULT_FAMILY",
    "FamilySource",
    "FamilySpec",
    "families",
    "family_source",
    "family_spec",
    "register",
    "spec_for_model",
    "spec_for_model_dir",
    "spec_for_processor",
]
