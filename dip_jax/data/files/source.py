"""Record files -> packed batches: the files task (`data.task="files"`).

The dataset is its metadata index (index.py) over every record file. Training reads an endless
stream of epochs, each a permutation of the good records seeded by (data.seed, epoch), packed
best-fit into batches of `data.microbatches` microbatches (a record deferred by one batch opens
the next, and a batch may span an epoch's end). The layout depends on the index alone, so batch
i is a pure function of i: the plan CLI plans it without decoding, and a resumed grain iterator
(its state is the next batch index) continues the same stream exactly. Evaluation reads the
eval records once, in file order.

Only batches' own records are decoded, when the batch is built. A file that fails to decode
although its header was good (changed since indexing) keeps its slot with blank media and no
loss, so the batch stays the one planned, and is counted by reason.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys
import threading

import numpy as np

from dip_jax.config import ConfigError, TrainConfig
from dip_jax.data.files import records
from dip_jax.data.files.chat import ChatTokenizer, expand
from dip_jax.data.files.index import build_index
from dip_jax.data.files.media import audio_clips, image_items, load_image
from dip_jax.data.metadata import Sample, SampleMeta
from dip_jax.data.oversize import oversize_error, truncate_meta
from dip_jax.data.packing import Budget, pack_best_fit
from dip_jax.specs import clips
from dip_jax.specs.builtin import AUDIO, VISION

SHOWN_BAD = 5
DECODE_REASONS = ("unreadable_image", "unreadable_audio")     # what `FileDataset.sample` may find
_SPLIT_KEY = {"train": "path", "eval": "eval_path"}


@dataclasses.dataclass(frozen=True)
class Ref:
    file: int
    entry: dict
    meta: SampleMeta              # as packed (after data.oversize)
    truncated: bool


@functools.lru_cache(maxsize=4)
def tokenizer_for(directory: str) -> ChatTokenizer:
    try:
        return ChatTokenizer(directory)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer: {e}".splitlines()[0]) from None


def check_vocab(cfg: TrainConfig, tok: ChatTokenizer) -> None:
    if tok.vocab_size > cfg.model.llm.vocab_size:
        raise ConfigError(f"model.llm.vocab_size: {cfg.model.llm.vocab_size} is smaller than the tokenizer's "
                          f"{tok.vocab_size} tokens (placeholders included) in {cfg.tokenizer_dir()}")


class FileDataset:
    """The good records of one split, their packing metadata, and the bad ones counted by reason."""

    def __init__(self, cfg: TrainConfig, split: str, cache_dir=None):
        d, m = cfg.data, cfg.model
        key = _SPLIT_KEY[split]
        self.cfg, self.budget = cfg, Budget.from_config(cfg)
        if m.dit is not None:
            # records hold no video, and a generator trained on none would learn nothing, silently
            raise ConfigError("model.dit: the files task brings no video clips; set --config.model.dit=none")
        self.tok = tokenizer_for(cfg.tokenizer_dir())
        check_vocab(cfg, self.tok)
        # collate finds each encoder's positions by these ids (the tokenizer's, see chat.py)
        self.placeholders = {VISION.encoder_items.input_key: self.tok.image_id,
                             AUDIO.encoder_items.input_key: self.tok.audio_id}
        try:
            self.files = records.record_files(getattr(d, key))
        except FileNotFoundError as e:
            raise ConfigError(f"data.{key}: {e}") from None
        self.refs: list[Ref] = []
        self.skipped: dict[str, int] = {}
        self.first_bad: list[str] = []
        self.oversize_skipped = 0
        for f, path in enumerate(self.files):
            for entry in build_index(path, self.tok, d.media_root, cache_dir):
                reason = entry.get("reason") or self._no_encoder(entry)
                if reason is not None:
                    self._bad(f"{path}:{entry['line']}", reason, entry.get("detail", reason))
                    continue
                meta = self.meta_of(entry)
                if self.budget.fits_alone(meta):
                    self.refs.append(Ref(f, entry, meta, False))
                elif d.oversize == "truncate":
                    self.refs.append(Ref(f, entry, truncate_meta(meta, self.budget), True))
                elif d.oversize == "skip":
                    self.oversize_skipped += 1
                else:
                    where = f"{path}:{entry['line']}"
                    raise ConfigError(f"data.oversize: {oversize_error(where, meta, self.budget)}")
        if not self.refs:
            raise ConfigError(f"data.{key}: no record of {getattr(d, key)} can train"
                              + (f" (first: {self.first_bad[0]})" if self.first_bad else ""))

    def _no_encoder(self, entry) -> str | None:
        if entry["image_sizes"] and self.cfg.model.vision is None:
            entry["detail"] = "no_encoder: the record has images and model.vision is none"
            return "no_encoder"
        if entry["audio_seconds"] and self.cfg.model.audio is None:
            entry["detail"] = "no_encoder: the record has audio and model.audio is none"
            return "no_encoder"
        return None

    def _bad(self, where: str, reason: str, detail: str) -> None:
        if self.cfg.data.bad_records == "error":
            raise ConfigError(f"data.bad_records=error: {where}: {detail}")
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.first_bad) < SHOWN_BAD:
            self.first_bad.append(f"{where}: {detail}")

    def warning(self) -> str | None:
        n = sum(self.skipped.values())
        if not n:
            return None
        by = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        return f"warning: skipped {n} bad records ({by}); first: " + "; ".join(self.first_bad)

    def item_widths(self, entry) -> tuple[list[int], list[int]]:
        """Encoder items per image (tiles) and audio clips per audio file."""
        m, d = self.cfg.model, self.cfg.data
        img = [image_items(w, h, d.image_tiles_max, d.image_tile_size) for w, h in entry["image_sizes"]]
        aud = [clips(s, m.audio.clip_seconds) for s in entry["audio_seconds"]] if m.audio is not None else []
        return img, aud

    def meta_of(self, entry) -> SampleMeta:
        img, aud = self.item_widths(entry)
        # the seconds the encoder runs on: each file's clips, its last one padded
        seconds = sum(aud) * self.cfg.model.audio.clip_seconds if aud else 0.0
        return SampleMeta(text_tokens=entry["text_tokens"], images=sum(img), audio_seconds=float(seconds))

    # -- one sample, decoded -------------------------------------------------------------------
    def sample(self, ref: Ref, sample_id: int) -> tuple[Sample, str | None]:
        """(the sample, the reason it failed to decode or None)."""
        m = self.cfg.model
        path = self.files[ref.file]
        base = pathlib.Path(self.cfg.data.media_root) if self.cfg.data.media_root else path.parent
        conv = records.parse(records.read_at(path, ref.entry["offset"]), base)
        ids, labels = self.tok.encode(conv.turns)
        img_items, aud_clips = self.item_widths(ref.entry)
        widths = {}
        if m.vision is not None:
            widths[self.tok.image_id] = [n * m.vision.tokens_per_image for n in img_items]
        if m.audio is not None:
            widths[self.tok.audio_id] = [n * m.audio.tokens_per_clip for n in aud_clips]
        tokens, labels = expand(ids, labels, widths)
        images = audio = None
        failed = None
        if conv.images:
            v, d = m.vision, self.cfg.data
            try:
                images = np.concatenate([load_image(p, v.image_size, v.channels, d.image_tiles_max, d.image_tile_size)
                                         for p in conv.images])
            except Exception as e:
                failed, detail = "unreadable_image", str(e)
            if images is not None and len(images) != sum(img_items):
                failed, detail = "unreadable_image", "the image changed since it was indexed"
            if failed:
                images = np.zeros((sum(img_items), v.image_size, v.image_size, v.channels), np.float32)
        if conv.audio:
            a = m.audio
            try:
                audio = np.concatenate([audio_clips(p, n, a.frames_per_second, a.frames_per_clip, a.mel_bins)
                                        for p, n in zip(conv.audio, aud_clips)])
            except Exception as e:
                failed, detail = "unreadable_audio", str(e)
                audio = np.zeros((sum(aud_clips), a.frames_per_clip, a.mel_bins), np.float32)
        if failed:
            where = f"{path}:{ref.entry['line']}"
            if self.cfg.data.bad_records == "error":
                raise ConfigError(f"data.bad_records=error: {where}: {failed}: {detail}".splitlines()[0])
            print(f"dip_jax: warning: {where}: {failed}: {detail}"[:300], file=sys.stderr, flush=True)
            labels = np.zeros_like(labels)
        s = Sample(tokens, labels, self.meta_of(ref.entry), sample_id, images=images, audio=audio)
        if ref.truncated:
            s = cut_to(s, ref.meta, self.tok.image_id, self.tok.audio_id, self.budget)
        return s, failed


def cut_to(s: Sample, meta: SampleMeta, image_id: int, audio_id: int, b: Budget) -> Sample:
    """The over-long sample cut to the counts `truncate_meta` gave the planner: its first
    `meta.images` images and first clips, and its first `meta.text_tokens` text tokens."""
    toks = s.tokens
    keep = np.zeros(len(toks), bool)
    runs = {image_id: (b.tokens_per_image, meta.images), audio_id: (b.tokens_per_audio_clip, b.audio_clips(meta))}
    seen = {image_id: 0, audio_id: 0}
    text = 0
    i = 0
    while i < len(toks):
        t = int(toks[i])
        if t in runs and runs[t][0]:
            width, limit = runs[t]
            keep[i:i + width] = seen[t] < limit
            seen[t] += 1
            i += width
            continue
        keep[i] = text < meta.text_tokens
        text += 1
        i += 1
    pick = lambda a, n: None if a is None or n == 0 else a[:n]
    return dataclasses.replace(s, tokens=toks[keep], labels=s.labels[keep], meta=meta,
                               images=pick(s.images, meta.images), audio=pick(s.audio, b.audio_clips(meta)))


class FileStream:
    """Batch index -> its packed records, for one split (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, split: str, cache_dir=None):
        self.cfg, self.split = cfg, split
        self.dataset = FileDataset(cfg, split, cache_dir)
        self.budget = self.dataset.budget
        self.batches: list[tuple] = []       # per batch: (microbatches of (epoch, ref index), epoch, oversize skips)
        self._carry: list[tuple[int, int]] = []
        self._epoch, self._pos = 0, 0
        self._orders: tuple = (None, None)
        self._lock = threading.Lock()            # the layout grows from grain's thread and the caller's

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.dataset.refs)
        if self.split == "eval":
            return np.arange(n)
        return np.random.default_rng([self.cfg.data.seed, 0xF11E, epoch]).permutation(n)

    def _cached_order(self, epoch: int) -> np.ndarray:
        if self._orders[0] != epoch:
            self._orders = (epoch, self._order(epoch))
        return self._orders[1]

    def _pull(self, k: int) -> tuple[list[tuple[int, int]], int]:
        out, skips = [], 0
        for _ in range(k):
            if self._pos == 0:
                skips += self.dataset.oversize_skipped
            out.append((self._epoch, int(self._cached_order(self._epoch)[self._pos])))
            self._pos += 1
            if self._pos == len(self.dataset.refs):
                self._epoch, self._pos = self._epoch + 1, 0
        return out, skips

    def _extend(self) -> None:
        M, refs = self.cfg.data.microbatches, self.dataset.refs
        cands, skips, closed = self._carry, 0, False
        # the carry (deferred records, then the ones looked at past the last close) comes first;
        # the stream is read only when it cannot fill a batch
        if cands:
            mbs, rest, closed = pack_best_fit([refs[r].meta for _, r in cands], self.budget, M)
        while not closed:
            more, s = self._pull(max(4 * M, len(cands)))
            cands, skips = cands + more, skips + s
            mbs, rest, closed = pack_best_fit([refs[r].meta for _, r in cands], self.budget, M)
        mbs = [[cands[i] for i in mb] for mb in mbs]
        self.batches.append((mbs, max(e for mb in mbs for e, _ in mb), skips))
        self._carry = [cands[i] for i in rest]

    def layout(self, index: int):
        with self._lock:
            while len(self.batches) <= index:
                self._extend()
            return self.batches[index]

    def metadata(self, index: int) -> tuple[tuple, ...]:
        mbs, _, _ = self.layout(index)
        return tuple(tuple(self.dataset.refs[r].meta for _, r in mb) for mb in mbs)

    def oversize(self, index: int) -> tuple[int, int]:
        mbs, _, skips = self.layout(index)
        return sum(self.dataset.refs[r].truncated for mb in mbs for _, r in mb), skips

    def epoch(self, index: int) -> int:
        return self.layout(index)[1]

    def samples(self, index: int):
        """(microbatches of Samples, decode failures by reason)."""
        packed, failed, _ = self.decode(index)
        by_reason: dict[str, int] = {}
        for _, why in failed:
            by_reason[why] = by_reason.get(why, 0) + 1
        return packed, by_reason

    def decode(self, index: int, rows=None):
        """(microbatches of Samples, (microbatch, reason) per decode failure, the records decoded
        as (epoch, "file:line"): a batch may hold a record of two epochs). `rows`: the microbatches to decode (None: all); the others stay empty,
        so a process decodes only what its own devices train."""
        mbs, _, _ = self.layout(index)
        n, failed, decoded = len(self.dataset.refs), [], []
        wanted = None if rows is None else set(rows)
        out = []
        for i, mb in enumerate(mbs):
            row = []
            for epoch, r in mb if wanted is None or i in wanted else ():
                ref = self.dataset.refs[r]
                s, why = self.dataset.sample(ref, epoch * n + r)
                row.append(s)
                decoded.append((epoch, f"{self.dataset.files[ref.file]}:{ref.entry['line']}"))
                if why:
                    failed.append((i, why))
            out.append(row)
        return out, failed, decoded

    def eval_batch_count(self, limit_samples: int) -> int:
        """Batches until every eval record was read once (the last batch may repeat a few from
        the start), or until `limit_samples` samples, whichever comes first."""
        seen, b, samples, total = set(), 0, 0, len(self.dataset.refs)
        while len(seen) < total and samples < limit_samples:
            mbs = self.layout(b)[0]
            seen.update(r for mb in mbs for e, r in mb if e == 0)
            samples += sum(map(len, mbs))
            b += 1
        return max(1, b)
