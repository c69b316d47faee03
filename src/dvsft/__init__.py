"""dvsft: direct vision supervision for multimodal LLMs.

The library API, imported lazily (``import dvsft`` stays light)::

    from dvsft import DVSFTConfig, DVSFTTrainer, VisionCollator, dvsft_loss, load_records
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "DVSFTConfig": "dvsft.training.config",
    "DVSFTTrainer": "dvsft.training.trainer",
    "VisionCollator": "dvsft.data.collator",
    "dvsft_loss": "dvsft.objectives.losses",
    "model_loss": "dvsft.objectives.losses",
    "step_tokens": "dvsft.objectives.losses",
    "StepTokens": "dvsft.objectives.losses",
    "load_records": "dvsft.data.dataset",
    "load_config": "dvsft.training.config",
}

__all__ = [
    "DVSFTConfig",
    "DVSFTTrainer",
    "StepTokens",
    "VisionCollator",
    "__version__",
    "dvsft_loss",
    "load_config",
    "load_records",
    "model_loss",
    "step_tokens",
]

if TYPE_CHECKING:
    from dvsft.data.collator import VisionCollator
    from dvsft.data.dataset import load_records
    from dvsft.objectives.losses import StepTokens, dvsft_loss, model_loss, step_tokens
    from dvsft.training.config import DVSFTConfig, load_config
    from dvsft.training.trainer import DVSFTTrainer


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dvsft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
