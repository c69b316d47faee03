"""Training objectives: named loss terms the Trainer computes from one forward pass and sums.

Every objective and the public loss (:func:`dvsft.objectives.losses.model_loss`) read the model
through ONE forward, :func:`forward_hidden`: the (DDP / FSDP / DeepSpeed / PEFT wrapped) model's own
forward with ``output_hidden_states=True`` and ``logits_to_keep=1``, so gradient synchronisation and
parameter gathering work as for any forward; the LM head is applied afterwards, in the chunked
losses, through the head module's own call (which gathers a sharded head, see
:func:`dvsft.objectives.losses.through_head`).

An :class:`Objective` reads the batch and the model's hidden states and returns named terms
(``{"vision_loss": ..., "vision_acc": ...}``); :meth:`Objective.weights` says which terms enter
the total loss and with what weight (the others are only logged). ``method`` in the training
config names objectives joined by ``+`` (``"dvsft+asvr"``); each objective pulls in the ones it
``requires`` (the auxiliary ones require ``sft``, the text loss), unless an objective of the method
``provides`` it (``dvsft``: the text loss plus lambda times the vision loss; ``sft`` is its
lambda = 0 case), and each name is used once, so the text loss is counted once.

Objectives may own trainable heads (:meth:`Objective.modules`): the Trainer attaches them to the
model under ``dvsft_heads`` so they are moved to the device, wrapped by DDP/DeepSpeed/FSDP,
optimised and checkpointed for ``--resume``; they are removed before the final model is saved.

The objectives a ``method`` may name are listed in :mod:`dvsft.objectives.registry` (the built-in ones:
``sft`` and ``dvsft`` here, ``basic``, ``asvr``, ``lsd``), which also resolves and builds them. Register
your own with ``register_objective("name", cls)``; options specific to it go in the config section
``objectives.<name>`` and are validated against ``cls.Options`` (a dataclass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from dvsft.models.families.base import FamilySpec, base_model

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dvsft.objectives.losses import LossSettings

HEADS_ATTR = "dvsft_heads"  # attribute of the model that holds the objectives' trainable heads


@dataclass
class HiddenStates:
    """What one forward pass of the multimodal LLM gives the objectives.

    ``last`` is the final hidden state after the last norm (what ``lm_head`` reads), ``[B, L, D]``.
    ``layers`` (only when an objective ``needs_hidden_states``) follows the HF convention:
    ``layers[0]`` is the LLM's input embeddings (the projector's output at image positions),
    ``layers[i]`` the output of decoder layer ``i``, ``layers[-1] == last``.
    ``image_mask`` ``[B, L]`` marks the image placeholder (visual token) positions.
    ``tokens`` (training only): the labeled tokens of the whole optimizer step
    (:class:`dvsft.objectives.losses.StepTokens`); token-normalised losses divide by them.
    """

    last: torch.Tensor
    image_mask: torch.Tensor
    layers: tuple[torch.Tensor, ...] | None = None
    tokens: Any = None


# Collator keys that are labels or metadata, not model inputs.
NOT_MODEL_INPUTS = frozenset(
    {
        "labels",
        "vision_positions",
        "vision_targets",
        "vision_label_sets",
        "vision_weights",
        "records",
        "sample_positions",
        "sample_ids",
        "packed_lengths",
    }
)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The tensors of a collated batch that the model's forward takes (labels and vision labels left out)."""
    import torch

    return {
        k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS and isinstance(v, torch.Tensor) and v is not None
    }


def forward_hidden(model: nn.Module, batch: dict[str, Any], layers: bool = False) -> HiddenStates:
    """The one forward of DV-SFT: the model as given (wrappers included), hidden states out.

    The LM head runs on one position only (``logits_to_keep=1``); the losses project the rows they
    need. ``hidden_states[-1]`` is the final hidden state after the last norm (what ``lm_head`` reads).
    A training batch without an image whose model trains a vision parameter runs the dummy vision pass
    (:func:`dummy_vision_pass`). A packed batch (:mod:`dvsft.data.packing`) runs with its samples' own position ids.
    """
    from dvsft.data.packing import PACKED, packed_inputs

    inputs = model_inputs(batch)
    if PACKED in batch:
        inputs = packed_inputs(model, batch, inputs)
    with dummy_vision_pass(model, batch):
        out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False, return_dict=True)
    states = tuple(out.hidden_states)
    mask = image_token_mask(model, batch["input_ids"])
    return HiddenStates(last=states[-1], image_mask=mask, layers=states if layers else None)


@contextmanager
def dummy_vision_pass(model: nn.Module, batch: dict[str, Any]) -> Iterator[None]:
    """Inside it, the model's call on a batch without ``pixel_values`` (the collator's ``dummy_image_inputs``
    instead) also runs the vision tower and projector on that dummy image, when gradients are on and a vision or
    projector parameter trains: a hook on the input embeddings adds ``0.0 * sum(features)`` to them. The loss is
    unchanged to the bit and every trainable vision parameter gets a zero gradient inside the wrapper's call, so
    DDP (with or without ``find_unused_parameters``), DeepSpeed and FSDP reduce the same parameters on every
    process: a process whose batch is text-only neither hangs the others nor skips the vision gradients' sync."""
    import torch

    from dvsft.data.collator import DUMMY_IMAGE

    dummy, core = batch.get(DUMMY_IMAGE), base_model(model)
    if dummy is None or "pixel_values" in batch or not torch.is_grad_enabled():
        yield
        return
    spec = family_of(core)
    if not any(p.requires_grad for p in spec.vision_parts(core).parameters()):
        yield
        return
    done: list[bool] = []

    def add_zero(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if done:  # the embeddings' first call is the model's input
            return None
        done.append(True)
        return output + 0.0 * _float_sum(spec.vision_features(core, dummy))

    handle = core.get_input_embeddings().register_forward_hook(add_zero)
    try:
        yield
    finally:
        handle.remove()


def _float_sum(value: Any) -> torch.Tensor:
    """The sum, in float32, of every floating-point tensor in ``value`` (a model output, tuple, list or dict)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.float().sum() if value.is_floating_point() else torch.zeros((), device=value.device)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else ()
    return sum((_float_sum(v) for v in items if v is not None), torch.zeros(()))


def processor_callback(receive: Callable[[Any], None]) -> Any:
    """A ``TrainerCallback`` that hands the run's processor (the Trainer's ``processing_class``; None without one)
    to ``receive`` when training begins: how an objective reads the model's own processor."""
    from transformers import TrainerCallback

    class ReceiveProcessor(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            receive(kwargs.get("processing_class"))

    return ReceiveProcessor()


@dataclass
class NoOptions:
    """Objectives without options."""


class Objective:
    """Base class: one named training objective (see the module docstring)."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()  # objectives included with this one (e.g. ("sft",))
    # requirements of other objectives that this one meets (DV-SFT computes the text loss of "sft")
    provides: ClassVar[tuple[str, ...]] = ()
    needs_hidden_states: ClassVar[bool] = False  # all layers (True) or the last one only
    needs_records: ClassVar[bool] = False  # batch["records"]: id, image, width, height, words of each sample
    # True: the weighted terms are already this micro-batch's share of the step loss (divided by
    # ``hidden.tokens``); False: they are micro-batch means, which the Trainer divides by the
    # number of accumulated micro-batches.
    step_normalized: ClassVar[bool] = False
    train_llm: ClassVar[str | None] = None  # default for `train.llm` ("all", "first_layer", "none") or None
    Options: ClassVar[type] = NoOptions  # dataclass of the `objectives.<name>` config section

    def __init__(self, config: Any = None, options: Any = None):
        self.config = config
        self.options = options if options is not None else self.Options()

    @property
    def needs_vision_labels(self) -> bool:
        """True: the collator aligns the words to visual tokens (``batch["vision_positions"]``, ...)."""
        return False

    def setup(self, model: nn.Module, config: Any) -> None:
        """Called once before training with the (unwrapped) model; may create heads."""

    def modules(self) -> dict[str, nn.Module]:
        """Trainable heads this objective owns, by name (not saved into the final model)."""
        return {}

    def weights(self) -> dict[str, float]:
        """Weight of each term added to the total loss; terms not listed are logged only."""
        return {}

    def callbacks(self) -> list[Any]:
        """``transformers.TrainerCallback`` instances the Trainer adds for this objective."""
        return []

    def loss(self, model: nn.Module, batch: dict[str, Any], hidden: HiddenStates) -> dict[str, torch.Tensor]:
        """Named loss terms (and metrics) for this batch. ``model`` is the unwrapped HF model: read its
        parts (``lm_head_of``), never call it (the forward already ran, see :func:`forward_hidden`)."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Objective]] = {}


def register_objective(name: str, cls: type[Objective]) -> type[Objective]:
    """Make ``cls`` available as ``method: name`` (or as part of ``a+b``); see :mod:`dvsft.objectives.registry`."""
    if not name or "+" in name:
        raise ValueError(f"invalid objective name {name!r}")
    cls.name = name
    _REGISTRY[name] = cls
    return cls


def registered_objectives() -> dict[str, type[Objective]]:
    """Every objective a method may name: the built-in ones and those registered since."""
    return dict(_REGISTRY)


# --------------------------------------------------------------------------- model helpers


def family_of(model: nn.Module) -> FamilySpec:
    """The family module of ``model`` (wrappers unwrapped), which owns its parts; a ``ValueError`` naming the
    supported families for a model type none knows."""
    from dvsft.models.families import spec_for_model

    return spec_for_model(base_model(model))


def lm_head_of(model: nn.Module) -> nn.Module:
    """The LM head: ``get_output_embeddings()`` for every family."""
    head = base_model(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base_model(model)).__name__} has no output embeddings (lm_head)")
    return head


def language_model_of(model: nn.Module) -> nn.Module:
    """The decoder stack (has ``.layers``, ``.norm``, ``.embed_tokens``): the family module's accessor."""
    return family_of(model).language_model(model)


def vision_tower_of(model: nn.Module) -> nn.Module:
    """The vision tower (Qwen-VL's holds the projector): the family module's accessor."""
    return family_of(model).vision_tower(model)


def projector_of(model: nn.Module) -> nn.Module:
    """The module that maps vision features to the LLM's hidden size (Qwen-VL: ``visual.merger``)."""
    return family_of(model).projector(model)


def image_token_mask(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]``: the positions of ``input_ids`` that hold the model's image placeholder (its visual tokens)."""
    config = base_model(model).config
    image_id = getattr(config, "image_token_id", None)
    if image_id is None:
        image_id = getattr(config, "image_token_index", None)
    return input_ids == image_id if image_id is not None else input_ids.new_zeros(input_ids.shape, dtype=bool)


# --------------------------------------------------------------------------- built-in objectives


class DVSFTObjective(Objective):
    """DV-SFT (paper Eq. 4): ``L_text + lambda * L_vision``, lambda = :attr:`vision_weight` (``vision_lambda``).

    ``L_text`` is the shifted next-token cross-entropy over the answer tokens (Eq. 1); in ``L_vision``
    every labeled visual token predicts its word on its own logits, with smoothing (Eqs. 2-3). SFT is
    the case lambda = 0 (:class:`SFTObjective`): the vision term is then skipped (no vision labels,
    no vision rows through the LM head) and the text loss runs alone (:func:`~dvsft.objectives.losses.text_loss`).
    Returns ``<name>_step_loss``, this micro-batch's share of the whole optimizer step's loss
    (text and vision rows in one chunked pass over the LM head), and the detached per-micro-batch
    ``text_loss`` / ``text_tokens`` (and with lambda > 0 ``vision_loss`` / ``vision_acc`` /
    ``vision_tokens``) for the logs.
    """

    provides = ("sft",)  # the text loss: meets the other objectives' requirement of it
    step_normalized = True

    @property
    def settings(self) -> LossSettings:
        """The config's ``vision_lambda``, ``vision_eps`` and ``loss_chunk_size`` (DVSFTConfig's defaults where
        the config lacks them: a plain ``TrainingArguments``)."""
        from dvsft.objectives.losses import LossSettings

        return LossSettings.of(self.config)

    @property
    def vision_weight(self) -> float:
        """lambda, the weight of ``L_vision``."""
        return float(self.settings.vision_lambda)

    @property
    def needs_vision_labels(self) -> bool:
        return self.vision_weight != 0

    def weights(self) -> dict[str, float]:
        return {f"{self.name}_step_loss": 1.0}

    def loss(self, model, batch, hidden):
        from dvsft.objectives.losses import dvsft_loss, text_loss

        settings = self.settings
        chunk = int(settings.loss_chunk_size)
        smoothing = float(getattr(self.config, "label_smoothing_factor", 0.0))  # TrainingArguments' key
        step_loss, head = f"{self.name}_step_loss", lm_head_of(model)
        new = hidden.last.new_tensor
        if self.vision_weight == 0:
            value, n = text_loss(
                hidden.last, head, batch["labels"], chunk, tokens=hidden.tokens, label_smoothing=smoothing
            )
            mean = value
            if hidden.tokens is not None:  # undo the step normalisation for the log: this batch's mean
                mean = value.detach() * hidden.tokens.text / max(n, 1) / hidden.tokens.processes
            return {step_loss: value, "text_loss": mean.detach(), "text_tokens": new(float(n))}
        out = dvsft_loss(
            hidden.last,
            head,
            batch["labels"],
            batch.get("vision_positions"),
            batch.get("vision_targets"),
            batch.get("vision_label_sets"),
            vision_weight=self.vision_weight,
            eps=float(settings.vision_eps),
            chunk_size=chunk,
            tokens=hidden.tokens,
            label_smoothing=smoothing,
            vision_weights=batch.get("vision_weights"),
        )
        return {
            step_loss: out.loss,
            "text_loss": out.text_loss.detach(),
            "text_tokens": new(float(out.n_text)),
            "vision_loss": out.vision_loss.detach(),
            "vision_acc": new(out.vision_accuracy),
            "vision_tokens": new(float(out.n_vision)),
        }


class SFTObjective(DVSFTObjective):
    """SFT (paper Eq. 1): DV-SFT with lambda = 0, the text loss alone, whatever ``vision_lambda`` says."""

    @property
    def vision_weight(self) -> float:
        return 0.0
