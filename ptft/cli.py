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


TARGET_HELP = "A run directory (its final/ model is used) or a model directory."


@app.command(help="Generate a continuation of a prompt with a trained model and print the new "
                  "text. Works for full, LoRA/IA3/prompt-tuning and adapter runs; a classifier "
                  "prints its predicted label and probabilities instead.\n\n"
                  "Examples:\n\n"
                  "  ptft generate runs/pretrain/20261129-035156 -p 'The assert statement'\n\n"
                  "  ptft generate runs/finetune/20261130-101500 --prompt 'def add(a, b):' "
                  "--temperature 0\n\n"
                  "  ptft generate my-model-dir --prompt 'Hello' --max-new-tokens 20 --seed 1")
def generate(
    target: str = typer.Argument(..., metavar="RUN_OR_MODEL_DIR", help=TARGET_HELP),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The text to continue (or classify)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Most tokens to generate."),
    temperature: float = typer.Option(0.8, "--temperature",
                                      help="Sampling temperature; 0 is greedy decoding."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling: keep the most likely "
                                                      "tokens up to this probability mass."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same text."),
    chat: Optional[bool] = typer.Option(
        None, "--chat/--no-chat", show_default="auto",
        help="Render the prompt with the chat template. Default: on for runs fine-tuned on "
             "instructions (SFT), off otherwise."),
) -> None:
    with _usage_errors():
        from ptft import inference

        found = inference.locate(target)
        inference.quiet_libraries()
        tokenizer = inference.load_tokenizer(found)
        model = inference.load_model(found)
        if found.task == "classification":
            ranked = inference.classify(model, tokenizer, prompt)
            print(f"classifier ({len(ranked)} labels); predicted label: {ranked[0][0]}")
            for label, probability in ranked:
                print(f"  {label:<24} {probability:.4f}")
            return
        use_chat = inference.chat_by_default(found) if chat is None else chat
        print(inference.generate(model, tokenizer, prompt, chat=use_chat,
                                 max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, seed=seed))


@app.command(help="Fold a LoRA (or IA3) run into its base model and write a plain Hugging Face "
                  "model directory (safetensors + tokenizer), by default RUN_DIR/merged. "
                  "Bottleneck-adapter and full runs cannot be (or need not be) merged.\n\n"
                  "Examples:\n\n"
                  "  ptft merge runs/finetune/20261130-101500\n\n"
                  "  ptft merge runs/finetune/20261130-101500 --output models/docstrings-lora")
def merge(
    run_dir: str = typer.Argument(..., metavar="RUN_DIR", help="A LoRA or IA3 run directory "
                                                               "(or its final/ folder)."),
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="Where to write the merged model (must not exist). "
                                              "Default: RUN_DIR/merged."),
) -> None:
    with _usage_errors():
        from pathlib import Path

        from ptft import inference

        found = inference.locate(run_dir)
        inference.quiet_libraries()
        print(inference.merge(found, Path(output) if output else None))


@app.command(name="eval",
             help="Evaluate a trained model on the eval split of a dataset: loss and perplexity "
                  "(language models) or loss and accuracy (classifiers). A run is evaluated on "
                  "its own data and settings unless overrides change them; a model directory "
                  "with the fine-tuning defaults plus overrides.\n\n"
                  "Examples:\n\n"
                  "  ptft eval runs/finetune/20261130-101500\n\n"
                  "  ptft eval runs/finetune/20261130-101500 train.eval_batches=0 --json\n\n"
                  "  ptft eval my-model data=jsonl 'data.paths=\\[held_out.jsonl]'\n\n"
                  "  ptft eval runs/pretrain/20261129-035156/final stage=pretrain data=python-docs")
def eval_(
    target: str = typer.Argument(..., metavar="RUN_OR_MODEL_DIR", help=TARGET_HELP),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP + " train."
                                                    "eval_batches=0 evaluates the whole split."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    with _usage_errors():
        import json

        from ptft import inference

        found = inference.locate(target)
        inference.quiet_libraries()
        result = inference.evaluate(found, list(overrides or []))
        if as_json:
            print(json.dumps(result, indent=2))
            return
        from rich.table import Table

        table = Table(title="evaluation (eval split)", show_header=False)
        names = {"eval_loss": ("loss", "{:.4f}"), "eval_ppl": ("perplexity", "{:.2f}"),
                 "eval_accuracy": ("accuracy", "{:.4f}"), "eval_sequences": ("sequences", "{:,}")}
        for key, value in result.items():
            name, fmt = names.get(key, (key, "{}"))
            table.add_row(name, fmt.format(value))
        Console(soft_wrap=True).print(table)


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
    """Print a UsageError (exit 2), a preemption (exit 75) or a failed run (exit 1) as one
    line; anything else is a bug and keeps its traceback."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        from ptft.errors import EXIT_FAILURE, EXIT_PREEMPTED, Preempted, TrainingFailed

        # Expected ways for a run to end early: one line each, and a code a script can use.
        codes = {UsageError: EXIT_USAGE, Preempted: EXIT_PREEMPTED, TrainingFailed: EXIT_FAILURE}
        for kind, code in codes.items():
            if exc_type is not None and issubclass(exc_type, kind):
                label = "stopped" if kind is Preempted else "error"
                err_console.print(f"[red]{label}:[/] {escape(str(exc))}", highlight=False)
                raise typer.Exit(code)
        return False


def main() -> None:
    app()


if __name__ == "__main__":
    main()
