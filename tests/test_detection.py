"""Lesion localisation: the box coder's offsets, anchor matching, average precision, and a detector that learns
where a blob is (and still trains on images nobody boxed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core_models.detection import (
    Detections,
    LesionDetector,
    average_precision,
    box_meta,
    corners_to_xywh,
    decode,
    detection_objective,
    encode,
    make_anchors,
    match,
    pack_boxes,
    predict_boxes,
    xywh_to_corners,
)
from core_models.networks import build_model
from core_models.training import make_loader, train_epochs


def random_xywh(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.column_stack([rng.uniform(0, 50, n), rng.uniform(0, 50, n), rng.uniform(2, 30, n),
                            rng.uniform(2, 30, n)]).astype(np.float32)


def test_offsets_are_the_scale_invariant_formula_and_decode_inverts_them():
    rng = np.random.default_rng(0)
    box, anchor = random_xywh(rng, 200), random_xywh(rng, 200)
    t = encode(xywh_to_corners(box), xywh_to_corners(anchor)).numpy()
    cx, cy = box[:, 0] + box[:, 2] / 2, box[:, 1] + box[:, 3] / 2
    ax, ay = anchor[:, 0] + anchor[:, 2] / 2, anchor[:, 1] + anchor[:, 3] / 2
    # tensor-axis order: rows (y) first, then columns (x)
    expected = np.column_stack([(cy - ay) / anchor[:, 3], (cx - ax) / anchor[:, 2],
                                np.log(box[:, 3] / anchor[:, 3]), np.log(box[:, 2] / anchor[:, 2])])
    np.testing.assert_allclose(t, expected, rtol=1e-5, atol=1e-5)
    back = corners_to_xywh(decode(torch.as_tensor(t), xywh_to_corners(anchor))).numpy()
    np.testing.assert_allclose(back, box, atol=1e-3)
    # translate and scale box and anchor together: the same offsets
    shift, scale = rng.uniform(-20, 20, (200, 2)).astype(np.float32), rng.uniform(0.5, 3, (200, 1)).astype(np.float32)

    def moved(b):
        return np.column_stack([b[:, :2] * scale + shift, b[:, 2:] * scale])
    t2 = encode(xywh_to_corners(moved(box)), xywh_to_corners(moved(anchor))).numpy()
    np.testing.assert_allclose(t2, t, rtol=1e-4, atol=1e-4)


def test_anchors_cover_the_image_and_matching_gives_every_box_a_positive():
    anchors = make_anchors(64, 8)
    assert anchors.shape == (8 * 8 * 4, 4)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert centres.min() == 4 and centres.max() == 60  # the centre of each 8 px cell
    boxes = pack_boxes([[[14, 6, 12, 12]], [], [[1, 1, 3, 3], [40, 40, 20, 22]]])
    assert torch.isnan(boxes[1]).all() and not torch.isnan(boxes[2, :2]).any()
    labels, matched = match(anchors, boxes)
    assert (labels[1] == 0).all()  # no lesion: every anchor is background
    exact = (anchors == xywh_to_corners([[14, 6, 12, 12]])).all(1)
    assert labels[0][exact].item() == 1 and torch.equal(matched[0][exact][0], xywh_to_corners([[14, 6, 12, 12]])[0])
    # the 3 px box overlaps no anchor by 0.5 but still gets its best one
    for corners in xywh_to_corners([[1, 1, 3, 3], [40, 40, 20, 22]]):
        assert ((labels[2] == 1) & (matched[2] == corners).all(1)).sum() >= 1
    with pytest.raises(ValueError, match="image 0 has 5 boxes"):
        pack_boxes([[[0, 0, 1, 1]] * 5], max_boxes=4)


def test_average_precision_by_hand():
    truth = [[[10, 10, 10, 10]], [[30, 30, 8, 8]], []]
    perfect = [Detections(np.array(t, np.float32).reshape(-1, 4), np.ones(len(t))) for t in truth]
    assert average_precision(perfect, truth) == pytest.approx(1.0)
    off = [Detections(np.array(t, np.float32).reshape(-1, 4) + [6, 0, 0, 0], np.ones(len(t))) for t in truth]
    assert average_precision(off, truth) == 0.0  # IoU 4/16 = 0.25 < 0.5
    # scores: TP 0.9, FP 0.8 (the empty image), TP 0.7: precision 1 up to recall 0.5, then 2/3 (101-point)
    mixed = [Detections(np.array([[10, 10, 10, 10]], np.float32), np.array([0.9])),
             Detections(np.array([[30, 30, 8, 8]], np.float32), np.array([0.7])),
             Detections(np.array([[0, 0, 5, 5]], np.float32), np.array([0.8]))]
    assert average_precision(mixed, truth) == pytest.approx((51 * 1 + 50 * 2 / 3) / 101, abs=1e-6)
    assert np.isnan(average_precision(mixed[2:], [[]]))


def blobs(n: int, rng: np.random.Generator, size: int = 64):
    """Noisy images, half with a bright Gaussian blob; its box = centre +/- 2 sigma."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    images = rng.normal(0.4, 0.05, (n, 1, size, size)).astype(np.float32)
    labels = (np.arange(n) % 2).astype(np.int64)
    boxes = []
    for i in range(n):
        if not labels[i]:
            boxes.append([])
            continue
        s = rng.uniform(2.5, 4.5)
        cy, cx = rng.uniform(2 * s, size - 2 * s, 2)
        images[i, 0] += 0.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        boxes.append([[cx - 2 * s, cy - 2 * s, 4 * s, 4 * s]])
    return images, labels, boxes


def test_detector_learns_where_the_blob_is_and_unboxed_images_train_classification_only():
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    images, labels, boxes = blobs(240, rng)
    test_x, test_y, test_boxes = blobs(60, rng)
    model = LesionDetector(build_model("cnn"), image_size=64)
    untrained = average_precision(predict_boxes(model, test_x), test_boxes)
    # a third of the images come from a "site" that boxed nothing: they train the classifier only
    annotated = np.arange(len(images)) % 3 != 0
    loader = make_loader(images, labels, batch_size=16, shuffle=True, seed=0, meta=box_meta(boxes, annotated))
    train_epochs(model, loader, epochs=8, optimizer="adam", lr=2e-3, device=torch.device("cpu"),
                 loss_fn=detection_objective())
    trained = average_precision(predict_boxes(model, test_x), test_boxes)
    assert untrained < 0.05 and trained >= 0.6, (untrained, trained)

    # an unannotated batch: the loss is the cross-entropy alone and the detection head gets no gradient
    x, y = torch.as_tensor(images[:8]), torch.as_tensor(labels[:8])
    meta = torch.as_tensor(box_meta(boxes[:8], np.zeros(8, bool)))
    model.zero_grad()
    loss = detection_objective()(model, x, y, meta)
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.head.parameters())


def test_detector_names_the_blocks_it_can_tap():
    with pytest.raises(ValueError, match=r"'block9' is not one of \['standardize', 'stem', 'block2'"):
        LesionDetector(build_model("cnn"), image_size=64, tap="block9")
