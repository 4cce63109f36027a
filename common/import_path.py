"""pagedserve source trees kept off ``sys.path``.

``python -m`` and ``python -c`` put the working directory first on ``sys.path`` (unless ``-P``).
Run from a checkout's root, as the tests and the services they and ``pagedserve up`` start are,
that makes our top-level folders importable under their bare names, and two of those are other
distributions' names on the package index: ``kernels`` (Hugging Face's hub-kernel loader, which
transformers 5.25 and later import) and ``common``. Importing transformers there would get our
``kernels/`` and fail. pagedserve imports itself only as ``pagedserve.*`` (an editable install
or a wheel, wherever the tree lies) and never imports a user's module by name, so no source
tree of ours has any business on ``sys.path``.
"""
from __future__ import annotations

import sys
from pathlib import Path

# The top-level packages that make a folder a pagedserve source tree (a checkout's root).
TOP_LEVEL = ("common", "kernels", "executor_svc", "scheduler_svc")


def drop_checkout_from_path() -> None:
    """Remove every ``sys.path`` entry that is a pagedserve source tree (``''`` among them
    when the working directory is one). Call it before importing a library that imports a
    bare name of ours; a module already imported under such a name stays as it is."""
    sys.path[:] = [entry for entry in sys.path if not is_source_tree(entry)]


def is_source_tree(entry: str) -> bool:
    """Whether the ``sys.path`` entry is a folder holding our top-level packages."""
    folder = Path(entry or ".")
    try:
        return all((folder / name / "__init__.py").is_file() for name in TOP_LEVEL)
    except OSError:  # an unreadable path holds nothing of ours
        return False
