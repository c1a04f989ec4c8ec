"""Render a simulated plan: ranks x time, modules coloured, backward hatched, ops that store
their residuals (and the backwards that apply them) with a thick outline, bubbles blank.

Pure Python + matplotlib (a bare Figure: no pyplot state, the caller's backend untouched); the
trace JSON opens in ui.perfetto.dev or chrome://tracing.
"""
from __future__ import annotations

import json
import pathlib

from dip_jax import specs


def _color(module: str) -> str:
    return specs.get(module).color if module in specs.registered() else "#8c8c8c"


def trace_events(plan, timeline, title: str = "") -> dict:
    events = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": title or plan.scheduler}}]
    for r in range(plan.graph.P):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"rank {r}"}})
    for r, ops in enumerate(plan.order):
        for op in ops:
            s, e = timeline.start[op], timeline.end[op]
            events.append({"name": f"{op.kind} {op.module}[{op.chunk}]", "cat": op.module, "ph": "X", "pid": 0,
                           "tid": r, "ts": s * 1e6, "dur": (e - s) * 1e6,
                           "args": {"mb": op.mb, "sub": op.sub, "tick": timeline.tick.get(op),
                                    "memory": plan.strategy(op)}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(plan, timeline, path, title: str = "") -> None:
    pathlib.Path(path).write_text(json.dumps(trace_events(plan, timeline, title)))


def prediction_text(timeline, measured_seconds: float, median_error: float | None = None) -> str:
    """This step's measured/predicted - 1, and the run's median |error| so far when given."""
    text = f"prediction error {measured_seconds / timeline.iteration_seconds - 1:+.1%}"
    return text + (f", run median |error| {median_error:.1%}" if median_error is not None else "")


def write_png(plan, timeline, path, title: str = "", measured_seconds: float | None = None,
              median_error: float | None = None) -> None:
    """`median_error`: the run's median |measured/predicted - 1| so far, shown beside this step's."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    P = plan.graph.P
    fig = Figure(figsize=(14, 0.45 * P + 1.6))
    ax = fig.subplots()
    scale, unit = (1e3, "ms") if timeline.iteration_seconds < 10 else (1.0, "s")
    for r, ops in enumerate(plan.order):
        bars = [((timeline.start[o]) * scale, (timeline.end[o] - timeline.start[o]) * scale) for o in ops]
        colors = [_color(o.module) for o in ops]
        hatches = ["//" if o.kind == "B" else "" for o in ops]
        widths = [1.2 if plan.strategy(o) == "store" else 0.2 for o in ops]
        for (x, w), c, h, lw in zip(bars, colors, hatches, widths):
            ax.broken_barh([(x, w)], (r - 0.4, 0.8), facecolors=c, edgecolor="black", linewidth=lw, hatch=h)
    ax.set_yticks(range(P), [f"rank {r}" for r in range(P)])
    ax.invert_yaxis()
    ax.set_xlabel(f"time ({unit})")
    mods = sorted({o.module for ops in plan.order for o in ops})
    handles = [Patch(facecolor=_color(m), label=m) for m in mods]
    handles += [Patch(facecolor="white", edgecolor="black", label="forward"),
                Patch(facecolor="white", edgecolor="black", hatch="//", label="backward")]
    if plan.stored:
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=1.2, label="stored (no recompute)"))
    ax.legend(handles=handles, loc="upper right", fontsize=7, ncol=len(handles))
    info = (f"{title or plan.scheduler} — {timeline.mode}: {timeline.iteration_seconds * scale:.3g} {unit}, "
            f"bubble {100 * timeline.bubble_fraction:.1f}%")
    if plan.stored:
        pairs = sum(1 for ops in plan.order for o in ops if o.kind == "B")
        info += f", {len(plan.stored)}/{pairs} op pairs stored"
    if measured_seconds is not None:
        info += (f", measured {measured_seconds * scale:.3g} {unit} "
                 f"({prediction_text(timeline, measured_seconds, median_error)})")
    ax.set_title(info, fontsize=9)
    ax.set_xlim(0, timeline.iteration_seconds * scale * 1.01)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
