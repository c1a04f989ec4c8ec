"""A 'tensor' mesh axis inside every pipeline rank: each chunk's layers split Megatron-style.

On 8 fake CPU devices, (data=1, pipe=2, tensor=4) and (data=2, pipe=2, tensor=2) must give the
loss and every gradient of the unpipelined model (fp32) for DIP, 1F1B and a random valid
schedule, with vision + audio + llm and with llm + dit. The parameters really are split (each
device holds its 1/(pipe x tensor) of a block stack), and a program that splits them but drops
the reductions over 'tensor' (manual over 'tensor' too, no collectives on it) must fail.
"""
import jax
import numpy as np
import pytest

from dip_jax.config import ConfigError, MeshConfig, TrainConfig
from dip_jax.plan.baselines import schedule_baseline
from dip_jax.plan.search import search
from dip_jax.runtime import sharding as S
from dip_jax.runtime.pipeline import PipelineExecutor
from test_executor import UNIT_COSTS, Setup, random_plan

BLK_T = dict(dim=32, mlp_hidden=48, heads=4, kv_heads=4)
MESHES = {"1x2x4": (1, 2, 4), "2x2x2": (2, 2, 2)}
MODELS = {"encoders": ("vision", "audio"), "dit": ("dit",)}
_setups: dict = {}


def setup_for(mesh: str, model: str) -> Setup:
    if (mesh, model) not in _setups:
        data, pipe, tensor = MESHES[mesh]
        _setups[(mesh, model)] = Setup(MODELS[model], data, pipe=pipe, tensor=tensor, blk=BLK_T)
    return _setups[(mesh, model)]


SCHEDULERS = {
    "dip": lambda g: search(g, UNIT_COSTS, rollouts=3, seed=1)[0],
    "1f1b": lambda g: schedule_baseline("1f1b", g, UNIT_COSTS),
    "random": lambda g: random_plan(g, 11),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mesh", list(MESHES))
def test_tensor_parallel_stages_match_reference(mesh, model, scheduler):
    s = setup_for(mesh, model)
    s.assert_matches(*s.run(s.plans(SCHEDULERS[scheduler])))
    assert s.ex.cache.stats.compiled == 1


@pytest.mark.parametrize("mesh", list(MESHES))
def test_block_stacks_are_split_over_pipe_and_tensor(mesh):
    s = setup_for(mesh, "encoders")
    data, pipe, tensor = MESHES[mesh]
    staged = s.ex.to_stage(s.params)
    q = staged["llm"]["blocks"]["attn"]["q"]["kernel"]
    o = staged["llm"]["blocks"]["attn"]["o"]["kernel"]
    down = staged["llm"]["blocks"]["mlp"]["down"]["kernel"]
    head = staged["llm"]["lm_head"]["kernel"]
    value = lambda x: getattr(x, "value", x)
    for x in (q, o, down):
        assert value(x).addressable_shards[0].data.size * pipe * tensor == value(x).size, value(x).shape
    assert value(head).addressable_shards[0].data.size == value(head).size      # replicated (see README)
    strip = lambda ps: tuple(ps)[:max([i + 1 for i, e in enumerate(ps) if e is not None], default=0)]
    assert strip(value(q).sharding.spec) == ("pipe", None, None, None, "tensor")
    assert strip(value(o).sharding.spec) == ("pipe", None, None, "tensor")


def test_dropped_tensor_reductions_break_equivalence():
    """Negative control: the same split parameters in a program manual over 'tensor' too, so
    every device computes with its own heads and hidden units and nothing sums them."""
    s = setup_for("1x2x4", "encoders")
    broken = PipelineExecutor(s.model, s.partition, s.ex.mesh, {"vision": 4, "audio": 2, "dit": 3}, 48,
                              drop_tensor_reductions=True)
    plans = s.plans(SCHEDULERS["1f1b"])
    loss, grads = broken.value_and_grad(s.params, s.batch.arrays, plans, s.buckets)
    with pytest.raises(AssertionError):
        s.assert_matches(loss, grads)


# the families pretrained checkpoints bring: LayerNorm, GELU MLPs, biases on every linear (the
# column-parallel ones split with their outputs, the row-parallel ones added after the sum), a
# tied LM head and scaled rope
FAMILY_BLK = dict(BLK_T, norm="layer", norm_eps=1e-5, mlp="gelu_tanh", qkv_bias=True, out_bias=True, mlp_bias=True)
FAMILY_LLM = dict(tie_embeddings=True, rope_scaling=(("factor", 2.0), ("rope_type", "linear")))


@pytest.fixture(scope="module")
def family_setup():
    return Setup(("vision", "audio"), 2, pipe=2, tensor=2, blk=FAMILY_BLK, llm=FAMILY_LLM, random_biases=True)


def test_block_families_match_reference_under_pipe_and_tensor(family_setup):
    s = family_setup
    s.assert_matches(*s.run(s.plans(SCHEDULERS["dip"])))
    bias = s.ex.to_stage(s.params)["llm"]["blocks"]["attn"]["q"]["bias"]
    bias = getattr(bias, "value", bias)
    assert bias.addressable_shards[0].data.size * 4 == bias.size         # split over pipe and tensor


def test_a_tensor_parallel_tick_stays_within_the_lint(family_setup):
    """data=2 x pipe=2 x tensor=2: three host syncs per tick, no carried buffer copied in the loop."""
    from test_executor import assert_tick_lint
    assert_tick_lint(family_setup, family_setup.plans(SCHEDULERS["dip"]))


def test_row_parallel_bias_added_before_the_sum_breaks_equivalence(family_setup, monkeypatch):
    """Negative control: each device of a group adds the output projection's bias to its
    partial sum (so the sum counts it tensor-size times)."""
    from dip_jax.runtime import tensor
    s = family_setup
    monkeypatch.setattr(tensor._Row, "__call__", lambda self, x: self.leave(self.inner(x)))
    broken = PipelineExecutor(s.model, s.partition, s.ex.mesh, {"vision": 4, "audio": 2, "dit": 3}, 48)
    loss, grads = broken.value_and_grad(s.params, s.batch.arrays, s.plans(SCHEDULERS["1f1b"]), s.buckets)
    with pytest.raises(AssertionError):
        s.assert_matches(loss, grads)


def test_param_rules_name_megatron_axes():
    path = lambda *keys: tuple(jax.tree_util.DictKey(k) for k in keys)
    assert S.param_axes(path("llm", "blocks", "attn", "q", "kernel")) == (None, "heads")
    assert S.param_axes(path("dit", "blocks", "cross", "o", "kernel")) == ("heads", None)
    assert S.param_axes(path("vision", "blocks", "mlp", "gate", "kernel")) == (None, "mlp")
    assert S.param_axes(path("audio", "blocks", "mlp", "down", "kernel")) == ("mlp", None)
    assert S.param_axes(path("llm", "embedding", "embedding")) == ()       # replicated
    assert S.param_axes(path("llm", "blocks", "attn_norm", "scale")) == ()
    assert S.tensor_role(("attn", "q")) == "column" and S.tensor_role(("mlp", "down")) == "row"
    assert S.tensor_role(("attn_norm",)) is None


@pytest.mark.parametrize("key,value", [("model.llm.heads", 3), ("model.vision.kv_heads", 1),
                                       ("model.audio.mlp_hidden", 129), ("model.llm.vocab_size", 255)])
def test_tensor_must_divide_heads_hidden_and_vocab(root, key, value):
    from dip_jax.config.overrides import apply_overrides, load_config_file
    tiny = load_config_file(root / "configs/tiny_cpu.py")
    apply_overrides(tiny, ["mesh.data=1", "mesh.pipe=2", "mesh.tensor=2"])      # tiny divides evenly
    extra = ["model.llm.dim=72", "model.llm.kv_heads=1"] if key == "model.llm.heads" else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        apply_overrides(tiny, ["mesh.data=1", "mesh.pipe=2", "mesh.tensor=2", f"{key}={value}", *extra])


def test_mesh_larger_than_devices_is_refused():
    from dip_jax.runtime.mesh import check_devices
    cfg = TrainConfig(mesh=MeshConfig(data=2, pipe=2, tensor=4))
    with pytest.raises(ConfigError, match="mesh.*tensor=4.*16 devices"):
        check_devices(cfg, 8)


@pytest.mark.parametrize("route", ["compiler", "manual"])
def test_compiler_partitioned_tensor_axis_deadlocks_in_predicated_bodies(root, route):
    """Why the runtime writes the tensor collectives itself: with 'tensor' left to the compiler
    (partial-manual shard_map), a predicated body that some ranks skip deadlocks; manual over
    both axes with explicit all-reduces, the same program completes."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_collective_call_warn_stuck_timeout_seconds=2 "
                                      "--xla_cpu_collective_call_terminate_timeout_seconds=4"}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    arg = "auto" if route == "compiler" else "manual"
    res = subprocess.run([sys.executable, str(root / "tests/programs/auto_tensor_deadlock.py"), arg],
                         env=env, capture_output=True, text=True, timeout=300)
    if route == "manual":
        assert res.returncode == 0 and "result" in res.stdout, res.stderr[-2000:]
    else:
        assert res.returncode != 0 and "result" not in res.stdout
        assert "rendezvous" in res.stderr.lower() and "collective permute" in res.stderr.lower(), res.stderr[-2000:]


@pytest.fixture(scope="module")
def tensor_runs(root, tmp_path_factory, xla_cache):
    """6 steps of tiny_cpu on data=2 x pipe=2 x tensor=2: dip with ZeRO-1 (the default) and the
    unpipelined reference without it, same seed and data."""
    import json
    from dip_jax.config.overrides import apply_overrides, load_config_file
    from dip_jax.train.trainer import run
    tmp = tmp_path_factory.mktemp("tensor_runs")
    out = {}
    for sched in ("dip", "none"):
        cfg = apply_overrides(load_config_file(root / "configs/tiny_cpu.py"),
                              ["train.progress=false", f"pipeline.compile_cache_dir={xla_cache}", "train.steps=6",
                               "checkpoint.enabled=false", "mesh.data=2", "mesh.pipe=2", "mesh.tensor=2",
                               "train.timeline_first=0", "train.timeline_every=0", f"pipeline.schedule={sched}",
                               f"optim.shard_state_over_data={sched == 'dip'}"])
        summary = run(cfg, tmp / sched)
        records = [r for r in map(json.loads, open(tmp / sched / "metrics.jsonl")) if r["kind"] == "train"]
        out[sched] = summary, records
    return out


def test_trainer_on_every_device_matches_reference_and_learns(tensor_runs):
    (summary, dip), (_, ref) = tensor_runs["dip"], tensor_runs["none"]
    assert summary["devices"] == 8 and summary["mesh"] == {"data": 2, "pipe": 2, "tensor": 2}
    np.testing.assert_allclose([r["loss"] for r in dip[:3]], [r["loss"] for r in ref[:3]], rtol=1e-4)
    losses = [r["loss"] for r in dip]
    assert np.mean(losses[-2:]) < losses[0] - 0.05, losses
    # ZeRO-1 and the tensor split: one device holds well under a quarter of the state
    assert summary["state_bytes_per_device_max"] < 0.3 * summary["state_bytes_total"], summary


def test_zero1_splits_the_optimizer_moments_over_data(root):
    """Per device, the Adam moments fall by the data size; the parameters do not change.
    Negative control: with `optim.shard_state_over_data=false` nothing falls."""
    from dip_jax.config.overrides import apply_overrides, load_config_file
    from dip_jax.plan.schedulers import PlanContext
    from dip_jax.runtime.mesh import make_mesh
    from dip_jax.runtime.stages import StageLayout
    from dip_jax.train.optim import build_optimizer
    from dip_jax.train.state import bytes_per_device, state_shapes
    out = {}
    for zero in (True, False):
        cfg = apply_overrides(load_config_file(root / "configs/tiny_cpu.py"),
                              ["mesh.data=4", "mesh.pipe=2", f"optim.shard_state_over_data={zero}"])
        tx = build_optimizer(cfg.optim, cfg.train.steps, cfg.model.modules)
        layouts = {m.name: StageLayout(2, m.chunks // 2, m.layers) for m in PlanContext(cfg).partition.modules}
        shapes = state_shapes(cfg, tx, make_mesh(4, 2), layouts)
        out[zero] = bytes_per_device(shapes["params"]), bytes_per_device(shapes["opt_state"])
        specs = [x.sharding.spec for x in jax.tree.leaves(shapes["opt_state"]) if x.ndim]
        assert all(("data" in tuple(ps)) == zero for ps in specs), specs
    assert out[True][0] == out[False][0]
    assert out[True][1] < 0.3 * out[False][1], out           # 1/4, up to the moments no axis of divides
