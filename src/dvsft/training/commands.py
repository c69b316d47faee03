"""CLI commands of this stage: `dvsft train CONFIG.yaml [--key value ...]`."""

from __future__ import annotations

from pathlib import Path

import typer


def _print_keys() -> None:
    from rich.console import Console
    from rich.table import Table

    from dvsft.training.config import flat_keys

    table = Table("key", "default", "meaning", title="dvsft train config keys")
    for key, (_, default, help_) in flat_keys().items():
        table.add_row(key, repr(default), help_)
    Console().print(table)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add this stage's commands to the `dvsft` app and its `bench` group."""

    @app.command(
        "train",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def train_command(
        ctx: typer.Context,
        keys: bool = typer.Option(False, "--keys", help="list every config key with its default and meaning"),
    ) -> None:
        """dvsft train [CONFIG.yaml] [--key value ...]: fine-tune with SFT, DV-SFT or BASIC (HF Trainer).

        CONFIG.yaml is a config file (see configs/); every key can be set or overridden on the command line: --learning_rate 1e-5 --lora.enabled true --model tiny (see --keys).

        --resume continues from the last checkpoint in output_dir.

        Distributed: accelerate launch --config_file configs/accelerate/ddp.yaml -m dvsft.cli train CONFIG.yaml
        """  # noqa: E501
        if keys:
            _print_keys()
            return
        from dvsft.training.config import load_config, validate

        args = list(ctx.args)
        config = Path(args.pop(0)) if args and not args[0].startswith("--") else None
        try:
            cfg = load_config(config, args)
            validate(cfg)
        except (ValueError, FileNotFoundError) as err:
            typer.echo(f"Error: {err}", err=True)
            raise typer.Exit(2) from err
        from dvsft.training.train import train

        result = train(cfg)
        if result.final_dir is not None:
            typer.echo(f"final model: {result.final_dir}")
        typer.echo(f"log: {result.output_dir / 'log.jsonl'}")
