"""The per-record metadata index of a record file: what the planner needs, read once.

For each record: its line and byte offset, why it cannot train (a `records.REASONS` entry) or
its text tokens (the rendered conversation without placeholders), image sizes from the file
headers and audio durations. Images are checked (Pillow's verify) but never decoded, so the
planning path reads headers only. The index is cached as JSON in `cache_dir`, keyed by the
file's path, size, mtime and content hash, the tokenizer and its template, and the media root:
change any and it is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

from dip_jax.data.files import records
from dip_jax.data.files.chat import ChatTokenizer, TemplateError
from dip_jax.data.files.media import audio_seconds, image_header

VERSION = 1
_PROGRESS_BYTES = 4 << 20        # show progress on files larger than this


def file_key(path: pathlib.Path, tokenizer: ChatTokenizer, media_root: str) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{tokenizer.fingerprint}|"
                       f"{media_root}".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:20]


def index_record(record, base: pathlib.Path, tokenizer: ChatTokenizer) -> dict:
    """{"text_tokens", "image_sizes", "audio_seconds"}, or raises records.BadRecord."""
    conv = records.parse(record, base)
    sizes, durations = [], []
    for p in conv.images:
        try:
            sizes.append(list(image_header(p)))
        except Exception as e:                     # Pillow raises many types for a bad file
            raise records.BadRecord("unreadable_image", f"{p}: {e}") from None
    for p in conv.audio:
        try:
            durations.append(audio_seconds(p))
        except Exception as e:
            raise records.BadRecord("unreadable_audio", f"{p}: {e}") from None
    try:
        ids, _ = tokenizer.encode(conv.turns)
    except TemplateError as e:
        raise records.BadRecord("unknown_format", f"chat template: {e}") from None
    placeholders = int(((ids == tokenizer.image_id) | (ids == tokenizer.audio_id)).sum())
    if placeholders != len(sizes) + len(durations):
        raise records.BadRecord("placeholder_mismatch", f"the rendered text has {placeholders} placeholder tokens "
                                                        f"for {len(sizes) + len(durations)} media files")
    return {"text_tokens": int(len(ids)) - placeholders, "image_sizes": sizes, "audio_seconds": durations}


def build_index(path: pathlib.Path, tokenizer: ChatTokenizer, media_root: str, cache_dir) -> list[dict]:
    """One entry per record: {"line", "offset", "reason"?, "detail"?, ...index_record's keys}."""
    key = file_key(path, tokenizer, media_root)
    cached = pathlib.Path(cache_dir) / f"{path.stem}.{key}.json" if cache_dir else None
    if cached is not None and cached.is_file():
        return json.loads(cached.read_text())["records"]
    base = pathlib.Path(media_root) if media_root else path.parent
    size = path.stat().st_size
    lines = records.read_lines(path)
    if size > _PROGRESS_BYTES:
        from tqdm import tqdm
        lines = tqdm(lines, desc=f"indexing {path.name}", unit=" records", leave=False)
    out = []
    for n, offset, record in lines:
        entry = {"line": n, "offset": offset}
        try:
            entry.update(index_record(record, base, tokenizer))
        except records.BadRecord as e:
            entry.update(reason=e.reason, detail=str(e).splitlines()[0][:300])
        out.append(entry)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"file": str(path), "records": out}))
        os.replace(tmp, cached)                    # atomic: a reader never sees half an index
    return out
