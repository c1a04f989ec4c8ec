"""The planner side must import without jax (it runs in background workers and the plan CLI)."""
import subprocess
import sys


def test_plan_config_and_packing_import_without_jax():
    code = ("import sys, dip_jax, dip_jax.plan, dip_jax.config, dip_jax.zoo, dip_jax.overrides, "
            "dip_jax.data.packing, dip_jax.data.metadata, dip_jax.data.synthetic, dip_jax.data.digits, "
            "dip_jax.plan.schedulers, dip_jax.plan.__main__, dip_jax.viz.timeline; "
            "bad = [m for m in ('jax', 'flax', 'optax') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
