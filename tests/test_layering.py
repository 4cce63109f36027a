"""The folders are the architecture: the scheduler, the gateway and the shared base never
import torch, and no module imports one that imports it back."""
import ast
import importlib.util
import subprocess
import sys
import textwrap

from services import ROOT

TORCH_FREE = ["pagedserve.scheduler_svc.service", "pagedserve.scheduler_svc.cli",
              "pagedserve.common.client", "pagedserve.common.cli",
              "pagedserve.common.up", "pagedserve.common.protocol", "pagedserve.benchmarks.cli",
              "pagedserve.gateway.app", "pagedserve.gateway.cli"]


def test_scheduler_gateway_and_common_import_no_torch():
    code = (f"import sys\nfor m in {TORCH_FREE!r}: __import__(m)\n"
            "bad = sorted(m for m in ('torch', 'transformers', 'pagedserve.executor_svc')\n"
            "             if m in sys.modules)\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_the_gateway_imports_neither_service():
    code = ("import sys\nimport pagedserve.gateway.app, pagedserve.gateway.cli\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('pagedserve.scheduler_svc',\n"
            "                                                     'pagedserve.executor_svc')))\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_cli_help_lists_commands_without_importing_torch():
    code = ("import sys\nfrom click.testing import CliRunner\n"
            "from pagedserve.common.cli import main\n"
            "out = CliRunner().invoke(main, ['--help']).output\n"
            "assert 'prepare-model' in out and 'scheduler' in out, out\n"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def _module_imports(path, module: str, is_package: bool) -> set[str]:
    """The pagedserve modules that ``module`` imports when it is loaded: its module-level
    imports, not those inside functions (imported when called) or under TYPE_CHECKING."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([package.rsplit(".", node.level - 1)[0], base]).rstrip(".")
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_no_import_circle_among_our_modules():
    modules = {}
    for folder in ("common", "scheduler_svc", "executor_svc", "kernels", "benchmarks", "gateway"):
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join(("pagedserve",) + (parts[:-1] if is_package else parts))
            modules[name] = (path, is_package)
    graph = {name: sorted(m for m in _module_imports(path, name, is_package)
                          if m in modules and m != name)
             for name, (path, is_package) in modules.items()}
    # A package importing its own submodules is how Python loads them, not a circle.
    graph = {name: [m for m in deps if not m.startswith(name + ".")]
             for name, deps in graph.items()}
    circles = []

    def visit(name: str, path: list[str], done: set[str]) -> None:
        if name in path:
            circles.append(path[path.index(name):] + [name])
            return
        if name in done:
            return
        for dep in graph[name]:
            visit(dep, path + [name], done)
        done.add(name)

    done: set[str] = set()
    for name in graph:
        visit(name, [], done)
    assert not circles, circles


def test_the_executor_imports_from_a_checkout_root():
    """Run from a checkout's root (``python -m``, as the tests and the services they start
    are), the top-level ``kernels/`` folder is importable as ``kernels``: a dependency that
    imports a package of that name (transformers 5.25 imports Hugging Face's ``kernels``)
    would get ours and fail. The executor, transformers with it, must import there."""
    code = ("import pagedserve.executor_svc.model, pagedserve.executor_svc.rope\n"
            "import transformers.models.llama.modeling_llama")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


OUR_BARE_NAMES = ("kernels", "common", "executor_svc")


def _ours(name: str) -> bool:
    """Whether the bare module name resolves to the checkout's own folder."""
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.origin == str(ROOT / name / "__init__.py")


def test_importing_the_executor_takes_the_checkout_root_off_sys_path():
    """Whichever transformers is installed: once the executor package is imported, no bare
    name of ours resolves to the checkout, though the checkout was first on sys.path."""
    code = textwrap.dedent(f"""
        import importlib.util, sys
        from pathlib import Path
        def ours(name):
            spec = importlib.util.find_spec(name)
            return spec is not None and spec.origin == str(Path({str(ROOT)!r}, name,
                                                                "__init__.py"))
        assert all(ours(name) for name in {OUR_BARE_NAMES!r}), "on sys.path at first"
        import pagedserve.executor_svc
        assert not any(ours(name) for name in {OUR_BARE_NAMES!r}), sys.path
        """)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_the_test_process_has_the_checkout_root_off_sys_path():
    """`python -m pytest` from the root put it on sys.path; conftest takes it off before any
    test module imports transformers."""
    assert not any(_ours(name) for name in OUR_BARE_NAMES), sys.path
