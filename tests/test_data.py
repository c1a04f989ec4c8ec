import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dip_jax.config import DiTConfig, TrainConfig
from dip_jax.data.digits import split_indices
from dip_jax.data.metadata import AUD, IMG, SampleMeta
from dip_jax.data.packing import Budget, pack_greedy, pack_into_batches
from dip_jax.data.pipeline import PackedBatches, train_iterator
from dip_jax.config.overrides import apply_overrides, load_config_file

BUDGET = Budget(seq_len=128, max_images=8, max_audio_clips=4, max_video_clips=4, tokens_per_image=4,
                tokens_per_audio_clip=8, audio_clip_seconds=1.0, video_clip_seconds=1.0)

metas = st.builds(SampleMeta, text_tokens=st.integers(1, 60), images=st.integers(0, 8),
                  audio_seconds=st.sampled_from([0.0, 0.5, 1.0, 2.5, 4.0]),
                  video_seconds=st.sampled_from([0.0, 0.3, 1.0, 3.9]))


@settings(max_examples=200, deadline=None)
@given(st.lists(metas, min_size=1, max_size=60), st.one_of(st.none(), st.integers(1, 6)))
def test_packing_respects_every_capacity_and_keeps_order(stream, m):
    mbs, used = pack_greedy(stream, BUDGET, m)
    flat = [i for mb in mbs for i in mb]
    assert flat == list(range(len(flat))), "greedy packing keeps stream order, drops nothing in between"
    if used < len(stream):        # stopped early: exactly m microbatches, next sample starts the next batch
        assert len(mbs) == m and used == flat[-1] + 1
    else:
        assert flat == list(range(len(stream)))
    for mb in mbs:
        usage = np.sum([BUDGET.usage(stream[i]) for i in mb], axis=0)
        assert all(u <= c for u, c in zip(usage, BUDGET.capacity))
        assert mb, "no empty microbatch"
    if m is not None:
        assert len(mbs) <= m


def test_pack_into_batches_uses_every_sample_once():
    stream = [SampleMeta(text_tokens=30 + i % 50, images=i % 3) for i in range(100)]
    batches = pack_into_batches(stream, BUDGET, 4)
    assert [s for b in batches for mb in b for s in mb] == stream
    assert all(len(b) == 4 for b in batches[:-1])


def test_sample_too_large_is_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        pack_greedy([SampleMeta(text_tokens=500)], BUDGET)


def _with_dit(cfg: TrainConfig) -> TrainConfig:
    model = dataclasses.replace(cfg.model, dit=DiTConfig(layers=4, dim=32, mlp_hidden=64, heads=4, kv_heads=4))
    return dataclasses.replace(cfg, model=model)


@pytest.fixture(params=["tiny_cpu", "tiny_dit", "digits_cpu"])
def cfg(request, root):
    name = request.param
    c = load_config_file(root / f"configs/{'tiny_cpu' if name == 'tiny_dit' else name}.py")
    return _with_dit(c) if name == "tiny_dit" else c


def test_metadata_matches_content(cfg):
    source = PackedBatches(cfg)
    budget = Budget.from_config(cfg)
    for index in range(6):
        batch = source(index)
        a = batch.arrays
        assert len(batch.metadata) == cfg.data.microbatches
        for i, mb in enumerate(batch.metadata):
            seq = int(np.sum(a["segment_ids"][i] > 0))
            assert seq == sum(budget.usage(s)[0] for s in mb) <= cfg.data.seq_len
            text = np.sum((a["tokens"][i] != IMG) & (a["tokens"][i] != AUD) & (a["segment_ids"][i] > 0))
            assert text == sum(s.text_tokens for s in mb)
            if "image_pos" in a:
                n_img = int(np.sum(a["image_pos"][i, :, 0] < cfg.data.seq_len))
                assert n_img == sum(s.images for s in mb)
                assert np.all(a["tokens"][i][a["image_pos"][i][a["image_pos"][i] < cfg.data.seq_len]] == IMG)
            if "audio_pos" in a:
                n_aud = int(np.sum(a["audio_pos"][i, :, 0] < cfg.data.seq_len))
                assert n_aud == sum(budget.audio_clips(s) for s in mb)
            if "video_valid" in a:
                assert a["video_valid"][i].sum() == sum(budget.video_clips(s) for s in mb)
        assert a["n_tokens"] == a["loss_mask"].sum()


def test_synthetic_mixture_has_every_kind(root):
    cfg = _with_dit(load_config_file(root / "configs/tiny_cpu.py"))
    metas = [s for i in range(10) for mb in PackedBatches(cfg)(i).metadata for s in mb]
    assert any(m.images == 1 for m in metas) and any(m.images > 1 for m in metas)
    assert any(m.audio_seconds > 0 for m in metas) and any(m.video_seconds > 0 for m in metas)
    assert len({m.images for m in metas}) > 2, "image counts per sample vary"


def test_batches_are_a_pure_function_of_their_index(root):
    cfg = load_config_file(root / "configs/tiny_cpu.py")
    a, b = PackedBatches(cfg)(7), PackedBatches(cfg)(7)
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    assert not np.array_equal(a.arrays["tokens"], PackedBatches(cfg)(8).arrays["tokens"])


def test_iterator_resume_is_exact(root):
    cfg = load_config_file(root / "configs/tiny_cpu.py")
    it = train_iterator(cfg)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    fresh = train_iterator(cfg)
    fresh.set_state(state)
    for e in expected:
        got = next(fresh)
        assert got.index == e.index
        np.testing.assert_array_equal(got.arrays["tokens"], e.arrays["tokens"])
        np.testing.assert_array_equal(got.arrays["images"], e.arrays["images"])


def test_digits_split_is_disjoint_80_20_and_eval_uses_held_out_only(root):
    train, held = split_indices("train"), split_indices("eval")
    assert not set(train) & set(held)
    assert abs(len(held) / (len(train) + len(held)) - 0.2) < 0.01
    cfg = load_config_file(root / "configs/digits_cpu.py")
    from dip_jax.data.digits import DigitSamples, _load
    images = _load()[0]
    src = DigitSamples(cfg, "eval")
    rng = np.random.default_rng(0)
    held_set = {images[i].tobytes() for i in held}
    for i in range(50):
        s = src.sample(rng, i)
        assert all(img.tobytes() in held_set for img in s.images)
        assert s.meta.images == len(s.images) <= cfg.data.digits_max_images


def test_metadata_overrides_change_the_batch_layout(root):
    cfg = apply_overrides(load_config_file(root / "configs/tiny_cpu.py"), ["data.max_images=3"])
    a = PackedBatches(cfg)(0).arrays
    assert a["images"].shape[1] == 3
