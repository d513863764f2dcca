"""The `ptft` command line. Commands parse arguments and hand over; no training logic here.

torch and transformers are imported inside the commands that train, so `ptft --help` and
`ptft config` answer at once.
"""

from __future__ import annotations

import os
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
                  "  ptft config pretrain model=llama-small train.lr=3e-4\n\n"
                  "  ptft config finetune method=lora --sources")
def config(
    stage: Optional[str] = typer.Argument(None, help="Stage: pretrain or finetune."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    sources: bool = typer.Option(False, "--sources",
                                 help="Show each key's value and where it came from: the schema "
                                      "default, a config file (e.g. configs/model/llama-tiny.yaml)"
                                      " or the command line."),
) -> None:
    overrides = list(overrides or [])
    if stage and ("=" in stage or stage.startswith(("+", "~"))):
        overrides.insert(0, stage)  # `ptft config train.lr=1` : the stage was left out
        stage = None
    with _usage_errors():
        from omegaconf import OmegaConf
        from rich.syntax import Syntax

        from ptft.config.compose import check_stage, compose
        if sources:
            from ptft.reports.sources import print_sources
            print_sources(check_stage(stage or "pretrain"), overrides)
            return
        from ptft.errors import redact_secrets

        cfg = compose(check_stage(stage or "pretrain"), overrides)
        text = OmegaConf.to_yaml(redact_secrets(OmegaConf.to_container(cfg)))
        Console().print(Syntax(text, "yaml", background_color="default"))


@app.command(help="List the runs under ROOT (default runs/), newest first.\n\n"
                  "Columns: stage, method, model, data, steps, final train/eval loss, "
                  "perplexity or accuracy, tokens/s, trainable parameters, wall time and "
                  "status (finished, running, preempted, failed). 'updated' is the age of the "
                  "newest metrics row: a run still marked running whose process died stops "
                  "updating it.\n\n"
                  "Examples:\n\n"
                  "  ptft runs\n\n"
                  "  ptft runs --stage finetune --method lora\n\n"
                  "  ptft runs /scratch/me/runs --json")
def runs(
    root: str = typer.Argument("runs", help="The folder searched for run directories."),
    stage: Optional[str] = typer.Option(None, "--stage", help="Only runs of this stage."),
    method: Optional[str] = typer.Option(None, "--method", help="Only runs of this method."),
    as_json: bool = typer.Option(False, "--json", help="Print the runs as a JSON list."),
) -> None:
    with _usage_errors():
        from ptft.reports.runs import show_runs
        show_runs(root, stage, method, as_json)


@app.command(help="Plot train and eval loss of one or more runs against the step or the tokens "
                  "seen, to a PNG, and print its path.\n\n"
                  "The PNG needs matplotlib (pip install 'ptft\\[plot]'); --terminal draws "
                  "sparklines instead.\n\n"
                  "Examples:\n\n"
                  "  ptft plot runs/pretrain/20261129-035156\n\n"
                  "  ptft plot finetune/lora finetune/adapter --x tokens -o lora-vs-adapter.png\n\n"
                  "  ptft plot runs/pretrain/20261129-035156 --terminal")
def plot(
    run_dirs: List[str] = typer.Argument(..., metavar="RUN...",
                                         help="Run directories, or their names under runs/ as "
                                              "`ptft runs` shows them."),
    x: str = typer.Option("step", "--x", help="The x axis: step or tokens."),
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="The PNG to write. Default: RUN/loss.png for one "
                                              "run, ./loss.png for several."),
    terminal: bool = typer.Option(False, "--terminal",
                                  help="Draw sparklines in the terminal; write no file."),
) -> None:
    with _usage_errors():
        from ptft.reports.plot import plot_runs
        path = plot_runs(run_dirs, x, output, terminal)
        if path is not None:
            print(path)


@app.command(help="Compare fine-tuning methods (full, LoRA, adapters) in a report and a chart."
                  "\n\nWith run directories, compare those runs; with none, first fine-tune the "
                  "same base on the same data once per method (full, LoRA, adapters; overrides "
                  "apply to all). Writes report.md (trainable "
                  "parameters, peak memory, time, tokens/s, eval loss, checkpoint size) and "
                  "loss.png to the output folder.\n\n"
                  "Examples:\n\n"
                  "  ptft compare\n\n"
                  "  ptft compare train.max_steps=100 data.max_documents=2000\n\n"
                  "  ptft compare --methods lora,adapter,ia3 --output reports/peft\n\n"
                  "  ptft compare runs/finetune/full-run runs/finetune/lora-run")
def compare(
    arguments: Optional[List[str]] = typer.Argument(
        None, metavar="[RUN_DIR...] [OVERRIDES...]",
        help="Run directories to compare, or overrides for the new runs (e.g. "
             "model.path=DIR train.max_steps=100)."),
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="Folder for report.md, loss.png and new runs. "
                                              "Default: runs/compare/<timestamp>/."),
    methods: str = typer.Option("full,lora,adapter", "--methods",
                                help="Methods to fine-tune when no run directories are given."),
) -> None:
    with _usage_errors():
        from ptft.reports.compare import compare as compare_methods
        compare_methods(list(arguments or []), output, methods)


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
        from ptft import generation, inference

        found = inference.locate(target)
        inference.quiet_libraries()
        tokenizer = inference.load_tokenizer(found)
        model = inference.load_model(found)
        if found.task == "classification":
            ranked = generation.classify(model, tokenizer, prompt)
            print(f"classifier ({len(ranked)} labels); predicted label: {ranked[0][0]}")
            for label, probability in ranked:
                print(f"  {label:<24} {probability:.4f}")
            return
        use_chat = inference.chat_by_default(found) if chat is None else chat
        print(generation.generate(model, tokenizer, prompt, chat=use_chat,
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
        from ptft.merge import merge_into_base

        found = inference.locate(run_dir)
        inference.quiet_libraries()
        print(merge_into_base(found, Path(output) if output else None))


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

        from ptft import evaluation, inference

        found = inference.locate(target)
        inference.quiet_libraries()
        result = evaluation.evaluate(found, list(overrides or []))
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


@app.command(help="Write a SLURM batch script for a run (runs/<stage>/<name>.sbatch) and submit "
                  "it with sbatch: one srun task per GPU on every node, SIGUSR1 120 s before the "
                  "time limit saves a checkpoint, and the job requeues itself and resumes in the "
                  "same run directory. The overrides are checked before anything is written.\n\n"
                  "Examples:\n\n"
                  "  ptft submit --gpus-per-node 8 --time 24:00:00 model=llama-small\n\n"
                  "  ptft submit --nodes 4 --gpus-per-node 8 model=llama-1b train.strategy=fsdp\n\n"
                  "  ptft submit --stage finetune --partition gpu method=lora\n\n"
                  "  ptft submit --gpus-per-node 0 --tasks-per-node 4 --dry-run")
def submit(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    stage: str = typer.Option("pretrain", "--stage", help="pretrain or finetune."),
    nodes: int = typer.Option(1, "--nodes", help="Nodes."),
    gpus_per_node: int = typer.Option(1, "--gpus-per-node",
                                      help="GPUs per node, one process each (0: CPU-only nodes)."),
    tasks_per_node: Optional[int] = typer.Option(
        None, "--tasks-per-node", help="Processes per node on CPU-only nodes (default 1)."),
    cpus_per_task: Optional[int] = typer.Option(None, "--cpus-per-task", help="CPUs per process."),
    time_limit: Optional[str] = typer.Option(None, "--time", help="Time limit, HH:MM:SS."),
    partition: Optional[str] = typer.Option(None, "--partition", help="SLURM partition."),
    sbatch_args: Optional[List[str]] = typer.Option(
        None, "--sbatch-arg", help="Another #SBATCH option, e.g. --sbatch-arg=--account=abc."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the script; write and submit "
                                                          "nothing."),
) -> None:
    with _usage_errors():
        from ptft.submit import Resources
        from ptft.submit import submit as submit_job

        submit_job(stage, list(overrides or []), Resources(
            nodes=nodes, gpus_per_node=gpus_per_node, tasks_per_node=tasks_per_node,
            cpus_per_task=cpus_per_task, time=time_limit, partition=partition,
            extra=list(sbatch_args or [])), dry_run=dry_run)


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


class _usage_errors:
    """Print a UsageError (exit 2), a preemption (exit 75), a failed run (exit 1) or a run
    stopped by a second Ctrl-C (exit 130) as one line; anything else is a bug and keeps its
    traceback."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        from ptft.errors import (EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted,
                                 TrainingFailed)

        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            # A second Ctrl-C (the first one saves and stops at the step's end): no traceback.
            message = str(exc) or "interrupted."
            err_console.print(f"[red]interrupted:[/] {escape(message)}", highlight=False)
            raise typer.Exit(EXIT_INTERRUPTED)

        # Expected ways for a run to end early: one line each, and a code a script can use.
        codes = {UsageError: EXIT_USAGE, Preempted: EXIT_PREEMPTED, TrainingFailed: EXIT_FAILURE}
        for kind, code in codes.items():
            if exc_type is not None and issubclass(exc_type, kind):
                if kind is Preempted and os.environ.get("RANK", "0") != "0":
                    raise typer.Exit(code)  # every rank stops together: rank 0 says so once
                label = "stopped" if kind is Preempted else "error"
                err_console.print(f"[red]{label}:[/] {escape(str(exc))}", highlight=False)
                raise typer.Exit(code)
        return False


def main() -> None:
    app()


if __name__ == "__main__":
    main()
