"""`python -m dip_jax.train --config configs/X.py [--workdir DIR] [--config.section.field=value ...]`"""
from __future__ import annotations

import sys

USAGE = "usage: python -m dip_jax.train --config configs/X.py [--workdir DIR] [--config.section.field=value ...]"


def main(argv: list[str] | None = None) -> int:
    from dip_jax.config import ConfigError
    from dip_jax.overrides import apply_overrides, load_config_file, parse_config_args

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    try:
        path, workdir, overrides, rest = parse_config_args(argv)
        if rest:
            raise ConfigError(f"unknown argument {rest[0]!r}")
        if path is None:
            raise ConfigError("--config is required")
        cfg = apply_overrides(load_config_file(path), overrides)
        from dip_jax.runtime.mesh import configure_host_devices
        configure_host_devices()
        from dip_jax.train.trainer import run
        run(cfg, workdir or f"runs/{cfg.model.name}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from absl import flags     # grain's multiprocessing reads absl flags; mark them parsed
    flags.FLAGS(sys.argv[:1])
    sys.exit(main())
