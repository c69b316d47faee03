"""CLI commands of this stage: `dvsft train CONFIG.yaml [--key value ...]`."""

from __future__ import annotations

from pathlib import Path

import typer


def _print_keys() -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from dvsft.training.config import flat_keys

    table = Table(
        "key", "default", "meaning", title="dvsft train config keys (DVSFTConfig = TrainingArguments + DV-SFT)"
    )
    for key, (aliases, default, help_) in flat_keys().items():
        name = key + "".join(f"\n  {a}" for a in aliases)
        table.add_row(Text(name), Text(repr(default)), Text(help_))
    Console().print(table)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add this stage's commands to the `dvsft` app and its `bench` group."""
    app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(train_command)


def train_command(
    ctx: typer.Context,
    keys: bool = typer.Option(False, "--keys", help="list every config key with its default and meaning"),
) -> None:
    """dvsft train [CONFIG.yaml] [--key value ...]: fine-tune with SFT, DV-SFT or BASIC (HF Trainer).

    CONFIG.yaml is a config file (see configs/); every key (any TrainingArguments field and DV-SFT's own) can be set or overridden on the command line: --learning_rate 1e-5 --adam_beta2 0.95 --lora true --model tiny (see --keys).

    --resume continues from the newest intact checkpoint in output_dir (--resume DIR: from DIR). An output_dir holding a finished run (final/) is refused unless --overwrite_output_dir true; one another run is training into is refused.

    Distributed: accelerate launch --config_file configs/accelerate/ddp.yaml -m dvsft.cli train CONFIG.yaml
    """  # noqa: E501
    if keys:
        _print_keys()
        return
    from dvsft.training.config import load_config

    args = list(ctx.args)
    config = Path(args.pop(0)) if args and not args[0].startswith("--") else None
    cfg = load_config(config, args)  # a bad value: one line naming the key and its source (cli.App)
    from dvsft.training.lock import check_finished_run
    from dvsft.training.train import train

    check_finished_run(cfg)  # a finished run in output_dir is replaced only with --overwrite_output_dir true

    result = train(cfg)
    if result.final_dir is not None:
        typer.echo(f"final model: {result.final_dir}")
    typer.echo(f"log: {result.output_dir / 'log.jsonl'}")
