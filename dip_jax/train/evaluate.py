"""Evaluation: held-out loss, and greedy decoding accuracy for the digits task."""
from __future__ import annotations

import numpy as np

from dip_jax.data.metadata import EOS


def label_order(loss_mask, segment_ids):
    """For each row, the predicting positions of its labels grouped by decoding step.

    Returns a list over steps j of (rows, positions): position p predicts token p+1, the j-th
    label of its segment.
    """
    steps: list[tuple[list[int], list[int]]] = []
    for r in range(loss_mask.shape[0]):
        count: dict[int, int] = {}
        for p in np.flatnonzero(loss_mask[r] > 0):
            seg = int(segment_ids[r, p])
            j = count.get(seg, 0)
            count[seg] = j + 1
            while len(steps) <= j:
                steps.append(([], []))
            steps[j][0].append(r)
            steps[j][1].append(int(p))
    return steps


def greedy_accuracy(logits_fn, params, batches, put, ignore=None) -> dict[str, float]:
    """Greedy decoding: each answer token is predicted from the model's own earlier answers.

    eval_accuracy is per answer token, not counting `ignore` (default: the digits task's EOS);
    eval_sequence_accuracy counts samples whose labels are all right.
    """
    ignore = np.asarray(sorted((EOS,) if ignore is None else ignore), np.int64)
    digit_ok = digit_n = seq_ok = seq_n = 0
    for batch in batches:
        a = batch.arrays
        tokens = a["tokens"].copy()
        steps = label_order(a["loss_mask"], a["segment_ids"])
        answer = np.zeros_like(tokens)
        for rows, pos in steps:                      # blank the answers: they must be generated
            tokens[rows, np.asarray(pos) + 1] = 0
        for rows, pos in steps:
            pred = np.asarray(logits_fn(params, put({**a, "tokens": tokens})))
            rows, pos = np.asarray(rows), np.asarray(pos)
            choice = pred[rows, pos].argmax(-1)
            tokens[rows, pos + 1] = choice
            answer[rows, pos + 1] = choice
        target_pos = a["loss_mask"] > 0
        for r in range(tokens.shape[0]):
            segs = a["segment_ids"][r]
            for seg in np.unique(segs[segs > 0]):
                lab = np.flatnonzero(target_pos[r] & (segs == seg)) + 1
                truth, got = a["tokens"][r, lab], answer[r, lab]
                is_digit = ~np.isin(truth, ignore)
                digit_ok += int(np.sum((truth == got) & is_digit))
                digit_n += int(np.sum(is_digit))
                seq_ok += int(np.all(truth == got))
                seq_n += 1
    return {"eval_accuracy": digit_ok / max(1, digit_n), "eval_sequence_accuracy": seq_ok / max(1, seq_n),
            "eval_samples": seq_n}
