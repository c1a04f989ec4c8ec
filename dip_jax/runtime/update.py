"""The optimizer update of a step, and whether it was skipped."""
from __future__ import annotations

import jax.numpy as jnp


def guarded_update(tx, grads, state, params):
    """(updates, new optimizer state, skipped): `skipped` is a scalar bool on the device,
    from a transformation that may skip a non-finite update (`checked_update`, as the
    trainer's optimizer has), else always False."""
    if hasattr(tx, "checked_update"):
        return tx.checked_update(grads, state, params)
    return (*tx.update(grads, state, params), jnp.zeros((), bool))
