"""End to end: `ptft pretrain` then `ptft finetune` with every method, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import TINY, run_ptft

# Fine-tuning on the embedded docstrings SFT data: the first modules' functions.
TINY_SFT = ["data=docstrings", "data.max_documents=120", "data.eval_fraction=0.3",
            "train.seq_len=384", "train.batch_size=4", "train.max_steps=8", "train.eval_every=8", "train.save_every=0", "train.log_every=4",
            "train.eval_batches=2", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, cache_dir):
    """A directory holding one finished tiny pre-training run under runs/pretrain/."""
    work = tmp_path_factory.mktemp("finetune")
    result = run_ptft("pretrain", *TINY, "train.max_steps=6", "train.save_every=0",
                      cwd=work, cache=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return work


def finetune(workspace, cache_dir, name: str, *overrides: str):
    result = run_ptft("finetune", *TINY_SFT, f"run.dir=runs/finetune/{name}", *overrides,
                      cwd=workspace, cache=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = workspace / "runs" / "finetune" / name
    return run_dir, json.loads((run_dir / "summary.json").read_text()), result.stdout


@pytest.mark.parametrize("method, lr, final_files", [
    ("full", "3e-3", ["config.json", "model.safetensors"]),
    ("lora", "1e-2", ["adapter_config.json", "adapter_model.safetensors"]),
    ("adapter", "1e-2", ["ptft_adapter_config.json", "adapter_model.safetensors"]),
])
def test_each_method_learns_and_saves_its_own_kind_of_final(workspace, cache_dir, method, lr,
                                                            final_files):
    run_dir, summary, stdout = finetune(workspace, cache_dir, method, f"method={method}",
                                        f"train.lr={lr}")
    for name in [*final_files, "tokenizer.json", "chat_template.jinja"]:
        assert (run_dir / "final" / name).exists(), name
    assert summary["task"] == "sft" and summary["method"] == method
    assert summary["eval_loss"] < summary["first_eval_loss"]
    # packed samples attend one at a time on a CPU, in fp32 and under bf16 autocast alike
    assert summary["packed_attention"] is True
    assert f"method {method}" in stdout and "trainable (" in stdout
    if method != "full":
        assert summary["trainable_parameters"] < 0.25 * summary["parameters"]
    # The base was found by model.path=latest: the newest finished pre-training run.
    config = (run_dir / "config.yaml").read_text()
    assert "/runs/pretrain/" in config and "path: latest" not in config


def test_lora_final_loads_with_plain_peft(workspace, cache_dir):
    run_dir, _, _ = finetune(workspace, cache_dir, "lora-peft", "method=lora", "train.max_steps=2")
    code = f"""
import sys, json, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
final = {str(run_dir / 'final')!r}
base_path = json.load(open(final + '/adapter_config.json'))['base_model_name_or_path']
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), final)
base = AutoModelForCausalLM.from_pretrained(base_path)
ids = torch.tensor([[5, 6, 7, 8, 9]])
diff = (model(ids).logits - base(ids).logits).abs().max().item()
print('ptft' in sys.modules, diff > 0)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]  # loaded without ptft; the adapter acts


@pytest.mark.parametrize("method", ["ia3", "prompt_tuning"])
def test_other_peft_methods_run(workspace, cache_dir, method):
    run_dir, summary, _ = finetune(workspace, cache_dir, method, f"method={method}",
                                   "train.max_steps=2")
    assert (run_dir / "final" / "adapter_config.json").exists()
    assert summary["trainable_parameters"] < summary["parameters"]
    # prompt tuning's virtual tokens shift every position: the block-diagonal mask stays
    assert summary["packed_attention"] is (method == "ia3")


def test_classification_reports_accuracy(workspace, cache_dir):
    run_dir, summary, stdout = finetune(workspace, cache_dir, "topics", "data=stdlib-topics",
                                        "data.max_documents=400", "train.seq_len=64",
                                        "method=lora", "train.max_steps=4", "train.eval_every=2")
    assert summary["task"] == "classification"
    assert 0.0 <= summary["eval_accuracy"] <= 1.0
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("eval_accuracy" in r for r in rows if r["kind"] == "eval")
    assert "labels" in stdout
    config = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"


def test_finetune_without_a_pretrained_model_says_what_to_run(tmp_path, cache_dir):
    result = run_ptft("finetune", *TINY_SFT, cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 2
    assert "ptft pretrain" in result.stderr and "model.path" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "finetune").exists()  # nothing written


def test_pretraining_data_is_refused_for_finetuning(tmp_path, cache_dir):
    result = run_ptft("finetune", "data=python-docs", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 2 and "data=docstrings" in result.stderr


@pytest.mark.parametrize("records, overrides, words", [
    ([{"question": "a", "answer": "b"}] * 20, [], ["no 'prompt'", "question", "data.prompt_field"]),
    ([{"prompt": "word " * 400, "response": "x"}] * 20, ["train.seq_len=64"],
     ["no training sample", "train.seq_len"]),
    ([{"text": "some words", "label": "only-one"}] * 20, ["stage.task=classification"],
     ["at least two labels"]),
], ids=["missing-prompt-column", "every-response-cut-off", "one-label"])
def test_bad_finetuning_records(workspace, cache_dir, tmp_path, records, overrides, words):
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_ptft("finetune", *TINY_SFT, "data=jsonl", f"data.paths=[{tmp_path / 'sft.jsonl'}]",
                      *overrides, "run.dir=bad", cwd=workspace, cache=cache_dir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    assert not (workspace / "bad").exists()
