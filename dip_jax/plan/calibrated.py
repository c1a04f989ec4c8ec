"""Op latencies measured on the running backend (a calibration profile), as the cost model reads them.

`python -m dip_jax.calibrate` writes the profile; this side only evaluates it, so the planner
stays free of jax. Per module and kind (F, B) a chunk op over `layers` layers at `units`
sub-microbatch units costs

    a(units) + b(units) * layers             (+ head_a + head_b * units on the module's last chunk)
    + in_executor                            (what the tick loop adds to the op measured alone)

where a and b are interpolated linearly in `units` between the measured unit counts (the time
per layer is not linear in units: small sub-microbatches under-use the device), with the
embedding counted in every op, because the executor computes it in every op and keeps it only on
first chunks. A lock-step tick costs `tick_seconds` on top of its busiest rank (the
tick loop and its packed sends), and a step `step_seconds` on top of its ticks (tables and batch
to the devices, gradient reduction, optimizer update). Those are measured on synthetic tables in
which every rank does the same thing every tick; `scale` (applied to every cost) then makes one
real plan's step predicted as measured: the level comes from the real step, the relative costs
from the separate measurements.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Calibration:
    base: str                       # hardware profile for what is not measured (memory, TP links)
    ops: dict                       # module -> kind -> {"units": [u..], "a": [..], "b": [..]}
    head: dict                      # module -> kind -> {"a", "b"}
    in_executor: dict               # module -> kind -> seconds
    tick_seconds: float
    step_seconds: float
    scale: float = 1.0              # every cost x scale: a real plan's step predicted as measured
    key: dict = dataclasses.field(default_factory=dict)        # what it was measured on
    accuracy: dict = dataclasses.field(default_factory=dict)   # held-out shapes: predicted vs measured
    residuals: dict = dataclasses.field(default_factory=dict)  # module -> {"units", "a", "b"}: bytes a storing op keeps
    stored_delta: dict = dataclasses.field(default_factory=dict)  # module -> kind -> seconds a stored op adds in the tick loop
    tick_seconds_stored: float | None = None   # an idle tick of a program with residual slots
    program_extra_bytes: float = 0.0           # a compiled step's bytes per device beyond its counted buffers

    def covers(self, module: str) -> bool:
        return module in self.ops

    def op_seconds(self, module: str, kind: str, layers: int, units: int, last: bool) -> float:
        f = self.ops[module][kind]
        t = interpolate(f["units"], f["a"], units) + interpolate(f["units"], f["b"], units) * layers
        if last:
            h = self.head[module][kind]
            t += h["a"] + h["b"] * units
        return max(t + self.in_executor.get(module, {}).get(kind, 0.0), 0.0) * self.scale

    def covers_residuals(self, module: str) -> bool:
        return module in self.residuals

    def residual_bytes(self, module: str, layers: int, units: int) -> float:
        """Bytes the runtime's storing forward keeps over `layers` layers at `units` units
        (read off the compiled chunk's residuals: exact, not a timing)."""
        f = self.residuals[module]
        return interpolate(f["units"], f["a"], units) + interpolate(f["units"], f["b"], units) * layers

    def tick(self, strategy: str = "recompute") -> float:
        if strategy != "recompute" and self.tick_seconds_stored is not None:
            return self.tick_seconds_stored * self.scale
        return self.tick_seconds * self.scale

    def step(self) -> float:
        return self.step_seconds * self.scale

    def to_json(self) -> dict:
        return {"calibration": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> "Calibration":
        if d.get("calibration") != FORMAT:
            raise ValueError(f"not a calibration profile of format {FORMAT} (calibration={d.get('calibration')!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def save(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(json.dumps(self.to_json(), indent=1))


def interpolate(xs: list, ys: list, x: float) -> float:
    """Piecewise-linear through (xs, ys), extended linearly beyond the ends; with one point,
    proportional to x (a sub-microbatch of twice the units does twice the work)."""
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    i = 1
    while i < len(xs) - 1 and x > xs[i]:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def read(path: str | pathlib.Path) -> Calibration | None:
    """The calibration in a JSON file, or None when the file is a plain hardware profile."""
    d = json.loads(pathlib.Path(path).read_text())
    return Calibration.from_json(d) if "calibration" in d else None
