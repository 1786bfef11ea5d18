"""Property tests for pot.metrics that are too broad for the notebook: random shapes, class counts and
threshold sets (non-uniform, outside [0, 1]) for the one-pass CAM sweep; merging; plain-JSON results."""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from pot.metrics import CAMEvaluator, SegEvaluator, confusion_matrix


def naive(items, n_classes, thresholds):
    out = np.zeros((len(thresholds), n_classes, n_classes), np.int64)
    for j, t in enumerate(thresholds):
        for gt, cams, keys in items:
            stack = np.concatenate([np.full((1,) + gt.shape, t), cams.astype(np.float64)])
            out[j] += confusion_matrix(gt, np.concatenate([[0], keys])[stack.argmax(0)], n_classes)
    return out


def random_items(rng, n_classes, n_images, grid):
    items = []
    for _ in range(n_images):
        H, W = rng.integers(1, 12, 2)
        keys = rng.choice(np.arange(1, n_classes), rng.integers(0, min(3, n_classes - 1) + 1), replace=False)
        cams = rng.uniform(-0.2, 1.2, (len(keys), H, W))
        on = rng.random(cams.shape) < 0.4
        cams[on] = grid[rng.integers(0, len(grid), on.sum())]
        gt = rng.choice(np.r_[0:n_classes, 255], (H, W)).astype(np.uint8)
        items.append((gt, cams.astype(rng.choice([np.float32, np.float64])), keys.astype(np.int64)))
    return items


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n_classes=st.integers(2, 7), n_th=st.integers(1, 15), n_images=st.integers(1, 4))
def test_sweep_equals_naive(seed, n_classes, n_th, n_images):
    rng = np.random.default_rng(seed)
    th = np.unique(np.round(rng.uniform(-0.3, 1.3, n_th), 2))
    items = random_items(rng, n_classes, n_images, th)
    ev = CAMEvaluator(n_classes, th)
    for it in items: ev.add(*it)
    np.testing.assert_array_equal(ev.confusion_matrices(), naive(items, n_classes, th))


@pytest.mark.filterwarnings("ignore:A single label")
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 30))
def test_confusion_matches_sklearn(seed, n):
    rng = np.random.default_rng(seed)
    gt = rng.choice(np.r_[0:n, 255], rng.integers(1, 200)).astype(np.int64)
    pred = rng.integers(0, n, gt.shape)
    v = gt != 255
    ref = sk_confusion_matrix(gt[v], pred[v], labels=np.arange(n)) if v.any() else np.zeros((n, n), np.int64)
    np.testing.assert_array_equal(confusion_matrix(gt, pred, n), ref)


def test_merge_and_json():
    rng = np.random.default_rng(0)
    items = random_items(rng, 5, 6, np.arange(0, 1, 0.01))
    a, b, whole = CAMEvaluator(5), CAMEvaluator(5), CAMEvaluator(5)
    for i, it in enumerate(items):
        (a if i % 2 else b).add(*it); whole.add(*it)
    r1, r2 = a.merge(b).result(split="train", which="x"), whole.result(split="train", which="x")
    assert r1 == r2
    json.loads(json.dumps(r1, allow_nan=False))          # plain JSON: no NaN anywhere
    s = SegEvaluator(5).add(items[0][0], np.zeros_like(items[0][0])).result(split="val", which="zeros")
    json.loads(json.dumps(s, allow_nan=False))
