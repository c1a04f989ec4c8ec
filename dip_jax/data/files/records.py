"""Conversation records from JSONL or Parquet files, in the two formats public datasets use.

LLaVA style: {"image": "a.jpg" | [...], "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}]}; `<image>` marks where each image goes, and images without a
marker go before the first human turn, as LLaVA's preprocessing puts them.

messages style (HF / OpenAI chat): {"messages": [{"role": "user", "content": "..." | [{"type": "image",
"path": ...}, {"type": "audio", "path": ...}, {"type": "text", "text": ...}]}, ...]}.

Both become a `Conversation`: (role, text) turns whose text holds one IMAGE / AUDIO marker per media
item, in order, plus the media paths. A record that cannot train raises `BadRecord` with one of
REASONS, so a run can count what it skipped and say where.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import pathlib
from typing import Iterator

IMAGE, AUDIO = "<image>", "<audio>"
REASONS = ("malformed_json", "unknown_format", "no_assistant_turn", "placeholder_mismatch", "missing_media",
           "unreadable_image", "unreadable_audio", "no_encoder")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadRecord(ValueError):
    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Conversation:
    turns: tuple[tuple[str, str], ...]      # (role, text with IMAGE / AUDIO markers)
    images: tuple[str, ...] = ()            # resolved paths, in marker order
    audio: tuple[str, ...] = ()


def record_files(spec: str) -> list[pathlib.Path]:
    """`data.path`: a .jsonl / .parquet file, a glob, or a directory of such shards (other files
    ignored; sorted, so every process sees the same order). Raises FileNotFoundError naming it."""
    p = pathlib.Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".jsonl", ".parquet"))
    elif any(c in spec for c in "*?["):
        files = sorted(pathlib.Path(f) for f in glob.glob(spec) if f.endswith((".jsonl", ".parquet")))
    else:
        files = [p] if p.is_file() else []
    if not files:
        raise FileNotFoundError(f"{spec}: no .jsonl or .parquet records there")
    return files


def read_lines(path: pathlib.Path) -> Iterator[tuple[int, int, object]]:
    """(line number from 1, byte offset, parsed record or BadRecord) for each non-blank record of
    a file. A Parquet row counts as a line; its offset is its row number."""
    if path.suffix == ".parquet":
        for n, row in enumerate(_parquet_rows(str(path)), 1):
            yield n, n - 1, row
        return
    with open(path, "rb") as f:
        n, offset = 0, 0
        for raw in f:
            n += 1
            if raw.strip():
                yield n, offset, _json(raw)
            offset += len(raw)


def read_at(path: pathlib.Path, offset: int):
    """The record at a byte offset (JSONL) or row (Parquet), as `read_lines` gave it."""
    if path.suffix == ".parquet":
        return _parquet_rows(str(path))[offset]
    with open(path, "rb") as f:
        f.seek(offset)
        return _json(f.readline())


def _json(raw: bytes):
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return BadRecord("malformed_json", str(e).splitlines()[0])


@functools.lru_cache(maxsize=4)
def _parquet_rows(path: str) -> list:
    import pyarrow.parquet as pq
    return pq.read_table(path).to_pylist()


def parse(record, base: pathlib.Path) -> Conversation:
    """One record -> Conversation, media paths resolved against `base` (data.media_root or the
    record file's directory). Checks what needs no decoding: format, an assistant turn, marker
    counts against the media lists, that media files exist."""
    if isinstance(record, BadRecord):
        raise record
    if not isinstance(record, dict):
        raise BadRecord("unknown_format", f"expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        conv = _llava(record)
    elif "messages" in record:
        conv = _messages(record)
    else:
        raise BadRecord("unknown_format", "neither 'conversations' (LLaVA) nor 'messages'")
    if not any(role == "assistant" and text.strip() for role, text in conv.turns):
        raise BadRecord("no_assistant_turn", "no assistant turn with text to learn")
    text = "".join(t for _, t in conv.turns)
    for marker, items in ((IMAGE, conv.images), (AUDIO, conv.audio)):
        if text.count(marker) != len(items):
            raise BadRecord("placeholder_mismatch", f"{text.count(marker)} {marker} markers for {len(items)} files")
    resolve = lambda p: str(p if os.path.isabs(p) else base / p)
    conv = dataclasses.replace(conv, images=tuple(map(resolve, conv.images)), audio=tuple(map(resolve, conv.audio)))
    for p in conv.images + conv.audio:
        if not os.path.isfile(p):
            raise BadRecord("missing_media", f"{p} does not exist")
    return conv


def _paths(value, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise BadRecord("unknown_format", f"{key!r} must be a path or a list of paths")
    return tuple(value)


def _llava(record) -> Conversation:
    images, audio = _paths(record.get("image"), "image"), _paths(record.get("audio"), "audio")
    turns = []
    for t in record["conversations"] or ():
        if not isinstance(t, dict) or _ROLES.get(t.get("from")) is None or not isinstance(t.get("value"), str):
            raise BadRecord("unknown_format", f"a LLaVA turn needs 'from' in {sorted(_ROLES)} and a string 'value'")
        turns.append([_ROLES[t["from"]], t["value"]])
    first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
    for marker, items in ((IMAGE, images), (AUDIO, audio)):
        if items and first_user is not None and not any(marker in text for _, text in turns):
            turns[first_user][1] = (marker + "\n") * len(items) + turns[first_user][1]
    return Conversation(tuple(map(tuple, turns)), images, audio)


def _messages(record) -> Conversation:
    turns, images, audio = [], [], []
    for m in record["messages"] or ():
        if not isinstance(m, dict) or _ROLES.get(m.get("role")) is None:
            raise BadRecord("unknown_format", f"a message needs 'role' in {sorted(_ROLES)}")
        content = m.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            pieces = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                elif kind in ("image", "audio"):
                    path = next((part[k] for k in ("path", kind, "url") if isinstance(part.get(k), str)), None)
                    if path is None:
                        raise BadRecord("unknown_format", f"an {kind} part needs a 'path'")
                    (images if kind == "image" else audio).append(path)
                    pieces.append(IMAGE if kind == "image" else AUDIO)
                else:
                    raise BadRecord("unknown_format", f"unknown content part {part!r:.60}")
            text = "".join(pieces)
        else:
            raise BadRecord("unknown_format", "message content must be a string or a list of parts")
        turns.append((_ROLES[m["role"]], text))
    return Conversation(tuple(turns), tuple(images), tuple(audio))
