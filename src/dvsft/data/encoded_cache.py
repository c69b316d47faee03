"""The encoded-sample cache: a sample's collator encoding, computed once and reused across epochs, runs and processes.

:class:`~dvsft.data.collator.VisionCollator` spends most of a small model's step on each sample's processor work
(image decoding and preprocessing, the chat template rendered three ways, tokenisation, the word alignment). With a
cache (``encoded_cache_dir``, on by default) the uncut :class:`~dvsft.data.collator.Encoded` of every sample is
written once, as one safetensors file, and read back (memory-mapped) by every later check, step, epoch and run that
uses the same settings; ``max_length`` cuts after the cache, so it is not part of the key.

Layout: ``DIR/<settings>/<kk>/<sample>.safetensors``, where

* ``<settings>`` hashes everything that shapes an encoding besides the sample: the processor class, the image
  processor's configuration (``min_pixels`` / ``max_pixels`` included), the tokenizer (its whole serialised
  vocabulary, merges and added tokens), both chat templates, the :class:`~dvsft.align.aligner.AlignConfig`, the
  source of dvsft's encoding code (``data/collator.py``, this module, ``align/``, ``models/``) and the transformers,
  tokenizers and torch versions. Any change starts a new folder; ``settings.json`` in it says what it was made with.
* ``<sample>`` hashes the sample's ``messages``, ``words``, ``width``, ``height`` and its image's **bytes** (not its
  path or time stamp: a re-rendered or copied image with the same pixels hits, a rewritten one misses; each file is
  read and hashed once per process and remembered by path, size and mtime). The sample id is not part of it.

The encoding always carries the word alignment (an SFT collator drops it on reading), so SFT and DV-SFT runs share
one cache. Writers write a temporary file and rename it into place (atomic on POSIX), so several processes can fill
one cache; a file that cannot be read is encoded again. Opening a cache removes the settings folders opened least
recently while all of them hold more than ``max_gb``; it stops growing (one warning) at ``max_gb`` (counted at open and
by this process's own writes) or when a write fails (a full disk): reading goes on, training never stops for the
cache. Failed encodings (:class:`~dvsft.data.collator.SampleError`) are not cached.

Processes that check the same samples at once (the demo's parallel runs, a sweep, the ranks of one DDP run) share the
encoding work: each claims a chunk of samples no other is encoding (:meth:`EncodedCache.claim`, a file under
``claims/`` created exclusively, removed when the chunk is done) and leaves the claimed ones for last, when they are
mostly cached (:func:`dvsft.data.dataset.check_samples`). A claim only orders the work: a sample is encoded wherever
it is not cached yet, so a killed process's claim costs nothing but order (and is ignored after
:data:`CLAIM_STALE_SECONDS`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dvsft.align.aligner import Alignment
from dvsft.core.file_memo import FileMemo
from dvsft.core.records import has_image

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the file layout changes
OFF = ("none", "off", "false", "")  # encoded_cache_dir values that disable the cache
AUTO = "auto"
MAX_GB = 20.0
RECORD_FIELDS = ("messages", "words", "width", "height")  # what the encoding reads of a sample, besides its image
CODE = (
    "data/collator.py",
    "data/encoded_cache.py",
    "align",
    "models",
)  # dvsft's encoding code, relative to the package
TENSORS = ("input_ids", "labels", "mm_token_type_ids", "pixel_values", "image_grid_thw")
IMAGE_INPUT = "image_inputs."  # prefix of the family's other image inputs among the tensors
CLAIMS = "claims"  # folder of the chunks being encoded, in a settings folder
CLAIM_STALE_SECONDS = 600.0  # an older claim is a killed process's: the chunk is encoded as if unclaimed

_IMAGE_DIGESTS: FileMemo[str] = FileMemo()  # each image file's content hash, per process


def default_cache_dir() -> Path:
    """``$DVSFT_CACHE_DIR/encoded``, else ``$XDG_CACHE_HOME/dvsft/encoded``, else ``~/.cache/dvsft/encoded``."""
    if os.environ.get("DVSFT_CACHE_DIR"):
        return Path(os.environ["DVSFT_CACHE_DIR"]) / "encoded"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dvsft" / "encoded"


def cache_root(value: str | os.PathLike | None) -> Path | None:
    """The folder an ``encoded_cache_dir`` value names: ``auto`` the default, ``none`` (or None) no cache."""
    if value is None or str(value).strip().lower() in OFF:
        return None
    return default_cache_dir() if str(value).strip().lower() == AUTO else Path(value).expanduser()


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False).encode()


def image_digest(record: dict[str, Any]) -> str | None:
    """The hash of a sample's image bytes (its ``image_bytes``, its file's, or an in-memory image's pixels), None for
    a text-only sample."""
    if not has_image(record):
        return None
    data, image = record.get("image_bytes"), record.get("image")
    if isinstance(data, bytes):
        return _digest(data)
    if isinstance(image, Image.Image):  # in memory (library use): its mode, size, pixels and EXIF
        return _digest(f"{image.mode} {image.size}".encode(), image.tobytes(), image.getexif().tobytes())
    return _IMAGE_DIGESTS.get(str(image), lambda: _file_digest(str(image)))


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def sample_key(record: dict[str, Any]) -> str:
    """The cache key of a sample: its :data:`RECORD_FIELDS` and its image's bytes."""
    return _digest(_json({k: record.get(k) for k in RECORD_FIELDS}), _json(image_digest(record)))


def chunk_name(records: list[dict[str, Any]]) -> str:
    """The claim name of a chunk of samples (:meth:`EncodedCache.claim`): a hash of their ids and image paths, the
    same in every process that reads the same data in the same order."""
    rows = [[r.get("id"), r["image"] if isinstance(r.get("image"), str) else None] for r in records]
    return _digest(_json(rows))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything the tokenizer splits and maps by (the fast tokenizer's JSON, else its vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return _digest(backend.to_str().encode())
    return _digest(_json(sorted(tokenizer.get_vocab().items())), _json(str(tokenizer.special_tokens_map)))


@functools.cache
def code_fingerprint() -> str:
    """A hash of the source of dvsft's encoding code (:data:`CODE`): changing it starts a new cache."""
    package = Path(__file__).resolve().parent.parent
    files = sorted(
        f for part in CODE for f in ([package / part] if part.endswith(".py") else (package / part).rglob("*.py"))
    )
    return _digest(*(str(f.relative_to(package)).encode() + f.read_bytes() for f in files))


def encoding_settings(collator: Any) -> dict[str, Any]:
    """Everything besides the sample that shapes its encoding by ``collator`` (a VisionCollator)."""
    import tokenizers
    import transformers

    processor, tokenizer = collator.processor, collator.tokenizer
    image_processor = getattr(processor, "image_processor", None)
    return {
        "format": CACHE_FORMAT,
        "processor": type(processor).__name__,
        "image_processor": image_processor.to_dict() if image_processor is not None else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": [getattr(processor, "chat_template", None), getattr(tokenizer, "chat_template", None)],
        "align": dataclasses.asdict(collator.align_config),
        "code": code_fingerprint(),
        "versions": [transformers.__version__, tokenizers.__version__, torch.__version__],
    }


def folder_size(folder: Path) -> int:
    """Bytes of the sample files in one settings folder."""
    return sum(f.stat().st_size for f in folder.glob("*/*.safetensors"))


def evict(root: Path, keep: Path, budget: int) -> int:
    """Remove the settings folders of ``root`` opened least recently (their ``settings.json``'s time) while all of
    them hold more than ``budget`` bytes, never ``keep``; returns the bytes left."""
    folders = [f for f in root.iterdir() if (f / "settings.json").is_file()]
    sizes = {f: folder_size(f) for f in folders}
    total = sum(sizes.values())
    for folder in sorted(folders, key=lambda f: (f / "settings.json").stat().st_mtime):
        if total <= budget:
            break
        if folder != keep:
            shutil.rmtree(folder, ignore_errors=True)
            total -= sizes[folder]
    return total


def open_cache(root: Path, collator: Any, max_gb: float = MAX_GB) -> EncodedCache | None:
    """The cache of ``collator``'s settings under ``root``; None, with one warning, where ``root`` cannot be used
    (not writable, not a folder): the samples are then encoded as without a cache."""
    try:
        return EncodedCache(root, collator, max_gb)
    except OSError as err:
        log.warning("encoded-sample cache %s cannot be used (%s); encoding every sample", root, err)
        return None


class EncodedCache:
    """The encodings of one collator's settings: ``load(record)`` and ``save(record, encoded)``."""

    def __init__(self, root: str | os.PathLike, collator: Any, max_gb: float = MAX_GB):
        settings = encoding_settings(collator)
        self.dir = Path(root) / _digest(_json(settings))
        self.collator = collator
        self.budget = int(max_gb * 2**30)
        self.writable = True
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.dir / "settings.json", json.dumps(settings, indent=2, default=str).encode())
        self.size = evict(Path(root), self.dir, self.budget)

    def key(self, record: dict[str, Any]) -> str | None:
        """The sample's key (:func:`sample_key`), None where its image cannot be read (the encoding says why)."""
        try:
            return sample_key(record)
        except OSError:
            return None

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> Any:
        """The cached Encoded of the sample ``key``, or None (not cached, or unreadable)."""
        from safetensors import SafetensorError, safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["dvsft"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no mapping
        except (OSError, KeyError, ValueError, SafetensorError) as err:
            log.warning("encoded-sample cache: cannot read %s (%s); encoding the sample again", path, err)
            return None
        return self._encoded(tensors, meta)

    def save(self, key: str, enc: Any) -> None:
        """Write ``enc`` (uncut, with its alignment) as the sample ``key`` unless the cache is full or failed."""
        from safetensors.torch import save

        if not self.writable:
            return
        tensors, meta = _tensors(enc), _meta(enc)
        data = save(tensors, metadata={"dvsft": json.dumps(meta)})
        if self.size + len(data) > self.budget:
            self._stop(f"{self.dir.parent} holds {self.size / 2**30:.1f} GB, its limit (encoded_cache_max_gb)")
            return
        path = self.path(key)
        try:
            path.parent.mkdir(exist_ok=True)
            _write_atomic(path, data)
        except OSError as err:
            self._stop(f"writing {path} failed: {err}")
            return
        self.size += len(data)

    def claim(self, name: str) -> bool:
        """True when this process should encode the chunk ``name`` now: it created the chunk's claim file, or the one
        there is older than :data:`CLAIM_STALE_SECONDS`, or claims cannot be written; False while another process
        holds it (see the module docstring). :meth:`release` removes the claim."""
        path = self.dir / CLAIMS / name
        try:
            path.parent.mkdir(exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            with contextlib.suppress(OSError):  # released meanwhile: unclaimed
                return time.time() - path.stat().st_mtime > CLAIM_STALE_SECONDS
        except OSError:  # claims cannot be written: encode
            pass
        return True

    def release(self, name: str) -> None:
        """Remove the claim of chunk ``name`` (its samples are cached, or failed)."""
        (self.dir / CLAIMS / name).unlink(missing_ok=True)

    def _stop(self, why: str) -> None:
        self.writable = False
        log.warning("encoded-sample cache %s: no more samples are added: %s", self.dir, why)

    def _encoded(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Any:
        from dvsft.data.collator import Encoded
        from dvsft.models.geometry import layout_for

        ids = tensors["input_ids"]
        layout = layout_for(self.collator.family_source, *meta["size"]) if meta["size"] else None
        image_inputs = {k[len(IMAGE_INPUT) :]: v for k, v in tensors.items() if k.startswith(IMAGE_INPUT)}
        alignment = meta["alignment"]
        return Encoded(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            labels=tensors["labels"],
            mm_token_type_ids=tensors.get("mm_token_type_ids"),
            pixel_values=tensors.get("pixel_values"),
            image_grid_thw=tensors.get("image_grid_thw"),
            vision_tokens=[(int(p), int(t)) for p, t in meta["vision_tokens"]],
            label_set=list(meta["label_set"]),
            grid=layout.grid if layout is not None else None,
            alignment=_alignment(alignment) if alignment is not None else None,
            layout=layout,
            image_inputs=image_inputs if layout is not None else None,
        )


def _tensors(enc: Any) -> dict[str, torch.Tensor]:
    """The tensors of an Encoded (attention_mask is all ones: not stored)."""
    out = {k: getattr(enc, k) for k in TENSORS if getattr(enc, k) is not None}
    out |= {IMAGE_INPUT + k: v for k, v in (enc.image_inputs or {}).items()}
    return {k: v.contiguous() for k, v in out.items()}


def _meta(enc: Any) -> dict[str, Any]:
    """The rest of an Encoded as JSON: the image size (its layout is recomputed), vision tokens, alignment."""
    alignment = enc.alignment
    return {
        "size": [enc.layout.width, enc.layout.height] if enc.layout is not None else None,
        "vision_tokens": enc.vision_tokens,
        "label_set": enc.label_set,
        "alignment": None
        if alignment is None
        else {"labels": alignment.labels, "dropped": alignment.dropped, "per_view": alignment.per_view},
    }


def _alignment(data: dict[str, Any]) -> Alignment:
    per_view = {k: Counter(v) for k, v in data["per_view"].items()}
    return Alignment(data["labels"], Counter(data["dropped"]), per_view)


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` into ``path`` through a temporary file renamed into place (readers never see a partial file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
