"""Module specs: what the library knows of a module type, as data (the ground layer: this
package imports nothing else of dip_jax).

`registry.py` holds the spec type and the registry, `params.py` the analytic parameter counts
the specs and the model configs share, `tokens.py` the reserved token ids of the built-in
vocabulary, `builtin.py` the four built-in specs (registered on import) and `runtime.py` the
spec's jax half (imported only when a run needs it).
"""
from dip_jax.specs.registry import (BACKBONE, ENCODER, GENERATOR, ROLES, EncoderItems, ModuleSpec, clips, get,
                                    graph_order, max_items, metadata_keys, register, registered, role_of,
                                    with_role)
from dip_jax.specs import builtin as _builtin  # noqa: E402,F401  (registers the four built-in specs)

__all__ = ["BACKBONE", "ENCODER", "GENERATOR", "ROLES", "EncoderItems", "ModuleSpec", "clips", "get",
           "graph_order", "max_items", "metadata_keys", "register", "registered", "role_of", "with_role"]
