"""metrics.jsonl (one JSON object per line with `kind` and `step`), TensorBoard, progress bar."""
from __future__ import annotations

import json
import math
import pathlib
import sys
import time

from tqdm import tqdm


def _clean(v):
    """JSON has no NaN: non-finite floats become the strings "nan", "inf", "-inf", so a
    diverged step is told apart from a field that does not apply (null)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def read_records(path: pathlib.Path, upto_step: int, kind: str = "train") -> list[dict]:
    """Earlier lines of a metrics.jsonl (a resumed run's summary covers the whole run)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue                        # a line cut short by a kill
        if r.get("kind") == kind and r.get("step", 0) <= upto_step:
            out.append(r)
    return out


class MetricsWriter:
    """`enabled=False` (processes other than 0 of a multi-process run) writes nothing."""

    def __init__(self, workdir: pathlib.Path, total_steps: int, start_step: int = 0, progress: bool = True,
                 enabled: bool = True):
        self.path = workdir / "metrics.jsonl"
        self.enabled = enabled
        self.file = self.tb = None
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not progress, file=sys.stderr,
                        dynamic_ncols=True, desc="train")
        if not enabled:
            return
        self._truncate_after(start_step)
        self.file = open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:
            pass

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines past the restored step: they will be logged again, identically."""
        if not self.path.exists():
            return
        def kept(line):
            try:
                return json.loads(line).get("step", 0) <= step
            except ValueError:
                return False                # a line cut short by a kill
        keep = [l for l in self.path.read_text().splitlines() if l.strip() and kept(l)]
        self.path.write_text("".join(l + "\n" for l in keep))

    def write(self, kind: str, step: int, **fields) -> dict:
        record = {"kind": kind, "step": int(step), "time": round(time.time(), 3),
                  **{k: _clean(v) for k, v in fields.items()}}
        if not self.enabled:
            return record
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        return record

    def progress(self, step: int, **shown) -> None:
        self.bar.n = step
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class RunStats:
    """What a run's summary reports: losses, and for pipelined runs how planning went."""

    def __init__(self):
        self.losses: list[float] = []
        self.records: list[dict] = []
        self.plans = self.fallbacks = 0
        self.wait_seconds = 0.0
        self.truncated = self.skipped = 0        # over-long samples (data.oversize)

    def add_oversize(self, counts: tuple[int, int]) -> None:
        self.truncated += counts[0]
        self.skipped += counts[1]

    def add_plan(self, plan) -> None:
        if plan is not None:
            self.plans += 1
            self.fallbacks += plan.fallback is not None
            self.wait_seconds += plan.wait_seconds

    def add_history(self, records: list[dict]) -> None:
        """Train lines of the run before it resumed (plan counts assume they logged every step)."""
        for r in records:
            self.add_record(r)
            self.add_oversize((r.get("samples_truncated") or 0, r.get("samples_skipped") or 0))
            if r.get("scheduler") is not None:
                self.plans += 1
                self.fallbacks += bool(r.get("plan_fallback"))
                self.wait_seconds += r.get("plan_wait_seconds") or 0.0

    def add_record(self, record: dict) -> None:
        self.losses.append(record["loss"])
        if record.get("scheduler") is not None:
            self.records.append(record)

    def prediction_error_median_abs(self) -> float | None:
        """Median |measured/predicted - 1| over the logged steps that compiled nothing."""
        errs = sorted(abs(r["prediction_error"]) for r in self.records
                      if isinstance(r.get("prediction_error"), (int, float)) and not r.get("step_compiled"))
        if not errs:
            return None
        n = len(errs)
        return errs[n // 2] if n % 2 else (errs[n // 2 - 1] + errs[n // 2]) / 2

    def summary(self, wall_seconds: float) -> dict:
        out = {"first_loss": self.losses[0] if self.losses else None,
               "last_loss": self.losses[-1] if self.losses else None,
               "samples_truncated": self.truncated, "samples_skipped": self.skipped}
        if not self.plans:
            return out
        mean = lambda k: sum(r[k] for r in self.records) / len(self.records) if self.records else None
        last = self.records[-1] if self.records else {}
        return {**out, "compiles": last.get("compiles"), "cache_hits": last.get("cache_hits"),
                "planned_steps": self.plans, "plan_fallbacks": self.fallbacks,
                "plan_fallback_fraction": self.fallbacks / self.plans,
                "plan_wait_seconds": self.wait_seconds, "plan_wait_fraction": self.wait_seconds / wall_seconds,
                "mean_plan_seconds": mean("plan_seconds"), "mean_bubble_fraction": mean("bubble_fraction"),
                "mean_predicted_step_seconds": mean("predicted_step_seconds"),
                "mean_measured_step_seconds": mean("step_seconds"),
                "prediction_error_median_abs": self.prediction_error_median_abs()}

    @staticmethod
    def table(summary: dict) -> str:
        """The summary as an aligned two-column table for the terminal."""
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
        width = max(len(k) for k in summary)
        lines = [f"  {k:<{width}}  {fmt(v)}" for k, v in summary.items()]
        return "dip_jax: run summary\n" + "\n".join(lines)
