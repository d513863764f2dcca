"""End to end: `ptft generate`, `ptft merge` and `ptft eval` on tiny runs of every shape
(full model, LoRA, bottleneck adapters, a LoRA classifier), through the real CLI."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import TINY, run_ptft
from ptft.config.compose import compose, to_object
from ptft.data.sources import load_records

FINETUNE = ["data=docstrings", "data.max_documents=200", "train.seq_len=128",
            "train.batch_size=4", "train.max_steps=3", "train.eval_every=3",
            "train.save_every=0", "train.eval_batches=2"]
CLASSIFY = ["data=stdlib-topics", "data.max_documents=400"]


def run_parallel(*commands, **kwargs) -> list[subprocess.CompletedProcess]:
    """Independent CLI calls side by side: most of each is start-up (importing torch)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda args: run_ptft(*args, **kwargs), commands))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """A tiny pre-training run and fine-tuning runs on top of it, shared by every test."""
    # The classifier means something only if its training split has more than one label.
    topics = load_records(to_object(compose("finetune", CLASSIFY)).data)
    assert len({record["label"] for record in topics.train}) >= 2
    work = tmp_path_factory.mktemp("inference")
    pre = run_ptft("pretrain", *TINY, f"run.dir={work / 'pre'}", "train.max_steps=4",
                   cwd=work, cache=cache_dir)
    assert pre.returncode == 0, pre.stdout + pre.stderr
    base = f"model.path={work / 'pre' / 'final'}"
    jobs = {"lora": [*FINETUNE, "method=lora"], "adapter": [*FINETUNE, "method=adapter"],
            "full": [*FINETUNE, "method=full"], "cls": [*FINETUNE, *CLASSIFY, "method=lora"]}
    results = run_parallel(*[("finetune", base, *args, f"run.dir={work / name}")
                             for name, args in jobs.items()], cwd=work, cache=cache_dir)
    for name, result in zip(jobs, results):
        assert result.returncode == 0, f"finetune {name}:\n{result.stdout}{result.stderr}"
    return {"pre": work / "pre", **{name: work / name for name in jobs}, "work": work}


@pytest.mark.parametrize("name", ["pre", "full", "lora", "adapter"])
def test_generate_prints_text_and_same_seed_same_text(runs, cache_dir, name):
    args = ("generate", str(runs[name]), "--prompt", "def add(a, b):", "--seed", "3",
            "--max-new-tokens", "12")
    first, second = run_parallel(args, args, cwd=runs["work"], cache=cache_dir)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip(), "no text generated"
    assert first.stdout == second.stdout


def test_generate_on_a_classifier_prints_a_label(runs, cache_dir):
    from ptft.data.stdlib_tasks import TOPIC_LABELS

    result = run_ptft("generate", str(runs["cls"]), "--prompt", "Send an email message.",
                      cwd=runs["work"], cache=cache_dir)
    assert result.returncode == 0, result.stderr
    predicted = re.search(r"predicted label: (\S+)", result.stdout)
    assert predicted and predicted.group(1) in TOPIC_LABELS, result.stdout


def test_merge_lora_writes_a_plain_model_with_the_same_logits(runs, cache_dir):
    run_dir = runs["lora"]
    result = run_ptft("merge", str(run_dir), cwd=runs["work"], cache=cache_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(run_dir / "merged")
    assert (run_dir / "merged" / "model.safetensors").is_file()
    assert (run_dir / "merged" / "tokenizer.json").is_file()
    assert not list(run_dir.glob(".merged*")), "temporary folder left behind"
    # As readable as final/ (mkdtemp's 0700 would lock out others on a shared file system).
    assert (run_dir / "merged").stat().st_mode & 0o777 == (run_dir / "final").stat().st_mode & 0o777
    # Plain transformers + peft, no ptft: the merged model computes what base + LoRA does.
    code = f"""
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
final = {str(run_dir / 'final')!r}
base_path = json.load(open(final + "/adapter_config.json"))["base_model_name_or_path"]
merged = AutoModelForCausalLM.from_pretrained({str(run_dir / 'merged')!r}).eval()
base = AutoModelForCausalLM.from_pretrained(base_path).eval()
ids = torch.tensor([[0, 5, 9, 42, 100, 7, 250]])
with torch.no_grad():
    base_logits = base(ids).logits
    adapted = PeftModel.from_pretrained(base, final).eval()(ids).logits
    merged_logits = merged(ids).logits
print("ptft" in sys.modules, (merged_logits - adapted).abs().max().item(),
      (merged_logits - base_logits).abs().max().item())
"""
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    imported_ptft, to_peft, to_base = check.stdout.split()
    assert imported_ptft == "False"
    assert float(to_peft) < 1e-4
    assert float(to_base) > 1e-3  # the LoRA update really is in the merged weights


@pytest.mark.parametrize("name, fragment", [("adapter", "cannot be folded into the base"),
                                            ("full", "already a full model")])
def test_merge_refuses_runs_that_are_not_lora(runs, cache_dir, name, fragment):
    result = run_ptft("merge", str(runs[name]), cwd=runs["work"], cache=cache_dir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert not (runs[name] / "merged").exists()


def test_eval_of_a_run_reproduces_its_final_evaluation(runs, cache_dir):
    run_dir = runs["lora"]
    result = run_ptft("eval", str(run_dir), "--json", cwd=runs["work"], cache=cache_dir)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary.get("eval_loss") is not None, "the fine-tuning run had no eval split"
    assert figures["eval_loss"] == pytest.approx(summary["eval_loss"], abs=1e-4)
    assert figures["eval_ppl"] == pytest.approx(math.exp(figures["eval_loss"]))


def test_eval_of_a_model_dir_whose_name_hydra_would_split(runs, cache_dir):
    import shutil
    odd = runs["work"] / "model,v2 (copy)"
    shutil.copytree(runs["pre"] / "final", odd)
    result = run_ptft("eval", str(odd), "--json", "data=docstrings", "data.max_documents=40",
                      cwd=runs["work"], cache=cache_dir)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["eval_loss"] > 0


def test_eval_of_a_classifier_reports_accuracy(runs, cache_dir):
    result = run_ptft("eval", str(runs["cls"]), cwd=runs["work"], cache=cache_dir)
    assert result.returncode == 0, result.stderr
    summary = json.loads((runs["cls"] / "summary.json").read_text())
    accuracy = re.search(r"accuracy\s*│\s*([\d.]+)", result.stdout)
    assert accuracy, result.stdout
    assert float(accuracy.group(1)) == pytest.approx(summary["eval_accuracy"], abs=1e-4)
    assert "loss" in result.stdout and "perplexity" not in result.stdout


def test_eval_with_a_bad_override_exits_2(runs, cache_dir):
    result = run_ptft("eval", str(runs["lora"]), "train.lrr=1", cwd=runs["work"], cache=cache_dir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Did you mean 'lr'?" in result.stderr and "Traceback" not in result.stderr


def test_generate_on_a_missing_directory_exits_2(tmp_path, cache_dir):
    result = run_ptft("generate", str(tmp_path / "nope"), "--prompt", "x", cwd=tmp_path,
                      cache=cache_dir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not a directory" in result.stderr and "Traceback" not in result.stderr


def test_a_checkpoint_given_as_a_model_says_how_to_write_it_as_one(runs, cache_dir):
    """A checkpoint folder is not a model: the message names the command that writes its
    weights as one (resuming without training further), and that command does."""
    from safetensors.torch import load_file

    trained = runs["work"] / "checkpointed"  # TINY saves at step 6: that is the checkpoint
    pre = run_ptft("pretrain", *TINY, "train.max_steps=6", f"run.dir={trained}",
                   cwd=runs["work"], cache=cache_dir)
    assert pre.returncode == 0, pre.stdout + pre.stderr
    checkpoint = trained / "checkpoints" / "step-000006"
    result = run_ptft("generate", str(checkpoint), "--prompt", "x", cwd=runs["work"],
                      cache=cache_dir)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    message = " ".join(result.stderr.split())
    command = re.search(r"ptft (\w+) (run\.resume=\S+ train\.max_steps=\d+) run\.dir=NEW_DIR",
                        message)
    assert command, message
    stage, settings = command.group(1), command.group(2).split()
    exported = runs["work"] / "exported"
    resumed = run_ptft(stage, *TINY, *settings, f"run.dir={exported}", cwd=runs["work"],
                       cache=cache_dir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    # The run ended at that step: the checkpoint's weights are its final model's.
    want = load_file(str(trained / "final" / "model.safetensors"))
    got = load_file(str(exported / "final" / "model.safetensors"))
    assert want.keys() == got.keys() and all(got[k].equal(want[k]) for k in want)
    generated = run_ptft("generate", str(exported), "--prompt", "def f", "--max-new-tokens",
                         "4", cwd=runs["work"], cache=cache_dir)
    assert generated.returncode == 0, generated.stderr


def test_the_checkpoint_hint_quotes_a_path_hydra_or_the_shell_would_split(tmp_path):
    import shlex

    from ptft.errors import UsageError
    from ptft.inference import locate
    checkpoint = tmp_path / "my runs" / "x,y" / "checkpoints" / "step-000006"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("")
    (checkpoint / "state.json").write_text(json.dumps({"step": 6}))
    (checkpoint / "config.yaml").write_text("stage:\n  name: finetune\n")
    with pytest.raises(UsageError) as err:
        locate(str(checkpoint))
    command = re.search(r"ptft finetune (.*) run\.dir=NEW_DIR", str(err.value)).group(1)
    overrides = shlex.split(command)  # what the shell hands ptft
    assert compose("finetune", overrides).run.resume == str(checkpoint)
