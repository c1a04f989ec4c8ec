"""The files task's parts without jax: records, chat rendering and masks, media, the index, packing
and the batch stream."""
import dataclasses
import json
import wave

import numpy as np
import pytest

from dip_jax.config import ConfigError
from dip_jax.config.overrides import apply_overrides, load_config_file
from dip_jax.data.files import records
from dip_jax.data.files.chat import ChatTokenizer, expand
from dip_jax.data.files.demo import TOKENIZER_DIR, write_dataset
from dip_jax.data.files.index import build_index
from dip_jax.data.files.media import audio_clips, image_items, load_image, log_mel, mel_filters, tile_grid
from dip_jax.data.files.source import FileDataset, FileStream
from dip_jax.data.metadata import SampleMeta
from dip_jax.data.packing import Budget, pack_best_fit, pack_greedy, padding_fraction

MARKED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|>\\n' }}{% generation %}"
          "{{ m['content'] + eos_token + '\\n' }}{% endgeneration %}{% else %}"
          "{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
CHAT = [("system", "Be brief."), ("user", "<image>\nWhich digits are written here?"), ("assistant", "Three, one."),
        ("user", "Read the digits in order."), ("assistant", "Three.")]


def tokenizer_dir(tmp_path, template):
    d = tmp_path / "tok"
    d.mkdir(exist_ok=True)
    (d / "tokenizer.json").write_text((TOKENIZER_DIR / "tokenizer.json").read_text())
    conf = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**conf, "chat_template": template}))
    return d


def files_cfg(root, data, **data_kw):
    cfg = load_config_file(str(root / "configs/tiny_cpu.py"))
    cfg = apply_overrides(cfg, ["data.task=files", f"data.path={data}", f"data.tokenizer={TOKENIZER_DIR}",
                                "model.audio=none"])
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data_kw)) if data_kw else cfg


# -- chat rendering and loss masks -------------------------------------------------------------
@pytest.mark.parametrize("template", ["shipped", "marked"])
def test_assistant_masks_equal_transformers_generation_masks(tmp_path, template):
    """Our turn-by-turn spans, against transformers' own rendering and its assistant mask from a
    template with generation markers (the same text): the shipped template has no markers."""
    from transformers import PreTrainedTokenizerFast
    ours = ChatTokenizer(str(TOKENIZER_DIR if template == "shipped" else tokenizer_dir(tmp_path, MARKED)))
    ref = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"), eos_token="</s>")
    ref.add_special_tokens({"additional_special_tokens": ["<image>", "<audio>"]})
    ref.chat_template = MARKED
    messages = [{"role": r, "content": t} for r, t in CHAT]
    out = ref.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, labels = ours.encode(CHAT)
    assert ids.tolist() == out["input_ids"]
    assert labels.astype(int).tolist() == out["assistant_masks"]
    assert ours.render(CHAT) == ref.apply_chat_template(messages, tokenize=False)
    # negative control: the masks differ once a user turn is relabelled
    ids2, labels2 = ours.encode([(r if i != 2 else "user", t) for i, (r, t) in enumerate(CHAT)])
    assert labels2.sum() < labels.sum()


def test_placeholders_are_added_once_and_expand_to_item_runs():
    tok = ChatTokenizer(str(TOKENIZER_DIR))
    assert tok.tok.encode("<image><audio>", add_special_tokens=False).ids == [tok.image_id, tok.audio_id]
    ids, labels = tok.encode([("user", "<image>a<image>"), ("assistant", "b")])
    out, lab = expand(ids, labels, {tok.image_id: [3, 5]})
    assert (out == tok.image_id).sum() == 8 and not lab[out == tok.image_id].any()
    assert lab.sum() == labels.sum()


def test_template_that_does_not_render_turn_by_turn_is_an_error(tmp_path):
    bad = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok = ChatTokenizer(str(tokenizer_dir(tmp_path, bad)))
    with pytest.raises(ValueError, match="sum of its turns"):
        tok.encode(CHAT)


# -- record formats ------------------------------------------------------------------------------
def test_llava_and_messages_formats_parse_to_the_same_conversation(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.wav").write_bytes(b"x")
    llava = {"image": "a.png", "audio": ["b.wav"], "conversations": [
        {"from": "human", "value": "<image>\n<audio>\nWhat?"}, {"from": "gpt", "value": "This."}]}
    msgs = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "\n"},
                                                      {"type": "audio", "path": "b.wav"}, {"type": "text", "text": "\nWhat?"}]},
                         {"role": "assistant", "content": "This."}]}
    a, b = records.parse(llava, tmp_path), records.parse(msgs, tmp_path)
    assert a == b and a.images == (str(tmp_path / "a.png"),)
    # images without markers go before the first human turn, as LLaVA does
    c = records.parse({"image": ["a.png", "a.png"], "conversations": [{"from": "human", "value": "Hi"},
                                                                     {"from": "gpt", "value": "Yo"}]}, tmp_path)
    assert c.turns[0] == ("user", "<image>\n<image>\nHi")
    assert records.parse({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
                         tmp_path).images == ()


@pytest.mark.parametrize("record, reason", [
    ({"image": ["a.png", "a.png"], "conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}]},
     "placeholder_mismatch"),
    ({"conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}]}, "placeholder_mismatch"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "<image>"}]},
                   {"role": "assistant", "content": "y"}]}, "placeholder_mismatch"),
    ({"image": "gone.png", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}, "missing_media"),
    ({"conversations": [{"from": "human", "value": "x"}]}, "no_assistant_turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}, "no_assistant_turn"),
    ({"text": "x"}, "unknown_format"),
    (records.BadRecord("malformed_json", "x"), "malformed_json"),
])
def test_bad_records_are_named_by_reason(tmp_path, record, reason):
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(records.BadRecord) as e:
        records.parse(record, tmp_path)
    assert e.value.reason == reason


# -- media -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "LA", "I;16"])
def test_any_image_mode_becomes_the_encoder_input(tmp_path, mode):
    from PIL import Image
    path = tmp_path / f"x.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    Image.new(mode, (40, 20)).save(path)
    for channels in (1, 3):
        x = load_image(str(path), 16, channels)
        assert x.shape == (1, 16, 16, channels) and x.dtype == np.float32 and -1 <= x.min() <= x.max() <= 1


def test_transparent_pixels_become_white_and_tiles_follow_the_header(tmp_path):
    from PIL import Image
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert np.allclose(load_image(str(tmp_path / "t.png"), 8, 3), 1.0)
    Image.new("RGB", (6000, 4000), (10, 200, 30)).save(tmp_path / "big.jpg")
    assert tile_grid(6000, 4000, 1, 336) == (1, 1) and image_items(6000, 4000, 1, 336) == 1
    assert tile_grid(6000, 4000, 7, 336) == (3, 2) and image_items(6000, 4000, 7, 336) == 7
    assert tile_grid(300, 300, 7, 336) == (1, 1)       # small: one item, no thumbnail
    x = load_image(str(tmp_path / "big.jpg"), 16, 3, tiles_max=7, tile_size=336)
    assert x.shape == (7, 16, 16, 3)
    assert np.allclose(x[0].mean((0, 1)), np.array([10, 200, 30]) / 127.5 - 1, atol=0.05)


def _wav(path, seconds, rate, freq=1000.0, channels=2):
    t = np.arange(int(seconds * rate)) / rate
    x = (0.5 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(x[:, None], channels, 1).tobytes())


def test_audio_becomes_log_mel_clips_peaking_at_the_tone(tmp_path):
    import soundfile
    _wav(tmp_path / "a.wav", 2.5, 8000)
    soundfile.write(tmp_path / "a.flac", soundfile.read(tmp_path / "a.wav")[0], 8000)
    for name in ("a.wav", "a.flac"):
        clips = audio_clips(str(tmp_path / name), 3, 32, 32, 16)
        assert clips.shape == (3, 32, 16)
        assert (clips[2, 16:] == clips.min()).all()       # past 2.5 s: silence padding
    mel = log_mel(np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000).astype(np.float32), 32, 40)
    centres = np.argmax(mel_filters(1024, 40), axis=1) * 8000 / 512
    assert abs(centres[mel.mean(0).argmax()] - 1000) < 150


# -- the index and its cache -----------------------------------------------------------------------
def test_index_is_cached_and_rebuilt_when_the_file_or_tokenizer_changes(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "d", train_records=5, eval_records=1)
    tok = ChatTokenizer(str(TOKENIZER_DIR))
    cache = tmp_path / "cache"
    first = build_index(data / "train.jsonl", tok, "", cache)
    assert len(first) == 5 and len(list(cache.glob("*.json"))) == 1
    from dip_jax.data.files import index
    calls = []
    real = index.index_record
    monkeypatch.setattr(index, "index_record", lambda *a: calls.append(1) or real(*a))
    assert build_index(data / "train.jsonl", tok, "", cache) == first and not calls     # read from the cache
    with open(data / "train.jsonl", "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}) + "\n")
    assert len(build_index(data / "train.jsonl", tok, "", cache)) == 6 and len(calls) == 6
    other = ChatTokenizer(str(tokenizer_dir(tmp_path, MARKED)))
    build_index(data / "train.jsonl", other, "", cache)
    assert len(calls) == 12 and len(list(cache.glob("*.json"))) == 3


def bad_dataset(tmp_path):
    """Each reason once, among good records in odd image modes and sizes."""
    from PIL import Image
    d = tmp_path / "bad"
    d.mkdir()
    Image.new("RGBA", (30, 20), (255, 0, 0, 128)).save(d / "rgba.png")
    Image.new("L", (12, 12), 90).save(d / "gray.png")
    Image.new("RGB", (6000, 4000), (0, 0, 255)).save(d / "huge.png")
    Image.new("RGB", (64, 64), (0, 255, 0)).save(d / "ok.png")
    (d / "trunc.png").write_bytes((d / "ok.png").read_bytes()[:60])
    (d / "noise.wav").write_bytes(b"RIFF0000WAVEjunk")
    qa = lambda q, a="It is so.": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    lines = [json.dumps({"image": "rgba.png", "conversations": qa("<image>\nColour?")}),
             json.dumps({"image": "gone.png", "conversations": qa("<image>\nColour?")}),
             json.dumps({"image": "gray.png", "conversations": qa("<image>\nColour?")}),
             '{"image": "ok.png", "conversations": [',
             json.dumps({"image": "trunc.png", "conversations": qa("<image>\nColour?")}),
             json.dumps({"image": "huge.png", "conversations": qa("<image>\nColour?")}),
             json.dumps({"conversations": [{"from": "human", "value": "Hello?"}]}),
             json.dumps({"image": ["ok.png", "ok.png"], "conversations": qa("<image>\nTwo?")}),
             json.dumps({"messages": [{"role": "user", "content": [{"type": "audio", "path": "noise.wav"}]},
                                      {"role": "assistant", "content": "Noise."}]}),
             json.dumps({"text": "plain"}),
             json.dumps({"messages": [{"role": "user", "content": "Text only?"}, {"role": "assistant", "content": "Yes."}]}),
             json.dumps({"messages": [{"role": "user", "content": [{"type": "audio", "path": "tone.wav"}]},
                                      {"role": "assistant", "content": "A tone."}]})]
    _wav(d / "tone.wav", 1.5, 22050)
    (d / "data.jsonl").write_text("\n".join(lines) + "\n")
    return d / "data.jsonl"


EXPECTED_SKIPS = {"missing_media": 1, "malformed_json": 1, "unreadable_image": 1, "no_assistant_turn": 1,
                  "placeholder_mismatch": 1, "unreadable_audio": 1, "unknown_format": 1}


def test_every_bad_record_is_skipped_and_counted_or_stops_the_run_naming_its_line(root, tmp_path):
    path = bad_dataset(tmp_path)
    cfg = files_cfg(root, path)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, audio=load_config_file(
        str(root / "configs/tiny_cpu.py")).model.audio))
    ds = FileDataset(cfg, "train", tmp_path / "cache")
    assert ds.skipped == EXPECTED_SKIPS
    assert len(ds.refs) == 5 and ds.first_bad[0].startswith(f"{path}:2: missing_media")
    assert ds.refs[4].meta == SampleMeta(text_tokens=ds.refs[4].meta.text_tokens, audio_seconds=2.0)
    assert "skipped 7 bad records" in ds.warning()
    s, failed = ds.sample(ds.refs[2], 0)              # the 6000x4000 image, read whole
    assert failed is None and s.images.shape == (1, 16, 16, 3)
    with pytest.raises(ConfigError, match=rf"^data.bad_records=error: {path}:2: missing_media: "):
        FileDataset(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, bad_records="error")), "train")
    s, failed = ds.sample(ds.refs[4], 0)
    assert failed is None and s.audio.shape == (2, 32, 16)
    # without an audio encoder the good audio record cannot train: counted as such
    assert FileDataset(files_cfg(root, path), "train").skipped == {**EXPECTED_SKIPS, "no_encoder": 1}


def test_files_keys_are_refused_under_another_task(root):
    cfg = load_config_file(str(root / "configs/tiny_cpu.py"))
    for override in ("data.path=x.jsonl", "data.tokenizer=tok", "data.image_tiles_max=4", "data.bad_records=error",
                     "data.image_tile_size=224"):
        key = override.split("=")[0]
        with pytest.raises(ConfigError, match=rf"^{key}: only data.task=files reads it"):
            apply_overrides(cfg, [override])
    with pytest.raises(ConfigError, match=r"^data.tokenizer: the files task needs a tokenizer directory"):
        apply_overrides(cfg, ["data.task=files", "data.path=x.jsonl"])
    assert apply_overrides(cfg, ["data.path=x.jsonl", "data.task=files", "data.tokenizer=t"]).data.path == "x.jsonl"


def test_vocab_larger_than_the_model_is_refused_naming_both(root, tmp_path):
    data = write_dataset(tmp_path / "d", train_records=5, eval_records=1)
    with_dit = apply_overrides(load_config_file(str(root / "configs/t2v_s.py")), [
        "data.task=files", f"data.path={data / 'train.jsonl'}", f"data.tokenizer={TOKENIZER_DIR}"])
    with pytest.raises(ConfigError, match="^model.dit: the files task brings no video"):
        FileDataset(with_dit, "train")
    cfg = apply_overrides(files_cfg(root, data / "train.jsonl"), ["model.llm.vocab_size=100"])
    with pytest.raises(ConfigError, match=r"^model.llm.vocab_size: 100 is smaller than the tokenizer's 192 tokens"):
        FileDataset(cfg, "train")


# -- packing and the stream --------------------------------------------------------------------------
def test_best_fit_respects_capacities_fills_every_microbatch_and_pads_less_than_greedy():
    rng = np.random.default_rng(0)
    b = Budget(seq_len=128, max_images=4, max_audio_clips=0, max_video_clips=0, tokens_per_image=4,
               tokens_per_audio_clip=0, audio_clip_seconds=1.0, video_clip_seconds=1.0)
    metas = [SampleMeta(int(rng.integers(5, 100)), int(rng.integers(0, 3))) for _ in range(4000)]
    best, greedy, start = [], [], 0
    while start < 3000:
        mbs, rest, closed = pack_best_fit(metas[start:start + 200], b, 8)
        assert closed and all(mbs)
        for mb in mbs:
            assert all(sum(u) <= c for u, c in zip(zip(*(b.usage(metas[start + i]) for i in mb)), b.capacity))
        best.append(padding_fraction([[metas[start + i] for i in mb] for mb in mbs], b))
        start += min(rest) if rest else 200          # what a stream would carry over, approximately
    mbs_g = [pack_greedy(metas[s:], b, 8) for s in range(0, 3000, 40)]
    greedy = [padding_fraction([[metas[s + i] for i in mb] for mb in mbs], b) for s, (mbs, _) in
              zip(range(0, 3000, 40), mbs_g)]
    assert np.mean(best) < 0.5 * np.mean(greedy)


def test_stream_reads_every_record_once_per_epoch_and_is_a_function_of_the_index(root, tmp_path):
    data = write_dataset(tmp_path / "d", train_records=50, eval_records=20)
    cfg = files_cfg(root, data / "train.jsonl", eval_path=str(data / "eval.jsonl"))
    a, b = FileStream(cfg, "train", tmp_path / "c"), FileStream(cfg, "train", tmp_path / "c")
    seen = [x for i in range(12) for mb in a.layout(i)[0] for x in mb]
    assert len(seen) == len(set(seen))
    assert {r for e, r in seen if e == 0} == set(range(50)) and {r for e, r in seen if e == 1} == set(range(50))
    assert a.epoch(11) >= 2 and b.metadata(7) == a.metadata(7)
    assert b.layout(3)[0] != a.layout(4)[0]
    carried = []
    for i in range(300):                              # the records carried between batches stay few
        a.layout(i)
        carried.append(len(a._carry))
    assert max(carried) < 256 and a.epoch(299) > 100
    c = FileStream(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=1)), "train", tmp_path / "c")
    assert c.layout(0)[0] != a.layout(0)[0]
    ev = FileStream(cfg, "eval", tmp_path / "c")
    n = ev.eval_batch_count(10 ** 6)
    assert {r for i in range(n) for mb in ev.layout(i)[0] for e, r in mb if e == 0} == set(range(20))
    assert ev.eval_batch_count(1) == 1


def test_collated_file_batch_puts_every_item_at_its_placeholders(root, tmp_path):
    """The tokenizer's placeholder ids (not the specs' reserved ids) locate images and audio clips."""
    from dip_jax.data.pipeline import PackedBatches
    path = bad_dataset(tmp_path)
    full = load_config_file(str(root / "configs/tiny_cpu.py"))
    cfg = dataclasses.replace(files_cfg(root, path), model=full.model)
    batch = PackedBatches(cfg, cache_dir=tmp_path / "c")(0)
    a, tok = batch.arrays, FileDataset(cfg, "train", tmp_path / "c").tok
    metas = [m for mb in batch.metadata for m in mb]
    for key, pos_key, ph, n in (("images", "image_pos", tok.image_id, sum(m.images for m in metas)),
                                ("audio", "audio_pos", tok.audio_id, sum(-(-m.audio_seconds // 1) for m in metas))):
        valid = a[pos_key][..., 0] < cfg.data.seq_len
        assert valid.sum() == n > 0
        rows = np.nonzero(valid)[0]
        assert (a["tokens"][rows[:, None], a[pos_key][valid]] == ph).all()
        assert (a["tokens"] == ph).sum() == a[pos_key][valid].size
        assert np.abs(a[key][valid]).sum() > 0 and not a[key][~valid].any()
    assert not (a["loss_mask"] * np.isin(a["targets"], [tok.image_id, tok.audio_id])).any()


def test_parquet_glob_and_shard_directory_read_the_same_records(root, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    data = write_dataset(tmp_path / "d", train_records=30, eval_records=1)
    rows = [json.loads(line) for line in open(data / "train.jsonl")]
    shards = tmp_path / "d" / "shards"
    shards.mkdir()
    (shards / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    pq.write_table(pa.Table.from_pylist(rows[10:]), shards / "b.parquet")
    (shards / "notes.txt").write_text("not records")
    ref = FileDataset(files_cfg(root, data / "train.jsonl"), "train")
    for spec in (shards, f"{shards}/*"):
        ds = FileDataset(files_cfg(root, spec, media_root=str(data)), "train")     # media beside the shards' parent
        assert [f.name for f in ds.files] == ["a.jsonl", "b.parquet"]
        assert [r.meta for r in ds.refs] == [r.meta for r in ref.refs]
        for k in (3, 25):
            a, b = ds.sample(ds.refs[k], 0)[0], ref.sample(ref.refs[k], 0)[0]
            assert (a.tokens == b.tokens).all() and (a.labels == b.labels).all() and (a.images == b.images).all()
    with pytest.raises(ConfigError, match=r"^data.path: .*nothing\*: no .jsonl or .parquet records there"):
        FileDataset(files_cfg(root, f"{shards}/nothing*"), "train")
    with pytest.raises(ConfigError, match="missing_media"):                 # without the media root
        FileDataset(files_cfg(root, shards, bad_records="error"), "train")


def test_anyres_tiles_are_counted_from_headers_and_decoded_as_items(root, tmp_path):
    path = bad_dataset(tmp_path)
    cfg = files_cfg(root, path, image_tiles_max=7, max_images=8)
    ds = FileDataset(cfg, "train", tmp_path / "c")
    huge = next(r for r in ds.refs if r.entry["image_sizes"] == [[6000, 4000]])
    assert huge.meta.images == 7 and [r.meta.images for r in ds.refs if r is not huge] == [1, 1, 0]
    s, failed = ds.sample(huge, 0)
    t = cfg.model.vision.tokens_per_image
    assert failed is None and s.images.shape[0] == 7 and (s.tokens == ds.tok.image_id).sum() == 7 * t


def test_media_that_fails_to_decode_after_indexing_keeps_its_slot_without_loss(root, tmp_path):
    from PIL import Image
    data = write_dataset(tmp_path / "d", train_records=6, eval_records=1)
    cfg = files_cfg(root, data / "train.jsonl")
    ds = FileDataset(cfg, "train", tmp_path / "c")
    ref = ds.refs[0]
    good, _ = ds.sample(ref, 0)
    victim = json.loads(open(data / "train.jsonl").readline())["image"][0]
    Image.new("L", (8, 8)).save(data / victim)
    (data / victim).write_bytes((data / victim).read_bytes()[:30])          # truncated after indexing
    s, failed = ds.sample(ref, 0)
    assert failed == "unreadable_image" and not s.labels.any() and good.labels.any()
    assert s.images.shape == good.images.shape and not s.images.any() and (s.tokens == good.tokens).all()
    strict = FileDataset(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, bad_records="error")), "train",
                         tmp_path / "c")
    with pytest.raises(ConfigError, match=rf"^data.bad_records=error: {data / 'train.jsonl'}:1: unreadable_image"):
        strict.sample(strict.refs[0], 0)


def test_over_long_records_are_cut_to_what_the_planner_was_told(root, tmp_path):
    """data.oversize=truncate: the decoded sample has exactly the packed metadata's tokens and
    items, so the planned batch is the collated one."""
    from dip_jax.data.collate import collate
    from PIL import Image
    d = tmp_path / "long"
    d.mkdir()
    Image.new("RGB", (20, 20), (9, 99, 199)).save(d / "a.png")
    long = " ".join(["seven"] * 90) + "."
    rows = [{"image": ["a.png"] * 3, "conversations": [{"from": "human", "value": "<image>" * 3 + "\nRead it all."},
                                                       {"from": "gpt", "value": long}]},
            {"conversations": [{"from": "human", "value": long}, {"from": "gpt", "value": "Seven."}]},
            {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nShort?"}, {"from": "gpt", "value": "Yes."}]}]
    (d / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = files_cfg(root, d / "r.jsonl", seq_len=48, microbatches=2, max_images=2)
    ds = FileDataset(cfg, "train")
    assert [r.truncated for r in ds.refs] == [True, True, False]
    b = ds.budget
    for ref in ds.refs:
        s, _ = ds.sample(ref, 0)
        assert s.meta == ref.meta and len(s) == b.usage(ref.meta)[0] <= 48
        assert (s.tokens == ds.tok.image_id).sum() == ref.meta.images * b.tokens_per_image
        assert len(s.images if s.images is not None else ()) == ref.meta.images <= 2
    assert ds.refs[0].meta.images == 2 and ds.refs[0].meta.text_tokens == 48 - 2 * b.tokens_per_image
    stream = FileStream(cfg, "train")
    packed, _ = stream.samples(0)
    collate(packed, cfg, 0, ds.placeholders)                     # fits: no overflow
    skip = FileDataset(files_cfg(root, d / "r.jsonl", seq_len=48, max_images=2, oversize="skip"), "train")
    assert len(skip.refs) == 1 and skip.oversize_skipped == 2
    with pytest.raises(ConfigError, match=rf"^data.oversize: {d / 'r.jsonl'}:1 "):
        FileDataset(files_cfg(root, d / "r.jsonl", seq_len=48, max_images=2, oversize="error"), "train")


def test_replica_shares_decode_disjoint_records_that_equal_the_whole_batch(root, tmp_path):
    """Each data replica's share decodes only its microbatches, in the planner's replica order:
    the shares are disjoint, cover the batch, and their rows are the whole batch's rows."""
    from dip_jax.data.pipeline import PackedBatches, Share, replica_rows
    from dip_jax.plan.schedulers import PlanContext
    data = write_dataset(tmp_path / "d", train_records=60, eval_records=1)
    cfg = files_cfg(root, data / "train.jsonl")
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=2, pipe=1))
    order = PlanContext(cfg).replica_order
    whole = PackedBatches(cfg, cache_dir=tmp_path / "c")
    for index in range(3):
        full = whole(index)
        assert full.rows is None and len(full.decoded) == sum(map(len, full.metadata))
        got = [PackedBatches(cfg, cache_dir=tmp_path / "c", share=Share(order, (r,)))(index) for r in range(2)]
        assert not set(got[0].decoded) & set(got[1].decoded)
        assert sorted(got[0].decoded + got[1].decoded) == sorted(full.decoded)
        step_order = order(full.metadata)
        for r, b in enumerate(got):
            assert b.rows == replica_rows(step_order, (r,), 2) and len(b.rows) == cfg.data.microbatches // 2
            others = [i for i in range(cfg.data.microbatches) if i not in b.rows]
            for k, v in full.arrays.items():
                if np.ndim(v):
                    np.testing.assert_array_equal(b.arrays[k][list(b.rows)], v[list(b.rows)], err_msg=k)
                    assert not b.arrays[k][others].any() or k in ("image_pos", "audio_pos"), k
        assert sum(b.arrays["loss_mask"].sum() for b in got) == full.arrays["n_tokens"]


@pytest.mark.parametrize("workers", [0, 2])
def test_train_iterator_with_worker_processes_resumes_exactly(root, tmp_path, workers):
    from dip_jax.data.pipeline import train_iterator
    data = write_dataset(tmp_path / "d", train_records=40, eval_records=1)
    cfg = files_cfg(root, data / "train.jsonl", workers=workers)
    it = train_iterator(cfg, tmp_path / "c")
    ref = [next(it) for _ in range(6)]
    it = train_iterator(cfg, tmp_path / "c")
    for _ in range(3):
        next(it)
    state = it.get_state()
    json.dumps(state)                         # checkpointed as JSON
    resumed = train_iterator(cfg, tmp_path / "c")
    resumed.set_state(state)
    for want in ref[3:]:
        got = next(resumed)
        assert got.index == want.index and got.decoded == want.decoded
        for k in want.arrays:
            np.testing.assert_array_equal(got.arrays[k], want.arrays[k], err_msg=k)
