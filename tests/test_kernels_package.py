"""pagedserve installs under its own namespace, so it never writes over another distribution.

Top-level ``common`` and ``kernels`` are other projects' names on the package index (``kernels``
is Hugging Face's hub-kernel loader, which transformers probes for). These tests install a real
wheel of ours beside PyPI's ``kernels`` and check that both keep their files.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils.import_utils import is_kernels_available

from tiny_models import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("common", "scheduler_svc", "executor_svc", "kernels", "benchmarks")


def _pip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          cwd=cwd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO),
                 cwd=out)
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("pagedserve-*.whl")
    return path


def test_wheel_writes_only_under_the_pagedserve_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert tops == {"pagedserve", dist_info}, tops
    for folder in FOLDERS:
        assert f"pagedserve/{folder}/__init__.py" in names, folder
    sources = {"attention.c", "layer.c", "gemm.c", "vec.h"}
    assert {f"pagedserve/executor_svc/csrc/{name}" for name in sources} <= set(names)


def test_wheel_holds_every_module_of_the_source_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in FOLDERS:
        for module in (REPO / folder).rglob("*.py"):
            assert f"pagedserve/{module.relative_to(REPO).as_posix()}" in names, module


def test_installs_beside_the_hub_kernels_package_without_touching_its_files(wheel, tmp_path):
    target = tmp_path / "site"
    hub = _pip("install", "--no-deps", "--target", str(target), "kernels", cwd=tmp_path)
    if hub.returncode != 0:
        pytest.skip(f"the package index is out of reach: {hub.stderr.strip()[-300:]}")
    before = _record_hashes(target, "kernels")
    ours = _pip("install", "--no-deps", "--target", str(target), "--upgrade", str(wheel),
                cwd=tmp_path)
    assert ours.returncode == 0, ours.stderr
    assert _record_hashes(target, "kernels") == before
    assert all(_sha256(target / path) == digest for path, digest in before.items())
    assert not (target / "common").exists()
    # Each name resolves to its own distribution's files.
    code = ("import importlib.util as u\n"
            "print(u.find_spec('kernels').origin)\n"
            "print(u.find_spec('pagedserve.kernels').origin)")
    found = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, check=True,
                           capture_output=True, text=True, env={"PYTHONPATH": str(target)})
    hub_origin, our_origin = found.stdout.split()
    assert Path(hub_origin) == target / "kernels" / "__init__.py"
    assert Path(our_origin) == target / "pagedserve" / "kernels" / "__init__.py"


def test_outside_the_source_tree_no_top_level_name_of_ours_is_importable(tmp_path):
    """A bare name of ours resolves to another distribution (Hugging Face's `kernels`, which
    transformers 5.25 on requires) or to nothing, never to our folder."""
    code = ("import importlib.util as u\n"
            f"for m in {FOLDERS!r}:\n"
            "    spec = u.find_spec(m)\n"
            f"    assert spec is None or not spec.origin.startswith({str(REPO)!r} + '/' + m),"
            " spec\n"
            "print(u.find_spec('pagedserve.kernels').origin)")
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True,
                           capture_output=True, text=True)
    assert Path(found.stdout.strip()) == REPO / "kernels" / "__init__.py"


def test_an_installed_executor_takes_a_checkout_root_off_sys_path(wheel, tmp_path):
    """pagedserve installed from a wheel, run from a checkout's root (an image's WORKDIR holds
    the tree it installed from): importing the executor drops that root from sys.path all the
    same, so a bare `kernels` is never our folder."""
    target = tmp_path / "site"
    ours = _pip("install", "--no-deps", "--target", str(target), str(wheel), cwd=tmp_path)
    assert ours.returncode == 0, ours.stderr
    our_kernels = str(REPO / "kernels" / "__init__.py")
    code = textwrap.dedent(f"""
        import importlib.util
        def bare_kernels():
            spec = importlib.util.find_spec("kernels")
            return spec and spec.origin
        assert bare_kernels() == {our_kernels!r}, "the checkout is first on sys.path"
        import pagedserve.executor_svc
        assert pagedserve.executor_svc.__file__.startswith({str(target)!r})
        assert bare_kernels() != {our_kernels!r}
        """)
    subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, check=True,
                   env={"PYTHONPATH": str(target)})


def test_transformers_does_not_take_our_kernels_for_the_hub_package():
    """transformers probes for Hugging Face's `kernels` by import name. Where the hub's
    distribution is installed the name is its package; where it is not, ours (no version,
    in the pagedserve distribution) does not pass the probe."""
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        is_kernels_available.cache_clear()  # probe afresh, with ours installed
        assert not is_kernels_available()
    else:
        import kernels
        assert Path(kernels.__file__).parent != REPO / "kernels"


def test_transformers_still_loads_and_runs_a_model(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model("llama", tmp_path))
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()


def _record_hashes(site: Path, dist: str) -> dict[str, str]:
    """A distribution's files under ``site`` and their sha256 as its RECORD lists them
    (console scripts, listed outside it, left out)."""
    (record,) = site.glob(f"{dist}-*.dist-info/RECORD")
    rows = csv.reader(record.read_text().splitlines())
    return {path: digest.removeprefix("sha256=") for path, digest, _ in rows
            if digest and not path.startswith("..")}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
