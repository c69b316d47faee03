"""Format-control instructions added to rendered QA prompts (paper appendix A.1, our own wording).

Training prompts get one at random so the model learns to follow answer-format requests; the
paper evaluates with the first one, ``EVAL_INSTRUCTION``.
"""

from __future__ import annotations

import random

from dvsft.core.records import IMAGE_PLACEHOLDER

EVAL_INSTRUCTION = "Answer the question using a single word or phrase."

FORMAT_INSTRUCTIONS: tuple[str, ...] = (
    EVAL_INSTRUCTION,
    "Reply with only the answer, without any explanation.",
    "Give a short answer taken from the text in the image.",
    "Respond with the exact words from the image that answer the question.",
    "Answer briefly.",
    "Keep your answer as short as possible.",
    "Copy the answer span from the document in the image.",
    "Provide a concise answer of a few words.",
    "Use as few words as you can, in the wording of the image.",
    "Output only the answer text.",
)

TRANSCRIBE_INSTRUCTION = "Transcribe the text in the image."


def qa_prompt(question: str, rng: random.Random, instructions: tuple[str, ...] = FORMAT_INSTRUCTIONS) -> str:
    """The user turn of a rendered QA sample: ``<image>`` + question + a random format instruction."""
    return f"{IMAGE_PLACEHOLDER}{question.strip()}\n{rng.choice(instructions)}"


def transcribe_prompt() -> str:
    """The user turn of a transcription sample (documents without QA)."""
    return f"{IMAGE_PLACEHOLDER}{TRANSCRIBE_INSTRUCTION}"
