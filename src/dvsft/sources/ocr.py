"""Word-level OCR engines behind one small interface.

An engine is any callable ``engine(image: PIL.Image) -> list[Word]`` returning words with axis-aligned boxes
``[x0, y0, x1, y1]`` in the pixels of the image it was given, and a score in [0, 1]. Engines are registered by
name; ``get_engine("rapidocr", threads=1)`` builds one. Add another engine with::

    @register_engine("myocr")
    class MyOCR:
        def __init__(self, **options): ...
        def __call__(self, image): return [{"text": "Invoice", "box": [10, 5, 80, 20], "score": 0.98}]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from PIL import Image

from dvsft.core.records import Word


@runtime_checkable
class OCREngine(Protocol):
    """Word-level OCR: image in, words with original-pixel boxes out."""

    def __call__(self, image: Image.Image) -> list[Word]: ...


_ENGINES: dict[str, Callable[..., OCREngine]] = {}
T = TypeVar("T", bound=Callable[..., OCREngine])


def register_engine(name: str) -> Callable[[T], T]:
    """Class/factory decorator adding an engine to the registry under ``name``."""

    def deco(factory: T) -> T:
        _ENGINES[name] = factory
        return factory

    return deco


def engine_names() -> list[str]:
    """Names accepted by :func:`get_engine`."""
    return sorted(_ENGINES)


def get_engine(name: str = "rapidocr", **options: Any) -> OCREngine:
    """Build the engine registered as ``name`` with ``options`` (e.g. ``threads``, ``min_score``)."""
    if name not in _ENGINES:
        raise ValueError(f"unknown OCR engine {name!r}; available: {', '.join(engine_names())}")
    return _ENGINES[name](**options)


def polygon_to_box(points: Sequence[Sequence[float]], width: int, height: int) -> list[float] | None:
    """Axis-aligned ``[x0, y0, x1, y1]`` around a polygon, clipped to the image; None when it has no area."""
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    x0, x1 = max(0.0, min(xs)), min(float(width), max(xs))
    y0, y1 = max(0.0, min(ys)), min(float(height), max(ys))
    if x1 <= x0 or y1 <= y0:
        return None
    return [round(x0, 1), round(y0, 1), round(x1, 1), round(y1, 1)]


@register_engine("rapidocr")
class RapidOCREngine:
    """rapidocr (PP-OCR det + rec ONNX models shipped in its wheel) with word boxes.

    ``threads``: onnxruntime intra-op threads (None = all cores). ``min_score``: drop words (and lines) scoring
    below it. ``use_cls``: run the 180-degree text-line classifier (off: upright documents, ~40% faster).
    ``params``: extra rapidocr config overrides, e.g. ``{"Det.limit_side_len": 960}``. ``device``: ``cpu``,
    ``cuda`` or ``cuda:N`` (onnxruntime-gpu's CUDA provider, see :func:`cuda_params`).
    """

    def __init__(
        self,
        threads: int | None = None,
        min_score: float = 0.5,
        use_cls: bool = False,
        params: dict[str, Any] | None = None,
        device: str = "cpu",
    ):
        from rapidocr import RapidOCR

        cfg: dict[str, Any] = {
            "Global.log_level": "error",
            "Global.text_score": float(min_score),
            "Global.use_cls": bool(use_cls),
            "Global.return_word_box": True,
        }
        if threads:
            cfg["EngineConfig.onnxruntime.intra_op_num_threads"] = int(threads)
            cfg["EngineConfig.onnxruntime.inter_op_num_threads"] = 1
        cfg.update(cuda_params(device))
        cfg.update(params or {})
        logging.getLogger("RapidOCR").setLevel(logging.ERROR)
        self.min_score = float(min_score)
        self._ocr = RapidOCR(params=cfg)
        self._ocr.cal_rec_boxes = _PerWordScores(self._ocr.cal_rec_boxes)

    def __call__(self, image: Image.Image) -> list[Word]:
        import numpy as np

        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        # rapidocr wants BGR ndarrays (PIL inputs are converted the same way inside it).
        result = self._ocr(np.ascontiguousarray(np.asarray(image)[:, :, ::-1]))
        words: list[Word] = []
        if not getattr(result, "txts", None):  # nothing found: word_results is a placeholder triple
            return words
        for line in getattr(result, "word_results", None) or ():
            for item in line if isinstance(line, list | tuple) else ():
                if not isinstance(item, list | tuple) or len(item) != 3 or item[2] is None:
                    continue
                text, score, poly = item
                text = str(text).strip()
                box = polygon_to_box(poly, width, height)
                if not text or box is None or float(score) < self.min_score:
                    continue
                words.append({"text": text, "box": box, "score": round(float(score), 4)})
        return words


def cuda_params(device: str) -> dict[str, Any]:
    """rapidocr settings for ``device`` (``cpu``, ``cuda`` or ``cuda:N``); a CUDA device needs onnxruntime's
    CUDAExecutionProvider (the ``onnxruntime-gpu`` package) and raises a one-line ``ValueError`` without it."""
    if device == "cpu":
        return {}
    name, _, index = device.partition(":")
    if name != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"--device {device!r}: use cpu, cuda or cuda:N")
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        raise ValueError(
            f"--device {device}: onnxruntime has no CUDAExecutionProvider (available: {', '.join(providers)}); "
            "install onnxruntime-gpu in place of onnxruntime (pip uninstall onnxruntime && pip install onnxruntime-gpu)"
        )
    return {
        "EngineConfig.onnxruntime.use_cuda": True,
        "EngineConfig.onnxruntime.cuda_ep_cfg.device_id": int(index or 0),
    }


def rapidocr_options(
    min_score: float = 0.5,
    use_cls: bool = False,
    params: dict[str, Any] | None = None,
    threads: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """The rapidocr engine options of `dvsft label`; a device that cannot run raises ``ValueError``."""
    options: dict[str, Any] = {"min_score": min_score, "use_cls": use_cls, "params": params or {}}
    if threads:
        options["threads"] = threads
    if device != "cpu":
        cuda_params(device)
        options["device"] = device
    return options


class _PerWordScores:
    """Wrap rapidocr's word-box step so each word's score is the mean confidence of its own characters.

    rapidocr pairs word boxes with the confidences of the line's first characters (one per word); we recompute
    them from the recogniser's per-character confidences. Falls back to rapidocr's values if anything is off.
    """

    def __init__(self, inner: Callable[..., Any]):
        self.inner = inner

    def __call__(self, imgs: Any, dt_boxes: Any, rec_res: Any, return_single_char_box: bool = False) -> Any:
        try:
            per_line = [
                _word_confidences(txt, info, return_single_char_box)
                for txt, info in zip(rec_res.txts, rec_res.word_results, strict=True)
            ]
        except Exception:  # noqa: BLE001 - scores are a refinement, never a failure
            per_line = None
        out = self.inner(imgs, dt_boxes, rec_res, return_single_char_box)
        if per_line is None or len(out.word_results) != len(per_line):
            return out
        fixed = []
        for line, scores in zip(out.word_results, per_line, strict=True):
            if scores is not None and len(line) == len(scores):
                line = [(t, s, box) for (t, _, box), s in zip(line, scores, strict=True)]
            fixed.append(line)
        out.word_results = tuple(fixed)
        return out


def _word_confidences(text: str, info: Any, single_char: bool) -> list[float] | None:
    from rapidocr.ch_ppocr_rec.typings import WordType

    confs = list(getattr(info, "confs", None) or [])
    groups = list(getattr(info, "words", None) or [])
    if len(confs) != len(text) or not groups:
        return None
    chars = [c for ch, c in zip(text, confs, strict=True) if not ch.isspace()]
    all_en = all(t is WordType.EN_NUM for t in info.word_types)
    sizes = [len(g) for g in groups] if all_en and not single_char else [1] * sum(len(g) for g in groups)
    if sum(sizes) != len(chars):
        return None
    scores, i = [], 0
    for n in sizes:
        scores.append(sum(chars[i : i + n]) / n)
        i += n
    return scores
