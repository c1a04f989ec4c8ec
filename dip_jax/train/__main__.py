"""`python -m dip_jax.train --config configs/X.py [--workdir DIR] [--config.section.field=value ...]`

Multi-process (one process per host, or per GPU): add `--coordinator HOST:PORT --num-processes N
--process-id I` (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or
`--distributed` to let jax detect the cluster (SLURM, Open MPI, TPU pods, Kubernetes). Each such
process runs the trainer under a supervisor (`supervise.py`).
"""
from __future__ import annotations

import os
import sys

USAGE = ("usage: python -m dip_jax.train --config configs/X.py [--workdir DIR] [--config.section.field=value ...]\n"
         "       [--coordinator HOST:PORT --num-processes N --process-id I | --distributed]")
def main(argv: list[str] | None = None) -> int:
    from dip_jax.config import ConfigError
    from dip_jax.config.overrides import apply_overrides, load_config_file, parse_config_args

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        return _help(argv)
    from dip_jax.train.errors import RunStopped
    from dip_jax.train.interrupt import SIGNAL_FD, listen_to_supervisor
    from dip_jax.train.supervise import distributed_args
    if os.environ.get(SIGNAL_FD):
        listen_to_supervisor()
    try:
        path, workdir, overrides, rest = parse_config_args(argv)
        distributed, rest = distributed_args(rest)
        if rest:
            raise ConfigError(f"unknown argument {rest[0]!r}")
        if path is None:
            raise ConfigError("--config is required")
        cfg = apply_overrides(load_config_file(path), overrides)
        from dip_jax.train import xla_flags
        xla_flags.apply(cfg.pipeline.xla_flags)     # before anything starts a jax backend
        from dip_jax.runtime.mesh import configure_host_devices
        configure_host_devices()
        from dip_jax.runtime.distributed import initialize
        initialize(**distributed, timeout_seconds=cfg.distributed.timeout_seconds)
        from dip_jax.train.trainer import run
        run(cfg, workdir or f"runs/{cfg.model.name}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"dip_jax: {e}", file=sys.stderr, flush=True)
        if e.everywhere:                   # every process stops here: leave together
            from dip_jax.runtime.distributed import finish
            finish()
        return e.exit_code
    except KeyboardInterrupt:             # Ctrl-C before the trainer took over the signal
        print("dip_jax: interrupted before training started", file=sys.stderr)
        return 130
    return 0


def _help(argv: list[str]) -> int:
    """Usage, then every config key with its value (the given --config's, else the defaults)."""
    from dip_jax.config import ConfigError, TrainConfig
    from dip_jax.config.overrides import describe, load_config_file, parse_config_args
    print(USAGE)
    try:
        path = parse_config_args([a for a in argv if a not in ("-h", "--help")])[0]
        cfg, source = (load_config_file(path), path) if path else (TrainConfig(), "defaults")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nconfig keys ({source}); set any with --config.KEY=VALUE:")
    print(describe(cfg))
    return 0


if __name__ == "__main__":
    from dip_jax.train import supervise
    if supervise.wanted(sys.argv[1:]):
        sys.exit(supervise.run(sys.argv[1:]))
    from absl import flags     # grain's multiprocessing reads absl flags; mark them parsed
    flags.FLAGS(sys.argv[:1])
    code = main()
    if code:
        # a stopped run has closed its files and workers; what is left are background threads
        # (a failed checkpoint write) whose teardown at interpreter exit only prints noise
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
