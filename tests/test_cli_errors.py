"""Errors a user can cause: one clear line naming the thing and the fix, exit code 2,
no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import TINY, run_ptft


def assert_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("override, fragments", [
    ("train.lrr=1", ["unknown key 'train.lrr'", "Did you mean 'lr'?"]),
    ("+train.lrr=1", ["unknown key 'train.lrr'", "Did you mean 'lr'?"]),
    ("model=nope", ["unknown model option 'nope'", "llama-tiny"]),
    ("model=llama-smal", ["Did you mean 'llama-small'?"]),
    ("trian.lr=1", ["unknown key 'trian.lr'", "Did you mean 'train'?"]),
    ("train.batch_size=many", ["train.batch_size"]),
    ("train.precision=fp8", ["train.precision", "fp32"]),
])
def test_bad_overrides_exit_2_before_any_work(override, fragments, tmp_path, cache_dir):
    result = run_ptft("pretrain", override, cwd=tmp_path, cache=cache_dir)
    assert_usage_error(result, *fragments)
    assert not (tmp_path / "runs").exists()  # rejected before a run directory was made


def test_config_command_reports_the_same_errors(tmp_path, cache_dir):
    assert_usage_error(run_ptft("config", "train.lrr=1", cwd=tmp_path, cache=cache_dir),
                       "Did you mean 'lr'?")
    assert_usage_error(run_ptft("config", "finetuning", cwd=tmp_path, cache=cache_dir),
                       "unknown stage")


def test_missing_data_file(tmp_path, cache_dir):
    result = run_ptft("pretrain", *TINY, "data=jsonl", "data.paths=[nowhere.jsonl]",
                      "run.dir=r", cwd=tmp_path, cache=cache_dir)
    assert_usage_error(result, "nowhere.jsonl")


def test_wrong_text_column(tmp_path, cache_dir):
    (tmp_path / "c.jsonl").write_text('{"body": "some text here"}\n' * 20)
    result = run_ptft("pretrain", *TINY, "data=jsonl", "data.paths=[c.jsonl]", "run.dir=r",
                      cwd=tmp_path, cache=cache_dir)
    assert_usage_error(result, "no column 'text'", "body", "data.text_field")


def test_seq_len_longer_than_the_model_supports(tmp_path, cache_dir):
    result = run_ptft("pretrain", *TINY, "model.max_position_embeddings=16", "run.dir=r",
                      cwd=tmp_path, cache=cache_dir)
    assert_usage_error(result, "train.seq_len=32", "max_position_embeddings=16")


def test_model_path_that_is_not_a_model_directory(tmp_path, cache_dir):
    (tmp_path / "notamodel").mkdir()
    result = run_ptft("pretrain", *TINY, "model.path=notamodel", "run.dir=r",
                      cwd=tmp_path, cache=cache_dir)
    assert_usage_error(result, "model.path=notamodel", "config.json")


def test_hub_dataset_offline_fails_fast(tmp_path, cache_dir):
    started = time.monotonic()
    result = run_ptft("pretrain", *TINY, "data=hub", "data.name=someone/no-such-dataset",
                      "run.dir=r", cwd=tmp_path, cache=cache_dir,
                      env={"HF_ENDPOINT": "http://127.0.0.1:9"})  # nothing listens there
    assert_usage_error(result, "data.name=someone/no-such-dataset", "data=jsonl")
    assert time.monotonic() - started < 60  # the libraries' own retries would take minutes


def test_help_and_config_do_not_import_torch(tmp_path):
    code = ("import sys\nfrom ptft.cli import app\n"
            "for argv in (['--help'], ['config'], ['pretrain', '--help']):\n"
            "    try:\n        app(argv)\n    except SystemExit:\n        pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.stdout.strip().endswith("NO-TORCH"), result.stdout + result.stderr


@pytest.mark.parametrize("name", ["../outside", "a/b", "..", ".hidden"])
def test_run_names_cannot_escape_the_output_root(name, tmp_path, cache_dir):
    result = run_ptft("pretrain", *TINY, f"run.name={name}", cwd=tmp_path, cache=cache_dir)
    assert_usage_error(result, "run.name")
    assert not (tmp_path / "outside").exists() and not (tmp_path / "runs").exists()


def test_secret_looking_keys_are_redacted():
    from ptft.errors import redact_secrets
    tree = {"logger": {"api_key": "abc", "hf_token": "t", "db_password": "p", "tokens": 5},
            "items": [{"secret": "s"}]}
    assert redact_secrets(tree) == {"logger": {"api_key": "***", "hf_token": "***",
                                               "db_password": "***", "tokens": 5},
                                    "items": [{"secret": "***"}]}


BAD_INPUTS = [
    # (files to create, overrides, words the message must contain)
    ({"empty.jsonl": ""}, ["data=jsonl", "data.paths=[empty.jsonl]"], ["empty.jsonl", "empty"]),
    ({"blank.txt": "   \n"}, ["data=text-files", "data.paths=[blank.txt]"], ["no non-empty"]),
    ({"latin1.txt": "caf\xe9".encode("latin-1")}, ["data=text-files", "data.paths=[latin1.txt]"],
     ["latin1.txt", "UTF-8"]),
    ({"cols.csv": "body\nhello world\n"}, ["data=csv", "data.paths=[cols.csv]"],
     ["cols.csv", "no column 'text'", "body"]),
    ({"num.jsonl": '{"text": 5}\n'}, ["data=jsonl", "data.paths=[num.jsonl]"], ["row 0", "int"]),
    ({}, ["data=parquet", "data.paths=[missing/*.parquet]"], ["missing/*.parquet"]),
    # Arrow's JSON reader keeps undecodable bytes; they fail later, when rows become strings.
    ({"latin1.jsonl": '{"text": "caf\xe9"}\n'.encode("latin-1")},
     ["data=jsonl", "data.paths=[latin1.jsonl]"], ["latin1.jsonl", "UTF-8"]),
    # The parser's own reason and row, not datasets' "An error occurred while generating".
    ({"cut.jsonl": '{"text": "a"}\n{"text": "b\n'}, ["data=jsonl", "data.paths=[cut.jsonl]"],
     ["cut.jsonl", "row 1"]),
    # Evaluation files only go with training files: an embedded corpus would ignore them.
    ({"eval.txt": "held out\n"}, ["data.eval_paths=[eval.txt]"], ["data.eval_paths"]),
]


@pytest.mark.parametrize("files, overrides, words", BAD_INPUTS,
                         ids=["empty-file", "blank-text", "non-utf8", "missing-column",
                              "non-text-column", "no-such-file", "non-utf8-jsonl",
                              "malformed-jsonl", "eval-files-without-train-files"])
def test_bad_pretraining_inputs(files, overrides, words, tmp_path, cache_dir):
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    result = run_ptft("pretrain", *TINY, *overrides, "run.dir=r", cwd=tmp_path, cache=cache_dir)
    assert_usage_error(result, *words)
    assert not (tmp_path / "r").exists()  # a run that could not start leaves nothing behind


def test_a_run_dir_the_user_made_survives_a_failed_start(tmp_path, cache_dir):
    (tmp_path / "mine").mkdir()
    result = run_ptft("pretrain", *TINY, "data=jsonl", "data.paths=[nowhere.jsonl]",
                      "run.dir=mine", cwd=tmp_path, cache=cache_dir)
    assert_usage_error(result, "nowhere.jsonl")
    assert (tmp_path / "mine").is_dir()


def test_a_second_ctrl_c_is_one_line_and_exit_130(capsys):
    import typer

    from ptft.cli import _usage_errors
    with pytest.raises(typer.Exit) as info:
        with _usage_errors():
            raise KeyboardInterrupt("interrupted by a second Ctrl-C during step 8, without saving")
    assert info.value.exit_code == 130
    assert "interrupted:" in capsys.readouterr().err


@pytest.mark.parametrize("value, offline", [("1", True), ("on", True), ("YES", True),
                                            ("0", False), ("off", False), ("no", False)])
def test_hf_hub_offline_is_read_as_huggingface_hub_reads_it(value, offline, monkeypatch):
    from ptft import hub
    probed = []
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: probed.append(1) or True)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub.prepare_for_hub() is not offline
    assert bool(probed) is not offline  # online settings look for the hub; offline ones don't
