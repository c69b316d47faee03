"""DV-SFT inside your own Hugging Face ``Trainer``: the collator and the loss are all you need.

    python examples/custom_trainer.py                      # builds the tiny model, trains 4 steps
    python examples/custom_trainer.py --model path/to/qwen3-vl --records my_records.jsonl --steps 100

The pieces (see docs/api.md):

* :func:`dvsft.load_records` - word records (JSONL) -> samples, one QA pair each;
* :class:`dvsft.VisionCollator` - the model's own processor + text labels + vision labels;
* :func:`dvsft.objectives.losses.model_loss` - ``L_text + lambda * L_vision`` without full-vocabulary logits,
  through the (wrapped) model's own forward;
* :func:`dvsft.objectives.losses.step_tokens` - the step's labeled tokens, so that gradient accumulation and
  several processes give exactly the loss and gradients of one big batch.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from transformers import Trainer, TrainerCallback, TrainingArguments

from dvsft import VisionCollator, load_records
from dvsft.core.records import write_jsonl
from dvsft.models.loading import load_model, load_processor
from dvsft.objectives.losses import StepTokens, model_loss, step_tokens

HISTORY: list[dict[str, float]] = []  # one entry per optimisation step (read by the test)


class DVSFTLossTrainer(Trainer):
    """A user's Trainer subclass: the loss, and the step's token counts that make accumulation exact."""

    loss_is_scaled_for_ga = True  # compute_loss returns each micro-batch's share of the step's loss

    def __init__(self, *args, vision_weight: float = 0.1, eps: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.vision_weight, self.eps = vision_weight, eps
        self.last_terms: dict[str, float] = {}

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        return batches, step_tokens(batches, self.accelerator)  # labeled tokens of the step, all processes

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tokens = num_items_in_batch if isinstance(num_items_in_batch, StepTokens) else None  # None: evaluation
        out = model_loss(model, inputs, vision_weight=self.vision_weight, eps=self.eps, tokens=tokens)
        self.last_terms = {
            "loss": float(out.loss.detach()),
            "text_loss": float(out.text_loss),
            "vision_loss": float(out.vision_loss),
            "vision_acc": out.vision_accuracy,
            "text_tokens": out.n_text,
            "vision_tokens": out.n_vision,
        }
        return (out.loss, {"dvsft": out}) if return_outputs else out.loss


class Record(TrainerCallback):
    def __init__(self, trainer: DVSFTLossTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        HISTORY.append(dict(self.trainer.last_terms, step=state.global_step))
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in HISTORY[-1].items()})


def make_records(folder: Path, n: int = 4) -> Path:
    """A few rendered pages with exact word boxes, written as word records (what `dvsft` pipelines produce)."""
    import matplotlib

    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), 14)
    vocab = ["the", "value", "class", "return", "module", "object", "list", "name", "string", "file", "type", "data"]
    rows = []
    for i in range(n):
        image = Image.new("RGB", (224, 160), "white")
        draw = ImageDraw.Draw(image)
        words, x, y = [], 6, 8
        for k in range(8):
            text = vocab[(i * 5 + k) % len(vocab)]
            box = draw.textbbox((x, y), text, font=font)
            if box[2] > 218:
                x, y = 6, y + 36
                box = draw.textbbox((x, y), text, font=font)
            draw.text((x, y), text, font=font, fill="black")
            words.append({"text": text, "box": list(box), "score": 1.0})
            x = box[2] + 12
        image.save(folder / f"page{i}.png")
        question = "What is the first word?"
        messages = [
            {"role": "user", "content": f"<image>{question}"},
            {"role": "assistant", "content": words[0]["text"]},
            {"role": "user", "content": "And the last one?"},
            {"role": "assistant", "content": words[-1]["text"]},
        ]
        rows.append(
            {
                "id": f"page{i}",
                "image": f"page{i}.png",
                "width": 224,
                "height": 160,
                "words": words,
                "messages": messages,
            }
        )
    path = folder / "records.jsonl"
    write_jsonl(path, rows)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model directory (default: build the tiny Qwen3-VL)")
    ap.add_argument("--records", help="word-records JSONL (default: render a few pages)")
    ap.add_argument("--out", default=None, help="output directory")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps")
    ap.add_argument("--vision-weight", type=float, default=0.1)
    ap.add_argument("--eps", type=float, default=0.1)
    args = ap.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="dvsft_example_"))
    out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model
    if model_dir is None:
        from dvsft.testing.tiny import save_tiny

        model_dir = save_tiny(out / "tiny-model")
    records_file = Path(args.records) if args.records else make_records(out)

    # one QA pair per image (the paper's setting); use seed=epoch to draw another pair each epoch
    dataset = load_records(records_file, one_qa_per_image=True, seed=0)
    processor = load_processor(model_dir)
    model = load_model(model_dir)
    collator = VisionCollator(processor)

    train_args = TrainingArguments(
        output_dir=str(out / "run"),
        max_steps=args.steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=args.accumulation,
        learning_rate=1e-4,
        remove_unused_columns=False,  # the collator needs the raw records
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = DVSFTLossTrainer(
        model=model,
        args=train_args,
        train_dataset=dataset,
        data_collator=collator,
        vision_weight=args.vision_weight,
        eps=args.eps,
    )
    trainer.add_callback(Record(trainer))
    trainer.train()


if __name__ == "__main__":
    main()
