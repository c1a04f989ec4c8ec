"""The planner side must import without jax (it runs in background workers and the plan CLI)."""
import subprocess
import sys


def test_plan_config_and_packing_import_without_jax():
    code = ("import sys, dip_jax, dip_jax.plan, dip_jax.config, dip_jax.config.zoo, dip_jax.config.overrides, "
            "dip_jax.data.packing, dip_jax.data.metadata, dip_jax.data.synthetic, dip_jax.data.digits, "
            "dip_jax.plan.schedulers, dip_jax.plan.__main__, dip_jax.viz.timeline; "
            "bad = [m for m in ('jax', 'flax', 'optax') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_planning_imports_no_jax_and_no_grain_when_it_runs(root, tmp_path):
    """A PlanContext built and used (its partition probe reads synthetic batches), and the plan
    CLI run end to end, in a fresh process: neither jax nor grain is ever imported."""
    code = f"""
import sys
from dip_jax.config.overrides import load_config_file
from dip_jax.plan.schedulers import PlanContext
from dip_jax.data.stream import PackedStream
cfg = load_config_file({str(root / 'configs/tiny_cpu.py')!r})
ctx = PlanContext(cfg)
meta = PackedStream(cfg, content=False).metadata(3)[: cfg.data.microbatches // cfg.mesh.data]
assert ctx.plan(meta, "dip", rollouts=2, seed=0).plan is not None
from dip_jax.plan.__main__ import main
assert main(["--config", {str(root / 'configs/tiny_cpu.py')!r}, "--batches", "2", "--rollouts", "2",
             "--workers", "1", "--out", {str(tmp_path)!r}]) == 0
bad = [m for m in ("jax", "grain", "flax", "optax") if m in sys.modules]
assert not bad, bad
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # negative control: the grain pipeline's batches do import grain
    check = ("import sys; from dip_jax.data.pipeline import PackedBatches; assert 'grain' in sys.modules")
    assert subprocess.run([sys.executable, "-c", check], cwd=root).returncode == 0


def test_plan_cli_plans_a_file_dataset_from_its_index_without_jax_or_grain(root, tmp_path):
    """The files task's batches planned by the CLI: index built (tokenizer, image headers), batches
    packed from it, planned; jax and grain never imported, and the index is cached in --out."""
    from dip_jax.data.files.demo import TOKENIZER_DIR, write_dataset
    data = write_dataset(tmp_path / "data", train_records=60, eval_records=4)
    code = f"""
import sys
from dip_jax.plan.__main__ import main
assert main(["--config", {str(root / 'configs/tiny_cpu.py')!r}, "--batches", "2", "--rollouts", "2",
             "--schedulers", "dip,1f1b", "--out", {str(tmp_path / 'out')!r}, "--config.data.task=files",
             "--config.data.path={data / 'train.jsonl'}", "--config.data.tokenizer={TOKENIZER_DIR}",
             "--config.model.audio=none"]) == 0
bad = [m for m in ("jax", "grain", "flax", "optax") if m in sys.modules]
assert not bad, bad
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list((tmp_path / "out" / "data_index").glob("train.*.json"))) == 1


def test_schedule_ir_imports_nothing_of_the_planner():
    """The IR (schedule.py) is what indexed.py, simulate.py and validate.py build on; importing
    it must not pull them in (no import cycle between them)."""
    code = ("import sys, dip_jax.plan.schedule; "
            "bad = [m for m in ('indexed', 'simulate', 'validate', 'interleave', 'search') "
            "if 'dip_jax.plan.' + m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


BUILTIN_MODULES = {"vision", "audio", "llm", "dit"}
# where the built-in module names may be written: their spec definitions, the models and the
# config defaults (the config package less its overrides parser and checks; zoo: the paper's
# model configs; hf: each Hugging Face family's table names the module it initialises;
# data/files/records.py: "audio" is a key of the record formats, a word of the datasets)
NAMED_IN = ("specs/", "models/", "hf/", "config/model.py", "config/run.py", "config/train_config.py", "config/zoo.py",
            "data/files/records.py")


def _module_name_literals(source: str) -> list[tuple[int, str]]:
    import ast
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and node.value in BUILTIN_MODULES]


def test_no_module_names_outside_the_specs(root):
    """The library loops over module specs: no built-in module name is a string literal in
    dip_jax/ outside the spec definitions, the models and the config defaults."""
    pkg = root / "dip_jax"
    found = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg)
        if rel.as_posix().startswith(NAMED_IN):
            continue
        found += [f"{rel}:{line}: {value!r}" for line, value in _module_name_literals(path.read_text())]
    assert not found, "\n".join(found)
    # negative control: the scan sees a name in an assignment, a subscript and a dict key
    assert [v for _, v in _module_name_literals('a = "vision"\nb = x["dit"]\nc = {"llm": 1}')] == \
        ["vision", "dit", "llm"]
