"""Sequence packing: several samples, each with its image, in one sequence of at most ``max_length`` tokens.

The plan (:func:`best_fit_decreasing`) bins the samples by the token counts the collator measured when it checked
them at load (:func:`dvsft.data.dataset.check_samples`); :class:`PackedSamples` is the training dataset of those
bins. :class:`PackingCollator` collates a bin's samples with the run's own
:class:`~dvsft.data.collator.VisionCollator` (so every input, label and vision label is what the unpacked batch
holds) and lays the padded rows end to end (:func:`pack_batch`):

* ``input_ids``, ``labels``, ``mm_token_type_ids``, ``attention_mask`` are the samples' unpadded rows side by side,
  one packed row per bin (rows padded on the right to the longest bin); the first label of every sample is -100
  (in its own sequence nothing predicts it);
* ``vision_positions`` move to the packed row and the sample's offset in it; the vision targets, label sets and
  weights, and the pixel inputs keep their order (the samples are collated in packed order);
* ``packed_lengths`` ``[rows, samples]`` (0 padded): the samples' lengths in each row, in order.

The model gets no ``attention_mask`` but per-sample ``position_ids`` (:func:`packed_position_ids`: the family's own
rule per sample, :meth:`dvsft.models.families.FamilySpec.position_ids`, e.g. Qwen's M-RoPE ``get_rope_index``), from
which transformers builds a mask that keeps attention inside each sample. A family whose model cannot keep packed
samples apart names the reason in :attr:`FamilySpec.packing_refusal`; :func:`packing_problem` reads it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import torch

PACKED = "packed_lengths"  # [rows, samples]: the lengths of the samples laid end to end in each packed row
# the per-token inputs of a collated batch and their padding value (input_ids: the collator's pad token)
TOKEN_KEYS = {"input_ids": None, "attention_mask": 0, "labels": -100, "mm_token_type_ids": 0}


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sample indices in bins of at most ``capacity`` tokens: the longest sample first, each into the fullest bin it
    fits (a new bin where none has room). Bins are in the order they were opened, their samples in index order.
    The bins' free room is kept sorted, so a plan takes O(n log n) comparisons."""
    rooms: list[tuple[int, int]] = []  # (free room, bin), sorted: the fullest bin that fits is the first >= n
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i)):
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the packed length {capacity}")
        at = bisect.bisect_left(rooms, (n, -1))
        if at < len(rooms):
            room, b = rooms.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(rooms, (room - n, b))
    return [sorted(b) for b in bins]


class PackedSamples(torch.utils.data.Dataset):
    """Training samples packed into bins of at most ``capacity`` tokens; item ``i`` is the list of bin ``i``'s
    samples (what :class:`PackingCollator` takes). ``lengths``: each sample's token count."""

    def __init__(self, samples: Sequence[dict[str, Any]], lengths: Sequence[int], capacity: int):
        if len(samples) != len(lengths):
            raise ValueError(f"{len(samples)} samples but {len(lengths)} lengths")
        self.samples, self.lengths, self.capacity = list(samples), [int(n) for n in lengths], int(capacity)
        self.bins = best_fit_decreasing(self.lengths, self.capacity)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        return [self.samples[j] for j in self.bins[i]]

    def fill(self) -> float:
        """The share of the bins' tokens that samples fill (1.0: no room left in any bin)."""
        return sum(self.lengths) / max(len(self.bins) * self.capacity, 1)


class PackingCollator:
    """``bins -> packed batch`` with the run's ``collator`` (see the module docstring); a list of samples (not of
    bins: evaluation) is collated unpacked. Other attributes are the wrapped collator's."""

    def __init__(self, collator: Any):
        self.collator = collator

    def __getattr__(self, name: str) -> Any:
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        if not items or not isinstance(items[0], list):
            return self.collator(items)
        batch = self.collator([sample for bin_ in items for sample in bin_])
        return pack_batch(batch, [len(bin_) for bin_ in items], self.collator.pad_token_id)


def pack_batch(batch: dict[str, Any], sizes: Sequence[int], pad_token_id: int) -> dict[str, Any]:
    """A collated (right-padded) batch with its samples laid end to end: the first ``sizes[0]`` samples in packed row
    0, the next ``sizes[1]`` in row 1, ...; every other key is kept as it is."""
    lengths = batch["attention_mask"].sum(-1).tolist()
    if sum(sizes) != len(lengths):
        raise ValueError(f"{len(lengths)} samples for bins of {sum(sizes)}")
    bounds = list(accumulate(sizes, initial=0))
    rows = [lengths[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]  # each packed row's sample lengths
    row_of = [r for r, row in enumerate(rows) for _ in row]
    offset_of = [o for row in rows for o in accumulate(row[:-1], initial=0)]
    width = max(sum(row) for row in rows)
    out = dict(batch)
    for key, pad in TOKEN_KEYS.items():
        if key in batch:
            out[key] = _pack_rows(batch[key], row_of, offset_of, lengths, width, pad_token_id if pad is None else pad)
    first = torch.tensor(offset_of, dtype=torch.long)
    out["labels"][torch.tensor(row_of, dtype=torch.long), first] = -100  # nothing before a sample predicts its start
    if batch.get("vision_positions") is not None and batch["vision_positions"].numel():
        pos = batch["vision_positions"]
        b = pos[:, 0]
        out["vision_positions"] = torch.stack([torch.tensor(row_of)[b], first[b] + pos[:, 1]], dim=1)
    packed = torch.zeros((len(rows), max(map(len, rows))), dtype=torch.long)
    for r, row in enumerate(rows):
        packed[r, : len(row)] = torch.tensor(row, dtype=torch.long)
    out[PACKED] = packed
    return out


def _pack_rows(
    values: torch.Tensor, row_of: list[int], offset_of: list[int], lengths: list[int], width: int, pad: int
) -> torch.Tensor:
    out = values.new_full((max(row_of) + 1, width), pad)
    for b, (r, o, n) in enumerate(zip(row_of, offset_of, lengths, strict=True)):
        out[r, o : o + n] = values[b, :n]
    return out


def segments(batch: dict[str, Any]) -> list[tuple[int, int, int]]:
    """``(row, start, length)`` of every sample of a packed batch, in packed order (the order of its images)."""
    found = []
    for r, row in enumerate(batch[PACKED].tolist()):
        start = 0
        for n in row:
            if n:
                found.append((r, start, n))
                start += n
    return found


def packed_position_ids(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The position ids of a packed batch, each sample's the family's own for it alone
    (:meth:`~dvsft.models.families.FamilySpec.position_ids`): ``[rows, L]``, or ``[k, rows, L]`` for a family with
    several rows (Qwen: the text positions, then M-RoPE's three). Padding after a row's samples counts on from 0."""
    from dvsft.models.families import spec_for_model
    from dvsft.models.families.base import base_model

    spec = spec_for_model(base_model(model))
    ids, types = batch["input_ids"], batch.get("mm_token_type_ids")
    grids = iter(batch["image_grid_thw"]) if batch.get("image_grid_thw") is not None else iter(())
    parts: list[tuple[int, int, torch.Tensor]] = []
    for r, start, n in segments(batch):
        inputs = {"input_ids": ids[r : r + 1, start : start + n]}
        if types is not None:  # Qwen: its image's grid where the sample has image tokens (type 1)
            inputs["mm_token_type_ids"] = types[r : r + 1, start : start + n]
            if bool((inputs["mm_token_type_ids"] == 1).any()):
                inputs["image_grid_thw"] = next(grids)[None]
        parts.append((r, start, spec.position_ids(model, inputs)))
    k = parts[0][2].shape[0]
    out = torch.arange(ids.shape[1], device=ids.device).expand(k, ids.shape[0], -1).clone()
    ends = batch[PACKED].sum(-1).tolist()
    for r, end in enumerate(ends):
        out[:, r, end:] -= end
    for r, start, pos in parts:
        out[:, r, start : start + pos.shape[1]] = pos.to(out.device)
    return out[0] if k == 1 else out


def packed_inputs(model: Any, batch: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """The model inputs of a packed batch: no ``attention_mask`` (transformers then reads the samples' boundaries
    from the position ids), the samples' own ``position_ids``; the family's model prepared for packed rows once."""
    from dvsft.models.families import spec_for_model
    from dvsft.models.families.base import base_model

    spec = spec_for_model(base_model(model))
    if spec.prepare_packing is not None:
        spec.prepare_packing(base_model(model))
    out = {k: v for k, v in inputs.items() if k != "attention_mask"}
    out["position_ids"] = packed_position_ids(model, batch)
    return out


def packing_problem(model: Any, objectives: Sequence[Any], rows: int = 1) -> str | None:
    """Why this run cannot pack (the family's model cannot keep packed samples apart; flash attention, which keeps
    them apart in a batch of one packed row only, with ``rows`` > 1; an objective that reads each sample by its batch
    row), or None."""
    from dvsft.models.families import spec_for_model
    from dvsft.models.families.base import base_model

    core = base_model(model)
    spec = spec_for_model(core)
    if spec.packing_refusal:
        return f"{spec.name} cannot pack samples: {spec.packing_refusal}"
    attention = str(getattr(core.config, "_attn_implementation", "") or "")
    if attention.startswith("flash") and rows > 1:
        return f"{attention} keeps packed samples apart in a batch of one packed row: set per_device_train_batch_size 1"
    rows = [o.name for o in objectives if getattr(o, "needs_records", False)]
    if rows:
        return f"a packed row holds several samples, and {', '.join(rows)} reads each sample's image by its row"
    return None
