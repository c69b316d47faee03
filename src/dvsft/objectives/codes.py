"""ASVR targets: discrete semantic codes of every visual token, from the model's own visual features.

ASVR supervises each visual position with the code a semantic visual tokenizer gives it (paper:
DualToken VQ-SigLIP). With no such tokenizer here, the codebook is k-means (optionally residual, one
codebook per level) over the model's post-projector visual features (the model's own
``get_image_features(...).pooler_output`` through its family module, one vector per visual token, tiles and
newline slots included, in sequence order) on the training images: every family. Codes are cached per image
under the codebook directory, keyed by the image path, its mtime, the processor's resolution settings, the
model's vision fingerprint and the codebook id, so a second encode is a read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dvsft.objectives.base import family_of

CODEBOOK_FILE = "codebook.safetensors"
META_FILE = "codebook.json"


# ---------------------------------------------------------------- k-means


def _sq_dists(x, centroids):
    """Squared distances (N, K), float32 rows of x against centroids."""
    return (x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]


def _nearest(x, centroids, chunk: int = 65536):
    import torch

    idx, dist = [], []
    for s in range(0, x.shape[0], chunk):
        d = _sq_dists(x[s : s + chunk], centroids)
        m = d.min(1)
        idx.append(m.indices)
        dist.append(m.values.clamp_min(0))
    return torch.cat(idx), torch.cat(dist)


def kmeans(x, k: int, seed: int = 0, iters: int = 50):
    """Deterministic k-means (k-means++ init from a seeded generator, Lloyd steps); returns (centroids, codes)."""
    import torch

    n = x.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n < k:
        raise ValueError(f"k={k} exceeds the {n} feature vectors available; lower --k or add images")
    x = x.float()
    g = torch.Generator().manual_seed(seed)
    centroids = torch.empty(k, x.shape[1])
    first = int(torch.randint(n, (1,), generator=g))
    centroids[0] = x[first]
    closest = ((x - x[first]) ** 2).sum(1)
    for i in range(1, k):
        total = float(closest.sum())
        if total <= 0:  # fewer distinct points than k: repeat points
            pick = int(torch.randint(n, (1,), generator=g))
        else:
            pick = int(torch.multinomial(closest / total, 1, generator=g))
        centroids[i] = x[pick]
        closest = torch.minimum(closest, ((x - x[pick]) ** 2).sum(1))
    codes = None
    for _ in range(iters):
        new_codes, dist = _nearest(x, centroids)
        if codes is not None and torch.equal(new_codes, codes):
            break
        codes = new_codes
        sums = torch.zeros_like(centroids).index_add_(0, codes, x)
        counts = torch.bincount(codes, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].float(), centroids)
        if len(empty):  # re-seed empty clusters with the points worst served
            far = dist.argsort(descending=True)[: len(empty)]
            centroids[empty] = x[far]
    codes, _ = _nearest(x, centroids)
    return centroids, codes


@dataclass
class Codebook:
    """Residual codebooks: ``centroids[l]`` is (k, dim) for level l."""

    centroids: list[Any]  # torch tensors
    meta: dict[str, Any]

    @property
    def k(self) -> int:
        return int(self.centroids[0].shape[0])

    @property
    def levels(self) -> int:
        return len(self.centroids)

    @property
    def dim(self) -> int:
        return int(self.centroids[0].shape[1])

    @property
    def id(self) -> str:
        h = hashlib.sha256()
        for c in self.centroids:
            h.update(c.float().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def encode(self, features) -> Any:
        """Codes (N, levels) of feature rows (N, dim): nearest centroid of the residual at each level."""
        import torch

        if features.shape[-1] != self.dim:
            raise ValueError(f"features have dim {features.shape[-1]}, the codebook expects {self.dim}")
        residual = features.detach().float().cpu()
        out = []
        for c in self.centroids:
            idx, _ = _nearest(residual, c)
            out.append(idx)
            residual = residual - c[idx]
        return torch.stack(out, 1)

    def save(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({f"level{i}": c.contiguous() for i, c in enumerate(self.centroids)}, str(out / CODEBOOK_FILE))
        meta = {**self.meta, "k": self.k, "levels": self.levels, "dim": self.dim, "codebook_id": self.id}
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        return out

    @classmethod
    def load(cls, codes_dir: str | Path) -> Codebook:
        from safetensors.torch import load_file

        d = Path(codes_dir)
        if not (d / CODEBOOK_FILE).is_file() or not (d / META_FILE).is_file():
            raise ValueError(f"{d}: not a codes directory (no {CODEBOOK_FILE} / {META_FILE}); run `dvsft codes fit`")
        tensors = load_file(str(d / CODEBOOK_FILE))
        meta = json.loads((d / META_FILE).read_text())
        return cls([tensors[f"level{i}"] for i in range(len(tensors))], meta)


def fit_codebook(features, k: int, levels: int = 1, seed: int = 0, iters: int = 50) -> Codebook:
    """Residual k-means: level 0 on the features, each further level on what the previous levels left."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    residual = features.detach().float().cpu()
    centroids, inertia = [], []
    for level in range(levels):
        c, codes = kmeans(residual, k, seed=seed + level, iters=iters)
        residual = residual - c[codes]
        centroids.append(c)
        inertia.append(float((residual**2).sum(1).mean()))
    return Codebook(centroids, {"seed": seed, "iters": iters, "n_features": int(features.shape[0]), "mse": inertia})


# ---------------------------------------------------------------- model features


def model_fingerprint(model: Any, samples: int = 4096) -> str:
    """A hash of the model's vision parts (:meth:`~dvsft.models.families.FamilySpec.vision_parts`): the vision
    tower's config, then the parameter names, shapes and sampled values of the tower (names as the tower gives
    them) and of the other parts (names prefixed by their path)."""
    import torch

    spec = family_of(model)
    parts = spec.vision_parts(model)
    h = hashlib.sha256()
    cfg = getattr(spec.vision_tower(model), "config", None)
    if cfg is not None:
        h.update(cfg.to_json_string(use_diff=False).encode())
    items = [(key, part.state_dict()) for key, part in parts.named_children()]
    items += [(key, {"": part}) for key, part in parts.named_parameters(recurse=False)]
    with torch.no_grad():
        for i, (key, state) in enumerate(items):
            for name, p in sorted(state.items()):
                flat = p.detach().reshape(-1)
                step = max(1, flat.numel() // samples)
                h.update(f"{f'{key}.{name}' if i else name}{tuple(p.shape)}".encode())
                h.update(flat[::step].float().cpu().numpy().tobytes())
                h.update(np.float64(flat.double().sum().item()).tobytes())
    return h.hexdigest()[:16]


def feature_rows(features: Any) -> Any:
    """``get_image_features``' ``pooler_output`` (a tensor, or a tuple / list of them) as one ``(tokens, dim)``
    tensor, its rows in the order the model puts them into the image-token positions of the sequence."""
    import torch

    parts = [features] if isinstance(features, torch.Tensor) else list(features)
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in parts])


def image_features(model: Any, inputs: dict[str, Any], counts: Sequence[int], parts: Any = None) -> list[Any]:
    """Post-projector visual features (what the LLM receives), one ``(tokens, dim)`` tensor per image:
    :meth:`~dvsft.models.families.FamilySpec.vision_features` of the batch's image ``inputs`` (with ``parts``
    in the model's place), split into ``counts`` rows per image."""
    spec = family_of(model)
    rows = feature_rows(spec.vision_features(model, spec.vision_inputs(model, inputs), parts)[0])
    if rows.shape[0] != sum(counts):
        raise ValueError(f"the vision features have {rows.shape[0]} rows, the images {sum(counts)} visual tokens")
    return list(rows.split(list(counts)))


def token_counts(processor: Any, images: Sequence[Any]) -> list[int]:
    """Image-token positions of each PIL image in ``processor``'s sequences (its layout's ``num_tokens``)."""
    from dvsft.models.geometry import layout_for

    return [layout_for(processor, *im.size).num_tokens for im in images]


def process_images(processor: Any, images: Sequence[Any]) -> dict[str, Any]:
    ip = getattr(processor, "image_processor", processor)
    return ip(images=list(images), return_tensors="pt")


def features_of_images(model: Any, processor: Any, images: Sequence[Any]) -> list[Any]:
    """Visual features of PIL images (no gradients), float32 on the CPU."""
    import torch

    batch = process_images(processor, images)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # bitwise-reproducible CPU reductions: the same image gives the same codes
    try:
        with torch.no_grad():
            feats = image_features(model, inputs, token_counts(processor, images))
    finally:
        torch.set_num_threads(threads)
    return [f.float().cpu() for f in feats]


# ---------------------------------------------------------------- cache


class CodeCache:
    """Per-image codes on disk: ``<codes_dir>/cache/<key[:2]>/<key>.npy``; writes are atomic."""

    def __init__(self, codes_dir: str | Path, model_fp: str, codebook_id: str):
        self.root = Path(codes_dir) / "cache"
        self.model_fp, self.codebook_id = model_fp, codebook_id
        self.hits = self.misses = 0

    def key(self, image: str | Path, resolution: dict[str, Any]) -> str:
        p = Path(image).resolve()
        mtime = p.stat().st_mtime_ns
        raw = json.dumps([str(p), mtime, resolution, self.model_fp, self.codebook_id], sort_keys=True, default=str)
        return hashlib.sha256(raw.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, image: str | Path, resolution: dict[str, Any]) -> np.ndarray | None:
        path = self._path(self.key(image, resolution))
        if path.is_file():
            self.hits += 1
            return np.load(path)
        self.misses += 1
        return None

    def put(self, image: str | Path, resolution: dict[str, Any], codes: np.ndarray) -> None:
        path = self._path(self.key(image, resolution))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, codes.astype(np.int32))
        os.replace(tmp, path)


def resolution(processor: Any) -> dict[str, Any]:
    """The settings with which ``processor`` turns an image into visual tokens (its family's ``settings_from``:
    Qwen-VL's patch, merge and pixel bounds, a tiled family's tile rules): part of each cached image's key."""
    from dvsft.models.families import spec_for_processor

    return spec_for_processor(processor).settings_from(processor)


class Encoder:
    """Codes of image files for one model and codebook, through the cache."""

    def __init__(self, model: Any, processor: Any, codebook: Codebook, codes_dir: str | Path):
        self.model, self.processor, self.codebook = model, processor, codebook
        fp = model_fingerprint(model)
        expected = codebook.meta.get("model_fingerprint")
        self.fingerprint_matches = expected is None or expected == fp
        self.cache = CodeCache(codes_dir, fp, codebook.id)

    def encode_files(
        self, paths: Sequence[str | Path], batch_size: int = 8, progress: Callable[[int], None] | None = None
    ) -> list[np.ndarray]:
        """Codes (tokens, levels) per image file; cached ones are read, the rest computed and stored."""
        from dvsft.core.images import load_image

        out: list[np.ndarray | None] = [None] * len(paths)
        todo: list[int] = []
        settings = resolution(self.processor)
        for i, p in enumerate(paths):
            if not Path(p).is_file():
                raise ValueError(f"{p}: image file not found")
            out[i] = self.cache.get(p, settings)
            if out[i] is None:
                todo.append(i)
            elif progress:
                progress(1)
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            images = [load_image(paths[i]) for i in chunk]
            for i, feats in zip(chunk, features_of_images(self.model, self.processor, images), strict=True):
                codes = self.codebook.encode(feats).numpy().astype(np.int32)
                self.cache.put(paths[i], settings, codes)
                out[i] = codes
            if progress:
                progress(len(chunk))
        return out  # type: ignore[return-value]


def load_for_codes(
    model_dir: str | Path,
    records: str | Path,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    max_images: int | None = None,
) -> tuple[Any, Any, list[Path]]:
    """(model in eval mode, processor, the records' distinct image paths, at most ``max_images``): what
    ``dvsft codes fit`` and ``encode`` run on. A missing model directory, records file or image field
    raises ``ValueError``."""
    from dvsft.core.records import image_path, read_jsonl
    from dvsft.models.loading import load_model, load_processor

    model_dir, records = Path(model_dir), Path(records)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a model directory (no config.json)")
    if not records.is_file():
        raise ValueError(f"{records}: no such records file")
    paths: dict[Path, None] = {}
    for n, rec in enumerate(read_jsonl(records)):
        if "image" not in rec:
            raise ValueError(f"{records}: record {rec.get('id', n)!r} has no 'image' field")
        paths[image_path(rec, records).resolve()] = None
        if max_images is not None and len(paths) >= max_images:
            break
    size = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    return load_model(model_dir).eval(), load_processor(model_dir, **size), list(paths)


def fit_from_files(
    model: Any,
    processor: Any,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    k: int = 256,
    levels: int = 1,
    seed: int = 0,
    iters: int = 50,
    max_features: int = 200_000,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> tuple[Codebook, list[np.ndarray]]:
    """Fit the codebook on the images' features, save it to ``out_dir`` and cache every image's codes."""
    import torch

    from dvsft.core.images import load_image

    if not paths:
        raise ValueError("no images to fit codes on")
    feats_per_image = []
    for s in range(0, len(paths), batch_size):
        chunk = paths[s : s + batch_size]
        images = []
        for p in chunk:
            if not Path(p).is_file():
                raise ValueError(f"{p}: image file not found")
            images.append(load_image(p))
        feats_per_image.extend(features_of_images(model, processor, images))
        if progress:
            progress(len(chunk))
    allf = torch.cat(feats_per_image)
    if allf.shape[0] > max_features:
        g = torch.Generator().manual_seed(seed)
        allf = allf[torch.randperm(allf.shape[0], generator=g)[:max_features].sort().values]
    codebook = fit_codebook(allf, k, levels, seed, iters)
    fp = model_fingerprint(model)
    settings = resolution(processor)
    codebook.meta.update(
        model_fingerprint=fp,
        n_images=len(paths),
        resolution=settings,
        min_pixels=settings.get("min_pixels"),
        max_pixels=settings.get("max_pixels"),
    )
    codebook.save(out_dir)
    cache = CodeCache(out_dir, fp, codebook.id)
    codes = []
    for p, feats in zip(paths, feats_per_image, strict=True):
        c = codebook.encode(feats).numpy().astype(np.int32)
        cache.put(p, settings, c)
        codes.append(c)
    return codebook, codes
