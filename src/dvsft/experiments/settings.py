"""The experiments' typed presets, read from the YAML files in ``presets/`` (packaged with dvsft).

``presets/demo.yaml`` holds the :class:`DemoPreset` sizes of `dvsft demo` (and the page, model and
optimizer settings `dvsft compare` starts from); ``presets/compare.yaml`` the :class:`ComparePreset`
sizes of `dvsft compare`; ``presets/scenes.yaml`` the :class:`ScenePreset` sizes of `dvsft demo --task scenes`.
Each file maps a preset name to its fields (``tiny:`` holds the
:class:`~dvsft.testing.tiny.TinyConfig` fields); a field left out keeps the dataclass default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from dvsft.core.typed import typed
from dvsft.testing.tiny import TinyConfig

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_METHODS = ("sft", "dvsft", "basic", "asvr", "regions", "dvsft+regions", "dvsft+lsd", "finevit-staged")


@dataclass(frozen=True)
class DemoPreset:
    """Sizes of one demo run; ``cpu`` is the default, ``toy`` is for tests, ``gpu`` for a lent GPU."""

    name: str
    vocab_words: int  # documents use only the corpus's most frequent words
    cols: int  # page width in visual-token cells (32 px each for qwen3-vl)
    rows: int  # page height in cells
    font_size: int
    train_pages: int
    heldout_pages: int
    steps: int
    batch_size: int
    learning_rate: float
    vision_lambda: float
    vision_eps: float
    eval_points: int  # evaluations during training, evenly spaced, plus step 0
    seeds: int
    noncontextual: float = 0.0  # share of training pages that are random words
    words_per_row: int = 0  # at most this many words on a row (1: a word list); 0 = fill the rows
    text_steps: int = 0  # text stage: steps of the LLM on oracle pages before the graft (0: none)
    text_batch_size: int = 32
    text_learning_rate: float = 3e-3
    lr_scheduler: str = "cosine"  # of the vision-language runs (HF scheduler names)
    tiny: TinyConfig = field(default_factory=TinyConfig)
    device: str = "cpu"
    label_policy: str = "bottom-right"  # DV-SFT's label policy (the training config's align_label_policy)
    multi_label: bool = False  # a cell several words or regions claim keeps all their labels
    family_learning_rate: dict[str, float] = field(default_factory=dict)  # a family's own rate (unless --set)


@dataclass(frozen=True, kw_only=True)
class ScenePreset(DemoPreset):
    """Sizes of one `dvsft demo --task scenes` run (``presets/scenes.yaml``): ``cols x rows`` cells per scene,
    ``train_pages`` / ``heldout_pages`` scenes; see :class:`dvsft.sources.scenes.SceneSpec` for the rest."""

    vocab_words: int = 0  # unused: scenes have their own vocabulary
    font_size: int = 0  # unused
    label_policy: str = "fill"
    area_rows: int = 2  # named areas (top left, ...) per scene
    area_cols: int = 2
    min_objects: int = 2
    max_objects: int = 3
    scene_labels: str = "shape"  # region labels: shape, or colour+shape (two regions: needs multi_label)


@dataclass(frozen=True)
class ComparePreset:
    """Sizes of one `dvsft compare` run; page, model and optimizer settings come from a demo preset."""

    name: str
    demo: str  # the demo preset whose page size, vocabulary, tiny model, lr and lambda are used
    train_pages: int
    heldout_pages: int
    steps: int
    batch_size: int
    seeds: int
    region_share: float = 0.25  # share of region QA in the "mix" training sets
    asvr_k: int = 64
    asvr_fit_images: int = 400
    lsd_regions: int = 2
    methods: tuple[str, ...] = DEFAULT_METHODS
    cols: int = 0  # page size in cells (0: the demo preset's)
    rows: int = 0
    learning_rate: float = 0.0  # 0: the demo preset's
    lr_scheduler: str = ""  # "": the demo preset's


def page_pixels(preset: DemoPreset) -> int:
    """Pixels of one page (32 x 32 per visual-token cell)."""
    return preset.cols * preset.rows * 32 * 32


T = TypeVar("T")


def load_presets(kind: str, cls: type[T]) -> dict[str, T]:
    """The presets of ``presets/{kind}.yaml`` by name, in file order."""
    import yaml

    path = PRESETS_DIR / f"{kind}.yaml"
    tree = yaml.safe_load(path.read_text())
    return {name: typed(cls, {"name": name, **values}, f"{path.name}: {name}") for name, values in tree.items()}


DEMO_PRESETS: dict[str, DemoPreset] = load_presets("demo", DemoPreset)
SCENE_PRESETS: dict[str, ScenePreset] = load_presets("scenes", ScenePreset)
COMPARE_PRESETS: dict[str, ComparePreset] = load_presets("compare", ComparePreset)
