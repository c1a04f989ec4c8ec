"""The layers of DESIGN.md §2 as code: the import contracts in pyproject.toml hold, no module of
dip_jax is in an import cycle, and both checks fail on a copy of the package that breaks them."""
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

# Both checks run in a fresh interpreter on the package found first on PYTHONPATH: they read
# whatever copy of dip_jax the path names (the tree under test, or a broken copy of it).
CYCLES = textwrap.dedent("""
    import importlib.util, sys
    import grimp

    origin = importlib.util.find_spec("dip_jax").origin
    assert origin.startswith(sys.argv[1]), f"reading {origin}, not the tree under {sys.argv[1]}"
    graph = grimp.build_graph("dip_jax", cache_dir=None)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):                    # Tarjan: every strongly connected set of modules
        index[v] = low[v] = len(index)
        stack.append(v); on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop()); on_stack.discard(comp[-1])
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for m in sorted(edges):
        if m not in index:
            visit(m)
    for c in cycles:
        print("import cycle: " + " <-> ".join(c))
    sys.exit(1 if cycles else 0)
""")


def _run(tree: pathlib.Path, *cmd) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "COLUMNS": "200"}
    return subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=300)


def contracts(tree: pathlib.Path, *ids: str) -> subprocess.CompletedProcess:
    lint = pathlib.Path(sys.executable).parent / "lint-imports"
    limit = [a for i in ids for a in ("--contract", i)]
    return _run(tree, str(lint), "--config", str(tree / "pyproject.toml"), "--no-cache", "--no-logo", *limit)


def cycles(tree: pathlib.Path) -> subprocess.CompletedProcess:
    return _run(tree, sys.executable, "-c", CYCLES, str(tree))


def test_contracts_hold_and_no_module_is_in_an_import_cycle(root):
    res = contracts(root)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "Contracts: 7 kept, 0 broken." in res.stdout, res.stdout[-2000:]
    res = cycles(root)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


@pytest.fixture(scope="module")
def pristine(root, tmp_path_factory) -> pathlib.Path:
    """A copy of the package and its contracts; each case below breaks one file of a copy of it."""
    tree = tmp_path_factory.mktemp("pristine")
    shutil.copytree(root / "dip_jax", tree / "dip_jax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_an_unbroken_copy_passes(pristine):
    """The copy alone passes, so each failure below comes from the one import it adds."""
    for res in (contracts(pristine), cycles(pristine)):
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


# (file, import added inside a function, the contract it breaks, or None: an import cycle)
BREAKS = [
    ("plan/cost.py", "import jax", "planner-pure"),
    ("plan/partition.py", "from dip_jax.runtime import mesh", "planner-pure"),
    ("plan/search.py", "from dip_jax.train import planning", "layers"),
    ("models/llm.py", "from dip_jax.runtime import sharding", "models-know-no-schedules"),
    ("models/vit.py", "from dip_jax.plan import schedule", "layers"),
    ("runtime/distributed.py", "from dip_jax.train.planning import BatchPlan", "layers"),
    ("train/trainer.py", "from dip_jax import calibrate", "layers"),
    ("config/run.py", "from dip_jax.plan import hardware", "layers"),
    ("config/model.py", "import jax.numpy", "ground-is-pure"),
    ("specs/builtin.py", "from dip_jax.config import attention_params", "layers"),
    ("specs/builtin.py", "from dip_jax.data.metadata import IMG", "layers"),
    ("data/packing.py", "import grain", "data-is-numpy"),
    ("hf/convert.py", "from dip_jax.train import state", "hf-below-runtime"),
    ("hf/forward.py", "from dip_jax.runtime import sharding", "hf-below-runtime"),
    ("hf/families.py", "from dip_jax.train import export", "layers"),
    ("models/llm.py", "from dip_jax.hf import convert", "layers"),
    ("plan/schedule.py", "from dip_jax.plan.validate import validate", "acyclic"),
    ("plan/schedule.py", "from dip_jax.plan.validate import validate", None),
    ("specs/builtin.py", "from dip_jax import specs", None),     # a package and its own module
]


@pytest.mark.parametrize("path,statement,contract", BREAKS,
                         ids=[f"{p}:{s}:{c or 'cycle'}" for p, s, c in BREAKS])
def test_a_forbidden_import_fails_the_check(pristine, tmp_path, path, statement, contract):
    tree = tmp_path / "tree"
    shutil.copytree(pristine, tree)
    target = tree / "dip_jax" / path
    # a lazy import, as the contracts count it: inside a function that nothing calls
    target.write_text(target.read_text() + f"\n\ndef _added():\n    {statement}\n")
    res = contracts(tree, contract) if contract else cycles(tree)
    assert res.returncode == 1, res.stdout[-4000:] + res.stderr[-2000:]
    assert ("BROKEN" if contract else "import cycle: ") in res.stdout, res.stdout[-4000:]
