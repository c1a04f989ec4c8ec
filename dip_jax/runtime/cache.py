"""Compiled pipeline steps keyed by table signature: LRU-bounded, with hit/miss/compile stats."""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable, Hashable


@dataclasses.dataclass
class CacheStats:
    compiled: int = 0
    hits: int = 0
    compile_seconds: float = 0.0
    evicted: int = 0
    peak_bytes: float = 0.0         # the largest compiled program's memory per device (see `program_bytes`)


def program_bytes(program) -> float:
    """Per-device memory a compiled program needs: arguments + outputs + temporaries, less the
    outputs that reuse donated arguments (0 where the backend reports no analysis)."""
    m = program.memory_analysis()
    if m is None:
        return 0.0
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


class StepCache:
    """`get(signature, args)` returns the compiled step for that signature, compiling it (ahead
    of time, with `args` as the example) on a miss. Tables of one signature share one program."""

    def __init__(self, build: Callable[[Hashable], Callable], max_size: int = 8, persistent_dir: str | None = None):
        self.build, self.max_size = build, max_size
        self.stats = CacheStats()
        self._programs: collections.OrderedDict = collections.OrderedDict()
        if persistent_dir:
            import jax
            jax.config.update("jax_compilation_cache_dir", persistent_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    def get(self, signature: Hashable, *args):
        if signature in self._programs:
            self.stats.hits += 1
            self._programs.move_to_end(signature)
            return self._programs[signature]
        t0 = time.perf_counter()
        program = self.build(signature).lower(*args).compile()
        self.stats.compile_seconds += time.perf_counter() - t0
        self.stats.compiled += 1
        self.stats.peak_bytes = max(self.stats.peak_bytes, program_bytes(program))
        self._programs[signature] = program
        if len(self._programs) > self.max_size:
            self._programs.popitem(last=False)
            self.stats.evicted += 1
        return program

    def __len__(self) -> int:
        return len(self._programs)
