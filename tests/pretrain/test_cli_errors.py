"""Bad input to the launchers and tools: one line `error: ...` on stderr naming what is wrong,
exit status 2 for usage and config errors and 1 otherwise; `--debug` shows the traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
CONFIG = str(ROOT / "configs/gpt_tiny.yaml")
TOKENIZER = str(ROOT / "data/tokenizer/spm_bpe_8k.model")
sys.path.insert(0, str(ROOT / "tools"))


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def env_restored():
    # The launcher's main sets HF_*_OFFLINE, DS_ACCELERATOR and launcher variables in os.environ.
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# -- launch/pretrain_*.py (pretrain.train.cli) --------------------------------------------------

def test_no_config_is_a_usage_error(env_restored, capsys, tmp_path):
    from pretrain.train.cli import main

    # The overrides make an old launcher (demo defaults without --config) fail fast instead of training.
    with pytest.raises(SystemExit) as e:
        main([f"output_dir={tmp_path}", "data.tokenizer=/nonexistent.model"], "gpt")
    assert e.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--config is required" in line and "configs/gpt_demo.yaml" in line
    assert not any(tmp_path.iterdir())


def test_no_config_end_to_end(tmp_path):
    proc = subprocess.run([PY, str(ROOT / "launch/pretrain_bert.py"), f"output_dir={tmp_path / 'run'}",
                           "data.tokenizer=/nonexistent.model"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--config is required (e.g. --config configs/bert_demo.yaml)" in one_error_line(proc.stderr)


@pytest.mark.parametrize("override, needles", [
    ("model.overrides.num_layer=3",
     ["'model.overrides.num_layer'", "did you mean 'num_layers'", "valid fields: num_layers, hidden_size"]),
    ("model.overrides.num_layers=abc", ["'model.overrides.num_layers'", "must be int", "'abc'"]),
    ("model.overrides.fused_kernels=1", ["'model.overrides.fused_kernels'", "must be bool or None"]),
    ("model.overrides.hidden_size=30", ["'model.overrides'", "hidden_size 30 is not divisible by num_attention_heads 4"]),
    ("model.preset=dmeo", ["'model.preset'", "did you mean 'demo'"]),
    ("data.split=abc", ["'data.split'", "'abc'", "e.g. '98,1,1'"]),
    ("data.split=1,2,3,4", ["'data.split'", "'1,2,3,4'"]),
    ("data.split=0/0", ["'data.split'", "must not all be 0"]),
])
def test_bad_model_or_split_config_is_one_line(env_restored, capsys, tmp_path, override, needles):
    from pretrain.train.cli import main

    rc = main(["--config", CONFIG, f"output_dir={tmp_path}", f"data.tokenizer={TOKENIZER}", override], "gpt")
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and all(n in line for n in needles), line
    assert not any(tmp_path.iterdir())  # nothing was started


def test_launcher_and_model_kind_must_agree(env_restored, capsys, tmp_path):
    from pretrain.train.cli import main

    rc = main(["--config", CONFIG, f"output_dir={tmp_path}", f"data.tokenizer={TOKENIZER}"], "bert")
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "'model.kind'" in line and "launch/pretrain_gpt.py" in line


def test_debug_shows_the_traceback(env_restored, capsys, tmp_path):
    from pretrain.train.cli import main

    rc = main(["--config", CONFIG, "--debug", f"output_dir={tmp_path}", f"data.tokenizer={TOKENIZER}", "data.split=abc"],
              "gpt")
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("Traceback") and "ConfigError" in err and "'data.split'" in err


def test_valid_spellings_are_accepted():
    from pretrain.config import load_run_config

    for split, stored in (("98/1/1", "98/1/1"), ("100", "100"), ("99, 1", "99, 1"), (".5,.5,0", ".5,.5,0")):
        assert load_run_config(CONFIG, [f"data.tokenizer={TOKENIZER}", f"data.split={split}"]).data.split == stored
    # YAML 1.1 reads 1e-6 as a string; a float field takes it as the number
    cfg = load_run_config(CONFIG, [f"data.tokenizer={TOKENIZER}", "model.overrides.layernorm_epsilon=1e-6"])
    assert cfg.model.overrides["layernorm_epsilon"] == 1e-6


def test_get_preset_names_an_unknown_field():
    from pretrain.models.config import get_preset

    with pytest.raises(ValueError, match=r"'num_layer' is not a field of GPTConfig \(did you mean 'num_layers'\?\)"):
        get_preset("tiny", "gpt", num_layer=2)
    with pytest.raises(ValueError, match="'hidden_dropout' must be float"):
        get_preset("tiny", "gpt", hidden_dropout="high")


# -- the shared helper ----------------------------------------------------------------------------

def test_run_cli_reports_expected_failures_and_keeps_bugs(capsys):
    from pretrain.cli_errors import CommandError, run_cli
    from pretrain.data.readers import DataError

    def fail(e):
        def fn():
            raise e
        return fn

    assert run_cli(fail(DataError("corpus.jsonl:3:\n  invalid JSON"))) == 1
    assert one_error_line(capsys.readouterr().err) == "error: corpus.jsonl:3: invalid JSON"
    assert run_cli(fail(CommandError("validation failed", exit_code=3))) == 3
    assert run_cli(fail(FileNotFoundError("x.bin")), also=(FileNotFoundError,)) == 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(fail(DataError("bad")), raise_exit=True)
    assert e.value.code == "error: bad"
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda: 1 / 0)


# -- tools/eval_zeroshot.py -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_export(tmp_path_factory):
    """Looks like a GPT export to the up-front checks; any attempt to load it would fail."""
    d = tmp_path_factory.mktemp("fake_export")
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    (d / "model.safetensors").write_bytes(b"")
    return d


def _eval(argv, capsys):
    pytest.importorskip("lm_eval")
    import eval_zeroshot

    try:
        rc = eval_zeroshot.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, one_error_line(capsys.readouterr().err)


def test_eval_missing_or_foreign_hf_directory(tmp_path, capsys):
    rc, line = _eval(["--hf", tmp_path / "nope"], capsys)
    assert rc == 1 and f"{tmp_path / 'nope'}: no such directory" in line
    (tmp_path / "notes.json").write_text("{}")
    rc, line = _eval(["--hf", tmp_path], capsys)
    assert rc == 1 and str(tmp_path) in line and "config.json" in line
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MegatronBertForMaskedLM"]}))
    rc, line = _eval(["--hf", tmp_path], capsys)
    assert rc == 1 and "MegatronBertForMaskedLM is not a causal LM" in line


def test_eval_bad_checkpoint(tmp_path, capsys):
    rc, line = _eval(["--checkpoint", tmp_path / "step_00000009"], capsys)
    assert rc == 1 and f"checkpoint {tmp_path / 'step_00000009'}: no such directory" in line
    ckpt = tmp_path / "lonely" / "step_00000002"  # a checkpoint without its run's config.json
    ckpt.mkdir(parents=True)
    (ckpt / "trainer.json").write_text(json.dumps({"step": 2}))
    rc, line = _eval(["--checkpoint", ckpt], capsys)
    assert rc == 1 and "no run config.json found" in line and "--run-config" in line


@pytest.mark.parametrize("args, needles", [
    (["--tasks", "heldout_clozee"], ["unknown task 'heldout_clozee'", "did you mean 'heldout_cloze'"]),
    # a standard task whose dataset is not in the local cache (evaluation is offline)
    (["--tasks", "heldout_ppl,lambada_openai"], ["task 'lambada_openai'", "cannot load its data"]),
    (["--include-path", "/nonexistent/tasks"], ["include path /nonexistent/tasks: no such directory"]),
    (["--output", "/nonexistent/dir/results.json"], ["--output /nonexistent/dir/results.json", "not a directory"]),
])
def test_eval_bad_tasks_and_paths(fake_export, capsys, args, needles):
    rc, line = _eval(["--hf", fake_export, "--limit", "2", *args], capsys)
    assert rc == 1 and all(n in line for n in needles), line


@pytest.mark.parametrize("args, needle", [
    (["--limit", "0"], "argument --limit: must be positive, got 0"),
    (["--limit", "-3"], "argument --limit: must be positive, got -3"),
    (["--tasks", " , "], "argument --tasks: no task names"),
])
def test_eval_usage_errors(fake_export, capsys, args, needle):
    rc, line = _eval(["--hf", fake_export, *args], capsys)
    assert rc == 2 and needle in line, line


def test_eval_debug_and_end_to_end(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    import eval_zeroshot

    assert eval_zeroshot.main(["--hf", str(tmp_path / "nope"), "--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "ExportError" in err
    proc = subprocess.run([PY, str(ROOT / "tools/eval_zeroshot.py"), "--hf", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and str(tmp_path / "nope") in one_error_line(proc.stderr)


# -- the other tools ------------------------------------------------------------------------------

def test_summarize_run_and_convert_to_hf(tmp_path, capsys):
    import convert_to_hf
    import summarize_run

    assert summarize_run.main([str(tmp_path)]) == 1
    assert f"no metrics.jsonl in {tmp_path}" in one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as e:
        summarize_run.main([])
    assert e.value.code == 2 and "run_dir" in one_error_line(capsys.readouterr().err)
    assert convert_to_hf.main([str(tmp_path / "nope"), str(tmp_path / "out"), "--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and str(tmp_path / "nope") in err


def test_preprocess_debug(tmp_path, capsys):
    import preprocess_data

    with pytest.raises(SystemExit) as e:
        preprocess_data.main(["--input", str(tmp_path / "missing.jsonl"), "--tokenizer-model", TOKENIZER,
                              "--output-prefix", str(tmp_path / "out"), "--quiet", "--debug"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "missing.jsonl" in err
