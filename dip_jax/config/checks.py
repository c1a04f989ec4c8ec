"""What every config check shares: the error type and the deferral of checks while overrides apply."""
from __future__ import annotations

import contextlib
import contextvars

# While a list of overrides is applied, intermediate configs may be inconsistent (e.g. mesh.pipe
# raised before the layer counts that must follow it); the checks then run once, at the end.
DEFER_CHECKS = contextvars.ContextVar("dip_jax_defer_checks", default=False)


@contextlib.contextmanager
def deferred_checks():
    token = DEFER_CHECKS.set(True)
    try:
        yield
    finally:
        DEFER_CHECKS.reset(token)


class ConfigError(ValueError):
    """A config value or combination that cannot work; the message names the key."""


def require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def positive(obj, prefix: str, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        require(v > 0, f"{prefix}.{n}", f"must be > 0, got {v!r}")
