"""The family registry: one module per model family (processor facts, views, model parts, LoRA targets).

>>> from dvsft.models.families import family_spec
>>> family_spec("internvl").layout(1000, 500).views[0].kind
'tile'
"""

from __future__ import annotations

from typing import Any

from dvsft.models.families.base import FamilySpec

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
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def spec_for_model(model: Any) -> FamilySpec:
    """The family of a loaded HF model (by its ``config.model_type``)."""
    from dvsft.models.families.base import base_model

    mt = getattr(getattr(base_model(model), "config", None), "model_type", None)
    return family_spec(mt or type(model).__name__)


def spec_for_processor(processor: Any) -> FamilySpec:
    """The family of a loaded processor or image processor (by class name; a bare Qwen image
    processor by its patch size: 16 -> ``qwen3-vl``, else ``qwen2.5-vl``)."""
    name = type(processor).__name__
    for spec in _REGISTRY.values():
        if name == spec.processor:
            return spec
    ip = getattr(processor, "image_processor", processor)
    ip_name = type(ip).__name__
    if ip_name.startswith("Qwen2VLImageProcessor"):
        return family_spec("qwen3-vl" if getattr(ip, "patch_size", None) == 16 else "qwen2.5-vl")
    for spec in _REGISTRY.values():
        if ip_name in (spec.image_processor, spec.image_processor.removesuffix("Pil")):
            return spec
    raise ValueError(f"no registered family uses a {name} / {ip_name}; known: {', '.join(_REGISTRY)}")


def _register_builtin() -> None:
    from dvsft.models.families import idefics3, internvl, llava_onevision, qwen

    for spec in [*qwen.SPECS, internvl.SPEC, llava_onevision.SPEC, *idefics3.SPECS]:
        register(spec)


_register_builtin()

__all__ = ["FamilySpec", "families", "family_spec", "register", "spec_for_model", "spec_for_processor"]
