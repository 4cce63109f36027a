"""A source checkout's root kept off ``sys.path``.

``python -m`` and ``python -c`` put the working directory first on ``sys.path`` (unless ``-P``).
Run from a checkout's root, as the tests and the services they and ``pagedserve up`` start are,
that makes our top-level folders importable under their bare names, and two of those are other
distributions' names on the package index: ``kernels`` (Hugging Face's hub-kernel loader, which
transformers 5.25 and later import) and ``common``. Importing transformers there would get our
``kernels/`` and fail. pagedserve imports itself only as ``pagedserve.*`` and never imports a
user's module by name, so the root has no business on ``sys.path``.
"""
from __future__ import annotations

import sys
from pathlib import Path

# The folder holding common/, kernels/ and the services: a checkout's root, or in an installed
# wheel pagedserve's own folder (on no sys.path, so dropping it changes nothing there).
CHECKOUT = Path(__file__).resolve().parents[1]


def drop_checkout_from_path() -> None:
    """Remove every ``sys.path`` entry naming the checkout's root (``''`` among them when the
    working directory is that root). Call it before importing a library that imports a bare
    name of ours; a module already imported under such a name stays as it is."""
    sys.path[:] = [entry for entry in sys.path if not _names_checkout(entry)]


def _names_checkout(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == CHECKOUT
    except (OSError, RuntimeError):  # an unreadable or looping path names nothing of ours
        return False
