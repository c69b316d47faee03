"""The user text that follows an item's image(s): the paper's protocol or lmms-eval's own prompts.

``paper`` (default): the question, stripped, then ``"\\nAnswer the question using a single word or
phrase."`` for every benchmark (TextVQA capitalised and MME's yes/no request replaced, as lmms-eval).
``lmms-eval``: each benchmark's ``doc_to_text`` with its default ``post_prompt`` as in lmms-eval
``LMMS_EVAL_VERSION`` (ChartQA asks for a single word, OCRBench appends nothing, only OCRBench and MME
strip the question). Benchmarks lmms-eval has no task for (OCR-VQA, SQuAD) keep the paper's prompt.
The OCR transcription task always asks ``TRANSCRIBE_PROMPT`` and takes no post prompt.
"""

from __future__ import annotations

from dvsft.sources.instructions import TRANSCRIBE_INSTRUCTION as TRANSCRIBE_PROMPT  # the renderer's task wording

PROMPT_STYLES = ("paper", "lmms-eval")
SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."  # the paper's (and lmms-eval's)
MME_YES_NO = " Please answer yes or no."  # replaced by the post prompt (lmms-eval's mme_doc_to_text)

# lmms-eval's default post_prompt per task (lmms_eval_specific_kwargs.default in the task YAML)
LMMS_EVAL_POST_PROMPTS = {
    "docvqa": SHORT_ANSWER_PROMPT,
    "infovqa": SHORT_ANSWER_PROMPT,
    "chartqa": "\nAnswer the question with a single word.",
    "ocrbench": "",
    "textvqa": SHORT_ANSWER_PROMPT,
    "mme": SHORT_ANSWER_PROMPT,
}
TEXT_TASKS = ("ocr",)  # a fixed instruction, no question


def check_style(style: str) -> str:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; use one of {', '.join(PROMPT_STYLES)}")
    return style


def default_post_prompt(bench: str, style: str = "paper") -> str | None:
    """The post prompt a benchmark uses in ``style`` (None where it takes none: the OCR task)."""
    check_style(style)
    if bench in TEXT_TASKS:
        return None
    if style == "lmms-eval" and bench in LMMS_EVAL_POST_PROMPTS:
        return LMMS_EVAL_POST_PROMPTS[bench]
    return SHORT_ANSWER_PROMPT


def effective_post_prompt(bench: str, style: str = "paper", post_prompt: str | None = None) -> str | None:
    """The post prompt actually appended: ``post_prompt`` when given, else the style's; None for the OCR task."""
    default = default_post_prompt(bench, style)
    if default is None:
        return None
    return default if post_prompt is None else post_prompt


def build_prompt(bench: str, question: str, style: str = "paper", post_prompt: str | None = None) -> str:
    """The text after the image(s); ``post_prompt`` None takes the style's own for the benchmark."""
    post = effective_post_prompt(bench, style, post_prompt)
    if bench in TEXT_TASKS:
        return TRANSCRIBE_PROMPT
    if style == "lmms-eval" and bench in LMMS_EVAL_POST_PROMPTS:
        return _lmms_eval_prompt(bench, question, post or "")
    question = question.strip()
    if bench == "textvqa":
        question = question.capitalize()
    if bench == "mme":
        question = question.replace(MME_YES_NO, "")
    return f"{question}{post}"


def _lmms_eval_prompt(bench: str, question: str, post: str) -> str:
    """lmms-eval's ``<task>_doc_to_text`` with an empty pre prompt."""
    if bench == "ocrbench":
        return f"{question.strip()}{post}"
    if bench == "textvqa":
        return f"{question.capitalize()}{post}"
    if bench == "mme":
        question = question.strip()
        if post:
            question = question.replace(MME_YES_NO, "")
        return f"{question}{post}"
    return f"{question}{post}"  # docvqa, infovqa, chartqa: the question as given


def prompt_template(bench: str, style: str = "paper", post_prompt: str | None = None) -> str:
    """The prompt with ``{question}`` in place of the question, as recorded in ``scores.json``."""
    return build_prompt(bench, "{question}", style, post_prompt)
