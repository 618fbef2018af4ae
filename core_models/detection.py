"""Lesion localisation: anchor boxes on the encoder's feature map, nudged by scale-invariant offsets.

Boxes outside this module are ``(x, y, w, h)`` in pixels, ``x`` the column of the left edge and ``y`` the row of the
top edge (what ``boxes.csv`` holds). Inside, MONAI's detection utilities work on corner boxes in tensor-axis order,
``(row_min, col_min, row_max, col_max)``. Its ``BoxCoder`` with unit weights encodes a box against an anchor as, per
axis, ``t = (c - c_a) / s_a`` for the centre and ``t = ln(s / s_a)`` for the size: translating and scaling box and
anchor together leaves the offsets unchanged, so one head serves every position and lesion size.

A detector is the classifier with a head on an intermediate feature map: ``forward`` still returns the class
logits (every other part of the platform sees a classifier), ``detect`` returns those logits plus one objectness
logit and four offsets per anchor. An image whose site supplied no boxes trains the classification loss only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.apps.detection.utils.anchor_utils import AnchorGenerator
from monai.apps.detection.utils.box_coder import BoxCoder
from monai.data.box_utils import box_iou, clip_boxes_to_image, non_max_suppression
from torch import nn

from core_models.networks import input_channels

BOX_CODER = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0), boxes_xform_clip=math.log(1000.0 / 16))
# anchor side lengths at 64 px (scaled with the image): the generator's lesions are 9-19 px boxes at 64 px
ANCHOR_SIZES_64 = (8, 12, 18, 26)


def xywh_to_corners(boxes) -> torch.Tensor:
    """``(x, y, w, h)`` (column, row of the top-left corner, width, height) to MONAI's ``(r0, c0, r1, c1)``."""
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return torch.stack([b[:, 1], b[:, 0], b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], dim=1)


def corners_to_xywh(boxes) -> torch.Tensor:
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return torch.stack([b[:, 1], b[:, 0], b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]], dim=1)


def encode(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Offsets of corner ``boxes`` against ``anchors`` (same length): ``(t_row, t_col, t_height, t_width)``."""
    return BOX_CODER.encode_single(boxes, anchors)


def decode(offsets: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    return BOX_CODER.decode_single(offsets, anchors)


def make_anchors(image_size: int, feature_size: int) -> torch.Tensor:
    """Corner anchors (square, :data:`ANCHOR_SIZES_64` scaled to ``image_size``) at every cell of a
    ``feature_size`` x ``feature_size`` map, in the order the head emits them (cell-major, size-minor)."""
    # even sides: MONAI places an anchor at centre +/- side/2 rounded, so an odd side would shrink or grow
    sizes = tuple(max(2, 2 * round(s * image_size / 128)) for s in ANCHOR_SIZES_64)
    gen = AnchorGenerator(sizes=(sizes,), aspect_ratios=((1.0,),))
    image = torch.zeros(1, 1, image_size, image_size)
    return gen(image, [torch.zeros(1, 1, feature_size, feature_size)])[0]


class DetectionHead(nn.Module):
    """A 3x3 convolution, then one objectness logit and four offsets per anchor and map cell."""

    def __init__(self, in_channels: int, anchors_per_cell: int, hidden: int = 64) -> None:
        super().__init__()
        self.k = anchors_per_cell
        self.body = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(hidden, anchors_per_cell * 5, 1)
        nn.init.normal_(self.out.weight, std=0.01)
        nn.init.constant_(self.out.bias, 0.0)
        with torch.no_grad():  # RetinaNet's prior: every anchor starts at objectness 0.01
            self.out.bias.view(self.k, 5)[:, 0] = -math.log(99.0)

    def forward(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = fmap.shape
        out = self.out(self.body(fmap)).view(b, self.k, 5, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * self.k, 5)
        return out[..., 0], out[..., 1:]


class LesionDetector(nn.Module):
    """A classifier with a detection head on one of its feature maps (``tap``: a named block of
    ``classifier.features``; the small CNN's ``block2`` is a 16 x 16 map at 64 px, one cell per 4 px: on the
    default scenario it reached holdout mAP@0.5 0.73-0.78 federated in 5 rounds, ``block3`` (8 x 8) 0.45)."""

    def __init__(self, classifier: nn.Module, image_size: int, tap: str = "block2") -> None:
        super().__init__()
        features = getattr(classifier, "features", None)
        names = [n for n, _ in features.named_children()] if isinstance(features, nn.Sequential) else []
        if tap not in names:
            raise ValueError(f"the detector taps a named block of the classifier's `features`; {tap!r} is not one "
                             f"of {names or 'its blocks (this network has no `features` sequence)'}")
        self.classifier, self.tap, self.image_size = classifier, tap, image_size
        with torch.no_grad():
            fmap = self._features(torch.zeros(1, input_channels(classifier), image_size, image_size))[0]
        self.register_buffer("anchors", make_anchors(image_size, fmap.shape[-1]), persistent=False)
        self.head = DetectionHead(fmap.shape[1], len(ANCHOR_SIZES_64))

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tapped = None
        for name, block in self.classifier.features.named_children():
            x = block(x)
            if name == self.tap:
                tapped = x
        return tapped, x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def detect(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class logits ``(B, classes)``, objectness logits ``(B, anchors)``, offsets ``(B, anchors, 4)``."""
        tapped, last = self._features(x)
        logits = self.classifier.head(torch.flatten(self.classifier.pool(last), 1))
        objectness, offsets = self.head(tapped)
        return logits, objectness, offsets


def pack_boxes(per_image: list, max_boxes: int | None = None) -> torch.Tensor:
    """Each image's ``(x, y, w, h)`` boxes as one ``(B, max_boxes, 4)`` tensor of corner boxes, NaN-padded (an
    image without a lesion: all NaN; ``max_boxes`` default: the most any image has). Extra boxes beyond
    ``max_boxes`` are an error, not silently dropped."""
    if max_boxes is None:
        max_boxes = max([1, *(np.asarray(b if b is not None else []).reshape(-1, 4).shape[0] for b in per_image)])
    out = torch.full((len(per_image), max_boxes, 4), float("nan"))
    for i, boxes in enumerate(per_image):
        b = np.asarray(boxes if boxes is not None else [], dtype=np.float32).reshape(-1, 4)
        if len(b) > max_boxes:
            raise ValueError(f"image {i} has {len(b)} boxes; at most {max_boxes} per image")
        if len(b):
            out[i, :len(b)] = xywh_to_corners(b)
    return out


def match(anchors: torch.Tensor, boxes: torch.Tensor, pos_iou: float = 0.5, neg_iou: float = 0.4
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and anchor: 1 (matched to a box), 0 (background), -1 (ignored: IoU between the thresholds),
    and the matched box. Each box's best anchor is positive even below ``pos_iou`` (so a small lesion is never
    left without a positive)."""
    labels = torch.zeros(boxes.shape[0], anchors.shape[0])
    matched = torch.zeros(boxes.shape[0], anchors.shape[0], 4)
    for i in range(boxes.shape[0]):
        gt = boxes[i][~torch.isnan(boxes[i]).any(1)]
        if not len(gt):
            continue
        iou = box_iou(gt, anchors)  # (boxes, anchors)
        best, which = iou.max(0)
        lab = torch.where(best >= pos_iou, 1.0, torch.where(best < neg_iou, 0.0, -1.0))
        forced = iou.argmax(1)
        lab[forced] = 1.0
        which[forced] = torch.arange(len(gt))
        labels[i], matched[i] = lab, gt[which]
    return labels, matched


def detection_loss(objectness: torch.Tensor, offsets: torch.Tensor, anchors: torch.Tensor, boxes: torch.Tensor,
                   gamma: float = 2.0) -> torch.Tensor:
    """Per image: sigmoid focal loss over the anchors that are not ignored, plus smooth-L1 on the positives'
    offsets, both divided by the image's positives (at least one). ``boxes``: :func:`pack_boxes`'s tensor."""
    labels, matched = match(anchors.cpu(), boxes.cpu())  # a small per-image loop: on the CPU, moved once
    labels, matched = labels.to(objectness.device), matched.to(objectness.device)
    keep = labels >= 0
    target = labels.clamp(min=0)
    p = torch.sigmoid(objectness)
    ce = F.binary_cross_entropy_with_logits(objectness, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = 0.25 * target + 0.75 * (1 - target)
    focal = (alpha_t * (1 - p_t) ** gamma * ce * keep).sum(1)
    pos = labels == 1
    n_pos = pos.sum(1).clamp(min=1)
    anchors = anchors.to(objectness.device)
    reg = torch.zeros_like(focal)
    if pos.any():
        idx = pos.nonzero(as_tuple=True)
        targets = encode(matched[idx], anchors[idx[1]])
        per = F.smooth_l1_loss(offsets[idx], targets, beta=1.0 / 9, reduction="none").sum(1)
        reg = reg.index_add(0, idx[0], per)
    return (focal + reg) / n_pos


@dataclass(frozen=True)
class Detections:
    """One image's predicted boxes (``(x, y, w, h)``, pixels) and their scores, best first."""

    boxes: np.ndarray
    scores: np.ndarray


def postprocess(objectness: torch.Tensor, offsets: torch.Tensor, anchors: torch.Tensor, image_size: int,
                min_score: float = 0.05, nms_iou: float = 0.3, max_detections: int = 10) -> list[Detections]:
    """Decode every anchor, keep those scoring at least ``min_score``, clip to the image, non-maximum suppression."""
    out = []
    anchors = anchors.to(objectness.device)
    for obj, off in zip(objectness.detach(), offsets.detach()):
        score = torch.sigmoid(obj)
        keep = score >= min_score
        boxes, score = decode(off[keep], anchors[keep]), score[keep]
        boxes, inside = clip_boxes_to_image(boxes, (image_size, image_size), remove_empty=True)
        score = score[inside]
        if len(boxes):
            order = non_max_suppression(boxes, score, nms_iou, max_proposals=max_detections)
            boxes, score = boxes[order], score[order]
        out.append(Detections(corners_to_xywh(boxes.cpu()).numpy(), score.cpu().numpy()))
    return out


def average_precision(detections: list[Detections], truth: list, iou: float = 0.5) -> float:
    """AP of the lesion class at ``iou`` over a set of images (COCO's 101-point interpolation, MONAI's
    implementation); ``truth``: each image's ``(x, y, w, h)`` boxes (empty for an image without a lesion). NaN
    when no image has a lesion."""
    gt = [xywh_to_corners(np.asarray(t if t is not None else [], np.float32).reshape(-1, 4)).numpy()
          for t in truth]
    if sum(len(g) for g in gt) == 0:
        return float("nan")
    pred = [xywh_to_corners(d.boxes).numpy() for d in detections]
    results = matching_batch(box_iou, [iou], pred, [np.zeros(len(p), int) for p in pred],
                             [d.scores for d in detections], gt, [np.zeros(len(g), int) for g in gt])
    metric = COCOMetric(classes=["lesion"], iou_list=[iou], iou_range=(iou, iou, 0.05), max_detection=(100,),
                        verbose=False)
    return float(metric(results)[0][f"AP_IoU_{iou:.2f}_MaxDet_100"])


def box_meta(per_image: list, annotated, max_boxes: int | None = None) -> np.ndarray:
    """The loader's metadata rows for detection: ``[annotated, corner boxes (max_boxes x 4, NaN-padded)]``.
    ``annotated`` per image: its site supplies boxes and says where every lesion is; a positive image without a
    box is therefore not annotated (its lesion's place is unknown), a negative one is (no box: all background)."""
    boxes = pack_boxes(per_image, max_boxes)
    flags = torch.as_tensor(np.asarray(annotated, dtype=bool))
    return torch.cat([flags[:, None].float(), boxes.reshape(len(per_image), -1)], dim=1).numpy()


def detection_objective(weight: float = 1.0):
    """``loss_fn`` for :func:`core_models.training.train_steps`: per image, cross-entropy plus ``weight`` times the
    detection loss where the image is annotated (:func:`box_meta`), averaged over the batch."""
    def loss_fn(forward: nn.Module, x: torch.Tensor, y: torch.Tensor, meta: torch.Tensor | None = None):
        model = getattr(forward, "_module", forward)
        logits, objectness, offsets = model.detect(x)
        loss = F.cross_entropy(logits, y, reduction="none")
        # a batch without an annotated image leaves the head out of the graph: its gradient stays None, so the
        # optimizer skips it (a zero gradient would still move it by Adam's weight decay, a full step each time)
        if meta is not None and len(y) and bool((meta[:, 0] > 0).any()):
            boxes = meta[:, 1:].reshape(len(y), -1, 4)
            det = detection_loss(objectness, offsets, model.anchors, boxes)
            loss = loss + weight * torch.where(meta[:, 0] > 0, det, torch.zeros_like(det))
        return loss.mean() if len(y) else logits.sum() * 0.0
    return loss_fn


@torch.no_grad()
def predict_boxes(model: LesionDetector, images: np.ndarray, batch_size: int = 64,
                  device: torch.device | None = None, **kwargs) -> list[Detections]:
    """:func:`postprocess` over a stack of ``(N, 1, H, W)`` images, on ``device`` (default: where the model is)."""
    device = device or next(model.parameters()).device
    model.to(device).eval()
    out: list[Detections] = []
    for i in range(0, len(images), batch_size):
        x = torch.as_tensor(images[i:i + batch_size], dtype=torch.float32, device=device)
        _, objectness, offsets = model.detect(x)
        out += postprocess(objectness, offsets, model.anchors, model.image_size, **kwargs)
    return out


def score_annotated(model: LesionDetector, images: np.ndarray, per_image: list, annotated,
                    device: torch.device | None = None) -> tuple[float, np.ndarray, list[Detections]]:
    """AP at IoU 0.5 of ``model`` on the annotated images (NaN without any), which they were, and the boxes it
    found on them."""
    keep = np.flatnonzero(np.asarray(annotated, dtype=bool))
    if not len(keep):
        return math.nan, keep, []
    found = predict_boxes(model, images[keep], device=device)
    return average_precision(found, [per_image[i] for i in keep]), keep, found


def draw_detections(images: np.ndarray, truth: list, detections: list[Detections], path, min_score: float = 0.3,
                    columns: int = 4) -> None:
    """A PNG of ``images`` with their true boxes (green) and the detector's boxes scoring at least ``min_score``
    (red, score printed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(images)
    rows = max(1, math.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, img, t, d in zip(axes.ravel(), images, truth, detections):
        img = np.asarray(img)
        if img.ndim == 3 and img.shape[0] == 3:  # RGB (3, H, W)
            ax.imshow(np.clip(img.transpose(1, 2, 0), 0, 1))
        else:
            ax.imshow(img.reshape(img.shape[-2:]), cmap="gray", vmin=0, vmax=1)
        for x, y, w, h in np.asarray(t if t is not None else [], np.float32).reshape(-1, 4):
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, color="lime", lw=1.2))
        for (x, y, w, h), s in zip(d.boxes, d.scores):
            if s >= min_score:
                ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, color="red", lw=1.2))
                ax.text(x, y - 1, f"{s:.2f}", color="red", fontsize=6)
    fig.suptitle("true boxes (green), predicted (red, score)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
