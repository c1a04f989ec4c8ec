"""metrics.jsonl (one JSON object per line with `kind` and `step`), TensorBoard, progress bar."""
from __future__ import annotations

import json
import math
import pathlib
import sys

from tqdm import tqdm


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    def __init__(self, workdir: pathlib.Path, total_steps: int, start_step: int = 0, progress: bool = True):
        self.path = workdir / "metrics.jsonl"
        self._truncate_after(start_step)
        self.file = open(self.path, "a")
        self.tb = None
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:
            pass
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not progress, file=sys.stderr,
                        dynamic_ncols=True, desc="train")

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines past the restored step: they will be logged again, identically."""
        if not self.path.exists():
            return
        keep = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
        self.path.write_text("".join(l + "\n" for l in keep))

    def write(self, kind: str, step: int, **fields) -> dict:
        record = {"kind": kind, "step": int(step), **{k: _clean(v) for k, v in fields.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        return record

    def progress(self, step: int, **shown) -> None:
        self.bar.n = step
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
