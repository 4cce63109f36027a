"""The block manager is the only door to the blocks: its pools, tables and prefix cache are
private, and no module outside it (and the modules it owns: the block pool, the prefix cache
and their read-only snapshots) reads them or even imports their types."""
import ast

from services import ROOT

from pagedserve.scheduler_svc.block_manager import BlockManager

PACKAGES = ("common", "scheduler_svc", "executor_svc", "kernels", "benchmarks")
OWNED = ("block_pool", "prefix_cache")  # modules only the block manager's own may import
OWNERS = {ROOT / "scheduler_svc" / f"{name}.py"
          for name in ("block_manager", "block_snapshot", *OWNED)}


def private_state() -> set[str]:
    """The private attributes ``BlockManager.__init__`` sets."""
    tree = ast.parse((ROOT / "scheduler_svc" / "block_manager.py").read_text())
    init = next(node for node in ast.walk(tree)
                if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    targets = [target for node in ast.walk(init) if isinstance(node, (ast.Assign, ast.AnnAssign))
               for target in (node.targets if isinstance(node, ast.Assign) else [node.target])]
    return {t.attr for t in targets if isinstance(t, ast.Attribute) and t.attr.startswith("_")}


def reaches_in(path, private: set[str]) -> list[str]:
    """Where ``path`` reads the block manager's private state or imports what it owns."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Attribute) and node.attr in private
                and not (isinstance(node.value, ast.Name) and node.value.id == "self")):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} reads .{node.attr}")
        modules = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                   else [alias.name for alias in node.names] if isinstance(node, ast.Import)
                   else [])
        found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {module}"
                  for module in modules if module.rsplit(".", 1)[-1] in OWNED]
    return found


def test_no_module_outside_the_block_manager_reads_its_pools_or_tables():
    private = private_state()
    assert {"_device", "_cpu", "_tables", "_swapped", "_prefix_cache"} <= private
    paths = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
             if path not in OWNERS]
    assert len(paths) > 30
    assert [hit for path in paths for hit in reaches_in(path, private)] == []


def test_the_block_manager_shows_only_settings_and_answers_the_rest():
    public = {name: value for name, value in vars(BlockManager(4, 8, 8)).items()
              if not name.startswith("_")}
    assert public == {"block_size": 4, "enable_prefix_caching": True}
