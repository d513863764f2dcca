"""Sequence classifiers on a real tiny model: the padding the head skips, and label names that
stay with a LoRA/adapter classifier's final/ directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_ptft, tiny_llama
from ptft.data.classification import ClassificationExamples, save_examples
from ptft.data.tokenizer import load_tokenizer, train_bpe

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 10)))) for _ in range(n)]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny Llama model directory as a user brings one: its config.json names no
    pad_token_id, and its tokenizer pads with <|pad|> (id 1), not with EOS (id 0)."""
    path = tmp_path_factory.mktemp("base")
    tokenizer = train_bpe(texts(300) * 2, 300)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1)
    model = tiny_llama(vocab_size=len(tokenizer), eos_token_id=0, bos_token_id=0)
    model.config.pad_token_id = None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert json.loads((path / "config.json").read_text()).get("pad_token_id") is None
    return path


def test_classifier_reads_the_same_token_alone_and_in_a_padded_batch(base_dir, tmp_path):
    from ptft.models import load_model

    tokenizer = load_tokenizer(base_dir)
    torch.manual_seed(0)  # the new head's init
    model = load_model(str(base_dir), task="classification", labels=["no", "yes"]).eval()
    short, long = (tokenizer(t)["input_ids"] for t in ("alpha beta", "gamma delta " * 6))
    save_examples(tmp_path, [np.asarray(short), np.asarray(long)], np.asarray([0, 1]), np.int64)
    examples = ClassificationExamples(tmp_path, tokenizer.pad_token_id)  # the training collator
    with torch.no_grad():
        alone = model(**examples.collate([0]).inputs).logits[0]
        batched = model(**examples.collate([0, 1]).inputs).logits[0]  # short row is padded
    torch.testing.assert_close(batched, alone)


CLASSIFY = ["stage.task=classification", "data=jsonl", "train.seq_len=32",
            "train.batch_size=4", "train.max_steps=2", "train.eval_every=0",
            "train.save_every=0", "data.eval_fraction=0.2"]


def write_records(path: Path, labels: tuple[str, str]) -> None:
    rows = [{"text": text, "label": labels[i % 2]} for i, text in enumerate(texts(40, seed=1))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_peft_classifier_keeps_its_label_names_when_the_data_changes(base_dir, tmp_path,
                                                                     cache_dir, method):
    from ptft.inference import classifier_labels, locate

    data = tmp_path / "cls.jsonl"
    write_records(data, ("negative", "positive"))
    run = tmp_path / "run"
    result = run_ptft("finetune", f"model.path={base_dir}", f"data.paths=[{data}]",
                      f"method={method}", *CLASSIFY, f"run.dir={run}", cwd=tmp_path,
                      cache=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((run / "final" / "labels.json").read_text()) == ["negative", "positive"]

    # The names are the head's, not whatever the data file says today.
    write_records(data, ("cold", "hot"))
    shown = run_ptft("generate", str(run), "--prompt", "alpha beta", cwd=tmp_path, cache=cache_dir)
    assert shown.returncode == 0, shown.stderr
    predicted = re.search(r"predicted label: (\S+)", shown.stdout)
    assert predicted and predicted.group(1) in ("negative", "positive"), shown.stdout
    data.unlink()  # moved or deleted: nothing to rebuild the names from
    assert classifier_labels(locate(str(run))) == ["negative", "positive"]
