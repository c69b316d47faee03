"""The objectives a training ``method`` can name, and building them from a config.

An explicit table (:data:`BUILT_IN`) of the objectives dvsft ships, imported here by name: ``sft`` and
``dvsft`` (:mod:`dvsft.objectives.base`), ``basic`` (:mod:`dvsft.objectives.basic`), ``asvr``
(:mod:`dvsft.objectives.asvr`) and ``lsd`` (:mod:`dvsft.objectives.lsd`). The objective modules import only the
base classes of :mod:`dvsft.objectives.base`, never this module, so the imports run one way:
trainer -> registry -> objective modules -> base. Objectives of your own join with
:func:`dvsft.objectives.base.register_objective`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from dvsft.objectives.asvr import ASVRObjective
from dvsft.objectives.base import (
    DVSFTObjective,
    Objective,
    SFTObjective,
    register_objective,
    registered_objectives,
)
from dvsft.objectives.basic import BasicObjective
from dvsft.objectives.lsd import LSDObjective

BUILT_IN: dict[str, type[Objective]] = {
    "sft": SFTObjective,
    "dvsft": DVSFTObjective,
    "basic": BasicObjective,
    "asvr": ASVRObjective,
    "lsd": LSDObjective,
}
for _name, _cls in BUILT_IN.items():
    register_objective(_name, _cls)


def objective_class(name: str) -> type[Objective]:
    registry = registered_objectives()
    if name not in registry:
        raise ValueError(f"unknown objective {name!r}; registered: {', '.join(sorted(registry))}")
    return registry[name]


def method_names(method: str) -> list[str]:
    """Objective names of ``method`` with their requirements, each once, requirements first.

    A requirement is met by the objective of the method that ``provides`` it, if any (``basic+dvsft``:
    ``dvsft`` computes the text loss ``basic`` requires, so ``sft`` is not added); two objectives of the
    method that provide the same one (``sft+dvsft``) are an error, not a silent choice.
    """
    parts = [p.strip() for p in str(method).split("+")]
    if not all(parts):
        raise ValueError(f"invalid method {method!r}: objective names joined by '+', e.g. 'dvsft+asvr'")
    provider = {name: part for part in reversed(parts) for name in (part, *objective_class(part).provides)}
    out: list[str] = []

    def add(name: str, chain: tuple[str, ...]) -> None:
        if name in chain:
            raise ValueError(f"objective {name!r} requires itself: {' -> '.join((*chain, name))}")
        cls = objective_class(name)
        for req in cls.requires:
            add(provider.get(req, req), (*chain, name))
        if name not in out:
            out.append(name)

    for part in parts:
        add(part, ())
    computed: dict[str, str] = {}
    for name in out:
        for what in (name, *objective_class(name).provides):
            other = computed.setdefault(what, name)
            if other != name:
                hint = " (sft is dvsft with vision_lambda 0)" if what == "sft" else ""
                raise ValueError(
                    f"invalid method {method!r}: {other!r} and {name!r} both compute {what!r}{hint}; name one of them"
                )
    return out


def options_for(cls: type[Objective], values: dict[str, Any] | None) -> Any:
    """The objective's Options dataclass filled from its config section; unknown keys are an error."""
    values = dict(values or {})
    valid = {f.name for f in fields(cls.Options)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for objective {cls.name!r}; "
            f"valid: {', '.join(sorted(valid)) or '(none)'}"
        )
    return cls.Options(**values)


def build_objectives(method: str, config: Any = None) -> list[Objective]:
    """Instantiate the objectives of ``method``; options come from ``config.objectives[name]``."""
    sections = dict(getattr(config, "objectives", None) or {})
    names = method_names(method)
    extra = sorted(set(sections) - set(registered_objectives()))
    if extra:
        raise ValueError(
            f"config section objectives.{extra[0]}: no such objective; registered: {sorted(registered_objectives())}"
        )
    return [objective_class(n)(config, options_for(objective_class(n), sections.get(n))) for n in names]
