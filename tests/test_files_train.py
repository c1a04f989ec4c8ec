"""The files task end to end through the CLI under schedule=dip: a tokenizer built here (not the
shipped one), LLaVA and messages records, bad records, kill -9 and resume."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, run_cli
from test_files import EXPECTED_SKIPS, _wav, bad_dataset
from test_trainer import _losses, _wait_for_step

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20)}
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A ChatML tokenizer trained here with the tokenizers library; no <image> / <audio> tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = [f"What colour is this? Which colours, in order? It is {c}. {c.capitalize()}, {c}. A tone. Hello"
            for c in COLOURS] * 10
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]", "<|im_start|>",
                                                                                     "<|im_end|>"]))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": TEMPLATE}))
    return d


def colour_records(d, n, seed, blank=False, fmt="llava", audio=False):
    """Records whose answers name the colours of their 1-2 images (only the pixels tell), in
    either format; with `audio`, some text-only and some audio records too."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    (d / "img").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    lines = []
    for i in range(n):
        k = int(rng.integers(1, 3))
        picked = [names[j] for j in rng.integers(0, len(names), k)]
        paths = []
        for j, c in enumerate(picked):
            px = np.clip(np.asarray(COLOURS[c]) + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
            p = f"img/{seed}_{i}_{j}.png"
            Image.fromarray(np.full_like(px, 128) if blank else px).save(d / p)
            paths.append(p)
        answer = ", ".join(picked).capitalize() + "."
        if fmt == "llava":
            lines.append({"image": paths, "conversations": [
                {"from": "human", "value": "<image>" * k + "\nWhich colours, in order?"}, {"from": "gpt", "value": answer}]})
        elif audio and i % 4 == 0:
            _wav(d / f"a{i}.wav", 0.5 + i % 3, 8000, channels=1)
            lines.append({"messages": [{"role": "user", "content": [{"type": "audio", "path": f"a{i}.wav"}]},
                                       {"role": "assistant", "content": "A tone."}]})
        elif audio and i % 4 == 1:
            lines.append({"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello."}]})
        else:
            parts = [{"type": "image", "path": p} for p in paths] + [{"type": "text", "text": "\nWhich colours, in order?"}]
            lines.append({"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]})
    path = d / f"records_{seed}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def files_args(data, tokenizer, xla_cache, *extra, eval_path=None):
    return ["dip_jax.train", "--config", "configs/tiny_cpu.py", "--config.data.task=files",
            f"--config.data.path={data}", f"--config.data.tokenizer={tokenizer}", "--config.train.progress=false",
            f"--config.pipeline.compile_cache_dir={xla_cache}", "--config.data.seq_len=64",
            "--config.pipeline.plan_workers=0",                       # plans inline: no worker start-up
            *([f"--config.data.eval_path={eval_path}"] if eval_path else []), *extra]


def test_llava_images_reach_the_model(tmp_path, tokenizer, xla_cache):
    """Same records, same run; with blank images the answers cannot be read and eval_loss stays high."""
    eval_loss = {}
    for blank in (False, True):
        d = tmp_path / ("blank" if blank else "real")
        train, held = colour_records(d, 200, 1, blank), colour_records(d, 24, 2, blank)
        res = run_cli(*files_args(train, tokenizer, xla_cache, "--config.model.audio=none", "--config.train.steps=40",
                                  "--config.checkpoint.enabled=false", f"--workdir={d / 'run'}", eval_path=held))
        assert res.returncode == 0, res.stderr[-3000:]
        summary = json.loads((d / "run/summary.json").read_text())
        losses = list(_losses(d / "run/metrics.jsonl").values())
        assert summary["schedule"] == "dip" and len(losses) == 40
        assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
        assert 0 < summary["padding_fraction"] < 0.5 and summary["records_skipped"] == {}
        line = json.loads(open(d / "run/metrics.jsonl").readline())
        assert line["data_wait_seconds"] >= 0 and "padding_fraction" in line and line["epoch"] == 0
        eval_loss[blank] = summary["eval_loss"]
        assert 0 <= summary["eval_accuracy"] <= 1
    assert eval_loss[False] < eval_loss[True] - 0.1, eval_loss


def test_messages_with_audio_trains_and_resumes_exactly_after_kill_9(tmp_path, tokenizer, xla_cache):
    """Text-only, one- and two-image and audio records; killed mid-epoch, the rerun's losses are
    the uninterrupted run's."""
    data = colour_records(tmp_path, 40, 3, fmt="messages", audio=True)
    args = files_args(data, tokenizer, xla_cache, "--config.train.steps=6", "--config.checkpoint.every=2")
    ref = run_cli(*args, f"--workdir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = _losses(tmp_path / "ref/metrics.jsonl")
    lines = [json.loads(l) for l in open(tmp_path / "ref/metrics.jsonl") if '"train"' in l]
    assert max(r["epoch"] for r in lines) >= 2                   # 40 records: several epochs in 6 steps

    work = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", *args, f"--workdir={work}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(work / "metrics.jsonl", 4, proc)
    proc.kill()
    proc.wait()
    resumed = run_cli(*args, f"--workdir={work}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((work / "summary.json").read_text())["resumed_from"] in (2, 4)   # mid-run, mid-epoch
    got = _losses(work / "metrics.jsonl")
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    for step in expected:
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-6, err_msg=f"step {step}")


def test_bad_records_are_counted_by_default_and_stop_the_run_with_error(tmp_path, tokenizer, xla_cache):
    data = bad_dataset(tmp_path)
    args = files_args(data, tokenizer, xla_cache, "--config.train.steps=2", "--config.checkpoint.enabled=false")
    ok = run_cli(*args, f"--workdir={tmp_path / 'skip'}")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads((tmp_path / "skip/summary.json").read_text())["records_skipped"] == EXPECTED_SKIPS
    assert f"{data}:2: missing_media" in ok.stdout
    bad = run_cli(*args, "--config.data.bad_records=error", f"--workdir={tmp_path / 'error'}")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"error: data.bad_records=error: {data}:2: missing_media: "
                                               f"{data.parent / 'gone.png'} does not exist"]


def test_a_file_that_fails_to_decode_stops_an_error_run_keeping_what_was_trained(tmp_path, tokenizer, xla_cache):
    """A truncated JPEG passes the index (its header is whole) and fails when its batch is
    decoded: data.bad_records=error stops the run (the CLI prints the one line, exit code 2)
    after checkpointing the steps trained."""
    from PIL import Image
    from dip_jax.config.overrides import apply_overrides, load_config_file
    from dip_jax.data.files.source import FileStream
    data = colour_records(tmp_path, 120, 4)
    rows = [json.loads(line) for line in open(data)]
    args = files_args(data, tokenizer, xla_cache, "--config.train.steps=6", "--config.model.audio=none",
                      "--config.checkpoint.every=100", "--config.data.bad_records=error")
    cfg = apply_overrides(load_config_file(str(ROOT / "configs/tiny_cpu.py")),
                          [a.removeprefix("--config.") for a in args if a.startswith("--config.data")]
                          + ["model.audio=none"])
    stream = FileStream(cfg, "train")
    first = {}
    for b in range(6):
        for mb in stream.layout(b)[0]:
            for _, r in mb:
                first.setdefault(r, b)
    victim = next(r for r, b in sorted(first.items(), key=lambda x: x[1]) if b >= 3)
    path = tmp_path / rows[stream.dataset.refs[victim].entry["line"] - 1]["image"][0]
    Image.open(path).convert("RGB").save(path.with_suffix(".tmp.jpg"), quality=95)
    whole = path.with_suffix(".tmp.jpg").read_bytes()
    path.write_bytes(whole[:len(whole) * 3 // 4])                     # JPEG bytes, header intact
    from dip_jax.config import ConfigError
    from dip_jax.train.trainer import run
    full = apply_overrides(load_config_file(str(ROOT / "configs/tiny_cpu.py")),
                           [a.removeprefix("--config.") for a in args if a.startswith("--config.")])
    with pytest.raises(ConfigError, match=rf"^data.bad_records=error: {data}:\d+: unreadable_image: "):
        run(full, tmp_path / "run")
    saved = sorted(int(p.name) for p in (tmp_path / "run/checkpoints").iterdir() if p.name.isdigit())
    assert saved and 1 <= saved[-1] < first[victim] + 1


@pytest.mark.parametrize("workers", [0, 2])
def test_decode_failures_before_a_resume_are_counted_in_its_summary(tmp_path, tokenizer, xla_cache, workers):
    """Images that fail to decode (changed after indexing) in steps before and after the resume
    point: the resumed run's summary.json counts them as the uninterrupted run's does, and its
    losses are the same, with batches built by grain worker processes too."""
    import shutil
    from dip_jax.config.overrides import apply_overrides, load_config_file
    from dip_jax.data.files.source import FileStream
    from dip_jax.train.trainer import run
    data = colour_records(tmp_path, 120, 4)
    rows = [json.loads(line) for line in open(data)]
    args = files_args(data, tokenizer, xla_cache, "--config.train.steps=4", "--config.model.audio=none",
                      "--config.checkpoint.every=2", f"--config.data.workers={workers}")
    cfg = apply_overrides(load_config_file(str(ROOT / "configs/tiny_cpu.py")),
                          [a.removeprefix("--config.") for a in args if a.startswith("--config.")])
    stream = FileStream(cfg, "train")
    batches = {}
    for b in range(4):
        for mb in stream.layout(b)[0]:
            for _, r in mb:
                batches.setdefault(r, set()).add(b)
    before = next(r for r, bs in batches.items() if bs == {0})            # trained in step 1 only
    after = next(r for r, bs in batches.items() if bs == {3})             # in step 4 only
    from PIL import Image
    for r in (before, after):
        path = tmp_path / rows[stream.dataset.refs[r].entry["line"] - 1]["image"][0]
        Image.open(path).convert("RGB").save(path.with_suffix(".tmp.jpg"), quality=95)
        jpeg = path.with_suffix(".tmp.jpg").read_bytes()
        path.write_bytes(jpeg[:len(jpeg) * 3 // 4])                     # JPEG bytes, header intact: indexed
    run(cfg, tmp_path / "whole")
    whole = json.loads((tmp_path / "whole/summary.json").read_text())
    assert whole["records_skipped"] == {"unreadable_image": 2}

    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed/checkpoints/4")                   # as if killed in step 3 or 4
    (tmp_path / "resumed/summary.json").unlink()
    run(cfg, tmp_path / "resumed")
    resumed = json.loads((tmp_path / "resumed/summary.json").read_text())
    assert resumed["resumed_from"] == 2
    for key in ("records_skipped", "records_decoded", "records_decoded_per_process"):
        assert resumed[key] == whole[key], key
    assert _losses(tmp_path / "resumed/metrics.jsonl") == _losses(tmp_path / "whole/metrics.jsonl")
