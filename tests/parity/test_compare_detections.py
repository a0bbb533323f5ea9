"""flaxdet.parity.compare_detections: what counts as a tie flip (a reordering of near-tied rows, or the other
winner of a near-tie in NMS) and what is a failure (boxes or labels wrong while the scores agree)."""
from __future__ import annotations

import numpy as np

from flaxdet.parity import compare_detections

T = dict(bboxes=np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], float),
         scores=np.array([0.9, 0.5, 0.5]), labels=np.array([1, 2, 2]))


def _order(ours):
    return compare_detections("det", ours, T, box_atol=1e-2, score_atol=1e-4)[0]


def test_reordered_near_ties_are_counted_flips():
    row = _order({k: v[[0, 2, 1]] for k, v in T.items()})
    assert row.passed and row.extra["tie_flips"] == 2


def test_wrong_boxes_or_labels_with_equal_scores_fail():
    assert not _order(dict(T, bboxes=T["bboxes"] + 0.024)).passed  # just outside the box tolerance
    assert not _order(dict(T, bboxes=T["bboxes"] + 5, labels=np.array([3, 4, 4]))).passed


def test_the_other_winner_of_an_nms_tie_is_a_flip():
    other = T["bboxes"].copy()
    other[1] += 1.0  # a different, overlapping candidate of the same class kept instead
    assert _order(dict(T, bboxes=other)).passed
