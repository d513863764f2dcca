"""The `ptft` command line. Commands parse arguments and hand over; no training logic here.

torch and transformers are imported inside the commands that train, so `ptft --help` and
`ptft config` answer at once.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ptft import __version__
from ptft.errors import EXIT_USAGE, UsageError

app = typer.Typer(
    name="ptft", no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
    help="Pre-train and fine-tune language models from composable configs.\n\n"
         "Overrides use Hydra's grammar: key=value, +key=value, ~key (back to default), "
         "group=option; `ptft config` shows every key.")
err_console = Console(stderr=True, soft_wrap=True)

OVERRIDES_HELP = ("Config overrides, e.g. train.lr=3e-4 model=llama-small "
                  "'data.paths=\\[corpus.jsonl]'.")


def _version(value: bool) -> None:
    if value:
        print(f"ptft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                        help="Print the version and exit.")) -> None:
    pass


@app.command(help="Train a causal language model from scratch (or continue pre-training "
                  "model.path=DIR) on a corpus.\n\n"
                  "Examples:\n\n"
                  "  ptft pretrain\n\n"
                  "  ptft pretrain model=llama-small train.max_steps=2000\n\n"
                  "  ptft pretrain data=jsonl 'data.paths=\\[corpus.jsonl]'\n\n"
                  "  ptft pretrain -m train.lr=1e-3,3e-4")
def pretrain(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    multirun: bool = typer.Option(False, "-m", "--multirun",
                                  help="Sweep: one run per combination of comma-separated values."),
) -> None:
    _train("pretrain", overrides or [], multirun)


@app.command(help="Fine-tune a pre-trained model on a task: instruction tuning (SFT) or "
                  "classification, with full training, LoRA, adapters, IA3 or prompt tuning. "
                  "The base is model.path=DIR, by default the newest finished pretrain run.\n\n"
                  "Examples:\n\n"
                  "  ptft finetune method=lora\n\n"
                  "  ptft finetune method=adapter method.reduction_factor=16 train.lr=3e-4\n\n"
                  "  ptft finetune data=stdlib-topics method=lora\n\n"
                  "  ptft finetune model.path=my-model data=jsonl 'data.paths=\\[sft.jsonl]'")
def finetune(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    multirun: bool = typer.Option(False, "-m", "--multirun",
                                  help="Sweep: one run per combination of comma-separated values."),
) -> None:
    _train("finetune", overrides or [], multirun)


@app.command(help="Print the composed, resolved config for a stage (default: pretrain).\n\n"
                  "Examples:\n\n"
                  "  ptft config\n\n"
                  "  ptft config pretrain model=llama-small train.lr=3e-4")
def config(
    stage: Optional[str] = typer.Argument(None, help="Stage: pretrain or finetune."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    overrides = list(overrides or [])
    if stage and ("=" in stage or stage.startswith(("+", "~"))):
        overrides.insert(0, stage)  # `ptft config train.lr=1` : the stage was left out
        stage = None
    with _usage_errors():
        from omegaconf import OmegaConf
        from rich.syntax import Syntax

        from ptft.config.compose import compose
        cfg = compose(_check_stage(stage or "pretrain"), overrides)
        Console().print(Syntax(OmegaConf.to_yaml(cfg), "yaml", background_color="default"))


def _train(stage: str, overrides: list[str], multirun: bool) -> None:
    with _usage_errors():
        if multirun:
            from ptft.sweep import run_multirun
            run_multirun(stage, overrides)
            return
        from ptft.config.compose import compose, to_object
        run = to_object(compose(stage, overrides))
        from ptft.engine.executor import execute
        execute(run)


def _check_stage(stage: str) -> str:
    from ptft.config.compose import group_options
    from ptft.errors import did_you_mean

    stages = group_options("stage")
    if stage not in stages:
        raise UsageError(f"unknown stage '{stage}'.{did_you_mean(stage, stages)} "
                         f"Stages: {', '.join(stages)}.")
    return stage


class _usage_errors:
    """Print a UsageError as one line and exit 2; anything else is a bug and keeps its traceback."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, UsageError):
            err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(EXIT_USAGE)
        return False


def main() -> None:
    app()


if __name__ == "__main__":
    main()
