"""A model's sampling defaults, from its generation_config.json, as vLLM's default
``--generation-config auto``: what a request leaves unset takes the model's value."""
from __future__ import annotations

import json
from pathlib import Path

from pagedserve.common.sampling import MODEL_DEFAULTS, SamplingParams

# generation_config.json's names for the fields of MODEL_DEFAULTS: transformers' only differs
# for the output length.
_CONFIG_NAMES = {("max_new_tokens" if name == "max_tokens" else name): name
                 for name in MODEL_DEFAULTS}


def sampling_defaults(model_dir: str | Path) -> dict:
    """The defaults the model directory's generation_config.json sets, by ``SamplingParams``
    field (keys of ``MODEL_DEFAULTS``); none without the file. A value that ``SamplingParams``
    refuses is a ``ValueError`` naming the file."""
    path = Path(model_dir) / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    defaults = {ours: config[theirs] for theirs, ours in _CONFIG_NAMES.items()
                if config.get(theirs) is not None}
    try:
        SamplingParams(**defaults)
    except ValueError as exc:
        raise ValueError(f"{path} sets a sampling default pagedserve refuses: {exc}") from None
    return defaults
