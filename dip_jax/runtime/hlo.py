"""Reading an optimised HLO module's text: what a step costs in control flow and copies.

On XLA:GPU every `conditional` and every `while` whose trip count is unknown at compile time
copies its predicate or branch index to the host and waits for it (while_thunk.cc,
conditional_thunk.cc); a loop with a known trip count carries `known_trip_count` in its backend
config. A `copy` inside the tick loop of a buffer the loop carries costs that buffer's bytes
every tick. Pure text parsing: no jax needed.
"""
from __future__ import annotations

import dataclasses
import math
import re

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_NAME = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_CALLS = re.compile(r"(?:calls|body|condition|to_apply|branch_computations)=\{?([^}\n]*?)\}?(?:,\s*\w+=|$|,\s*metadata)")
_REF = re.compile(r"%([\w.\-]+)")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


@dataclasses.dataclass(frozen=True)
class Instruction:
    computation: str
    name: str
    op: str
    shape: str
    text: str


def parse(text: str) -> dict[str, list[Instruction]]:
    """computation name -> its instructions."""
    comps: dict[str, list[Instruction]] = {}
    current = None
    for line in text.splitlines():
        head = _HEADER.match(line)
        if head:
            current = head.group(1)
            comps[current] = []
            continue
        m = _NAME.match(line)
        if current is None or not m:
            continue
        rhs = line.split(" = ", 1)[1]
        op = re.search(r"\s([\w\-]+)\(", " " + rhs)
        shape = rhs.split(" ")[0] if not rhs.startswith("(") else rhs[:_close(rhs) + 1]
        comps[current].append(Instruction(current, m.group(1), op.group(1) if op else "", shape, line.strip()))
    return comps


def _close(s: str) -> int:
    depth = 0
    for i, ch in enumerate(s):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return i
    return len(s) - 1


def _called(inst: Instruction) -> list[str]:
    out = []
    for key in ("calls", "body", "condition", "to_apply", "branch_computations"):
        m = re.search(key + r"=(\{[^}]*\}|%[\w.\-]+)", inst.text)
        if m:
            out += _REF.findall(m.group(1))
    return out


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(shape)]


def nbytes(dtype: str, dims: tuple[int, ...]) -> int:
    return _BYTES.get(dtype, 4) * math.prod(dims)


def host_sync_ops(text: str) -> list[Instruction]:
    """`while` ops without a known trip count, and `conditional` ops: each syncs with the host
    on XLA:GPU every time it runs."""
    return [i for comp in parse(text).values() for i in comp
            if i.op == "conditional" or (i.op == "while" and "known_trip_count" not in i.text)]


def reachable(comps: dict[str, list[Instruction]], root: str) -> set[str]:
    seen, todo = set(), [root]
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for inst in comps[c]:
            todo += _called(inst)
    return seen


def loop_buffer_copies(text: str, min_bytes: int = 1 << 12) -> list[Instruction]:
    """Copies, inside a loop whose trip count is unknown (the tick loop), of an array the shape of
    one the loop carries (at least `min_bytes`): what a tick pays to copy its own buffers."""
    comps = parse(text)
    found = []
    for inst in (i for comp in comps.values() for i in comp):
        if inst.op != "while" or "known_trip_count" in inst.text:
            continue
        carried = {(t, d) for t, d in arrays(inst.shape) if nbytes(t, d) >= min_bytes}
        body = re.search(r"body=%([\w.\-]+)", inst.text).group(1)
        for c in reachable(comps, body):
            for i in comps[c]:
                if i.op == "copy" and any(a in carried for a in arrays(i.shape)):
                    found.append(i)
    return found
