"""Load HF multimodal models and their processors, on GPU machines and on CPU-only ones.

The torchvision-based video processors cannot be built where no torchvision is installed;
images never need them, so on such machines the processor is assembled around the PIL
image processor with no video processor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# ChatML as the Qwen-VL templates write it; content is a string ("<image>" marks an image)
# or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}"
    "{{ message['content'] | replace('<image>', '<|vision_start|><|image_pad|><|vision_end|>') }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Models built by code rather than read from a dir, by the name `model:` gives: the `dvsft.models` entry
# points. This package registers `tiny` (dvsft.testing.tiny); another package can register its own.
MODEL_BUILDERS = "dvsft.models"


def model_builder(name: str | None) -> Any:
    """The builder registered as ``name`` (``builder(cfg) -> (model, processor)``), or None.

    A builder reads its options from the config's ``model_options`` mapping; its ``check_options(mapping)``
    attribute, where it has one, raises ``ValueError`` for a bad mapping when the config is loaded.
    """
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=MODEL_BUILDERS) if ep.name == name] if name else []
    return found[0].load() if found else None


def _image_only(processor_cls: type) -> type:
    """A subclass of a processor class that accepts ``video_processor=None``."""

    class ImageOnlyProcessor(processor_cls):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any):
            if argument is None and "video" in argument_name:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def save_pretrained(self, save_directory, **kwargs):
            save_processor(self, save_directory)

        if processor_cls.__name__ == "SmolVLMProcessor":  # its template rendering reads video frame settings

            def apply_chat_template(self, conversation, chat_template=None, **kwargs):
                from transformers.processing_utils import ProcessorMixin

                return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = processor_cls.__name__
    return ImageOnlyProcessor


def processor_class(model_type: str) -> type:
    """The multimodal processor class of a model type (from its family module, :mod:`dvsft.models.families`)."""
    import transformers

    from dvsft.models.families import family_spec

    try:
        spec = family_spec(model_type)
    except ValueError as err:
        raise ValueError(f"model type {model_type!r} is not supported yet: {err}") from None
    return getattr(transformers, spec.processor)


def image_processor_class(model_type: str) -> type:
    """The PIL image processor class of a model type (no torchvision needed)."""
    import transformers

    from dvsft.models.families import family_spec

    return getattr(transformers, family_spec(model_type).image_processor)


# processor settings outside the image processor and tokenizer (saved in processor_config.json)
PROCESSOR_KEYS = (
    "image_seq_length",  # InternVL
    "num_image_tokens",  # LLaVA-OneVision
    "vision_feature_select_strategy",
    "vision_aspect_ratio",
    "image_seq_len",  # Idefics3 / SmolVLM
)


def build_processor(
    image_processor: Any, tokenizer: Any, model_type: str, chat_template: str | None = None, **settings: Any
):
    """A processor of the family's class around the given image processor and tokenizer (no video)."""
    cls = processor_class(model_type)
    video = "video_processor" in getattr(cls, "get_attributes", lambda: [])()
    kwargs = {"video_processor": None} if video else {}
    return (_image_only(cls) if video else cls)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=chat_template or getattr(tokenizer, "chat_template", None),
        **kwargs,
        **settings,
    )


def check_model_dir(model_dir: str | Path) -> Path:
    """``model_dir`` as a Path; a plain FileNotFoundError when it is not a local model directory."""
    path = Path(model_dir)
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    return path


# files that hold a tokenizer's vocabulary (one of them must be in a model folder; tokenizer_config.json alone is not)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tekken.json")


def check_tokenizer(model_dir: str | Path) -> None:
    """A FileNotFoundError naming the folder and the files it lacks when it holds no tokenizer.

    Without one, transformers builds an empty tokenizer and the first batch fails far from the cause
    ("Mismatch in image token count").
    """
    path = check_model_dir(model_dir)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path} has no tokenizer: none of {', '.join(TOKENIZER_FILES)} is there "
            "(copy the base model's tokenizer files into it)"
        )


def safetensors_problem(path: str | Path) -> str | None:
    """Why safetensors cannot open the file ``path`` (truncated by a full disk, a kill or an interrupted copy, or
    not safetensors at all), or None when it opens; safetensors itself checks the header and the data's length."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            return None
    except (SafetensorError, OSError) as err:
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        return f"truncated or not a safetensors file ({size} bytes; {err})"


def check_weights(model_dir: str | Path) -> None:
    """A ValueError naming the first safetensors file of ``model_dir`` that safetensors cannot open
    (:func:`safetensors_problem`)."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise ValueError(f"{path}: {problem}")


def model_type_of(model_dir: str | Path) -> str:
    cfg = json.loads((check_model_dir(model_dir) / "config.json").read_text())
    return cfg.get("model_type", "")


def load_processor(model_dir: str | Path, trust_remote_code: bool = False, **size: int):
    """The model directory's processor; image-only where torchvision is missing.

    ``size`` may carry ``min_pixels`` / ``max_pixels`` to override the directory's setting.
    """
    from transformers import AutoTokenizer
    from transformers.utils import is_torchvision_available

    model_dir = Path(model_dir)
    check_tokenizer(model_dir)
    if is_torchvision_available():
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    else:
        image_processor = image_processor_class(model_type_of(model_dir)).from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        template = None
        tmpl_file = model_dir / "chat_template.jinja"
        if tmpl_file.is_file():
            template = tmpl_file.read_text()
        elif (model_dir / "chat_template.json").is_file():
            template = json.loads((model_dir / "chat_template.json").read_text())["chat_template"]
        settings = {}
        if (model_dir / "processor_config.json").is_file():
            saved = json.loads((model_dir / "processor_config.json").read_text())
            settings = {k: saved[k] for k in PROCESSOR_KEYS if k in saved}
        processor = build_processor(image_processor, tokenizer, model_type_of(model_dir), template, **settings)
    set_pixels(processor, **size)
    return processor


def set_pixels(processor: Any, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
    """Override the processor's min/max pixels in place (Qwen-VL families; tiled families' processors
    have tile settings instead and are left as they are)."""
    ip = processor.image_processor
    if not type(ip).__name__.startswith("Qwen2VLImageProcessor"):
        return
    if min_pixels is not None:
        ip.size["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        ip.size["longest_edge"] = int(max_pixels)


def save_processor(processor: Any, out_dir: str | Path) -> None:
    """Write tokenizer, image processor and chat template so `load_processor` reads them back."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(out)
    processor.image_processor.save_pretrained(out)
    if getattr(processor, "chat_template", None):
        (out / "chat_template.jinja").write_text(processor.chat_template)
    settings = {k: getattr(processor, k) for k in PROCESSOR_KEYS if getattr(processor, k, None) is not None}
    if settings:
        (out / "processor_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def load_model(model_dir: str | Path, dtype: Any = None, trust_remote_code: bool = False):
    """The model of a local HF directory, with its image-text-to-text head."""
    from transformers import AutoModelForImageTextToText

    from dvsft.models.patch_conv import linear_patch_convs

    check_model_dir(model_dir)
    check_weights(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=dtype or "auto", trust_remote_code=trust_remote_code
    )
    linear_patch_convs(model)
    return model
