"""Lesion boxes: where the generator draws each lesion (truth.csv, boxes.csv), reading a hospital's boxes.csv with
all its problems in one error, and boxes rescaled exactly as the images are resized to the model's input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from core_models.data import boxes_by_patient, load_boxes, load_site, read_image, rescale_boxes
from simulations.generator import (
    BOX_COLUMNS,
    _grid,
    lesion_box,
    lesion_params,
    read_truth,
    render_base,
    sample_truth,
    write_counterfactual_site,
    generate_consortium,
)
from simulations.medmnist_sites import overlay_social_mechanism
from simulations.scenario import SiteSpec, scenario_from_dict


def _lesion_rows(seed: int, k: int, size: int) -> list[dict]:
    """k diseased patients of a generated site: real seeds, faint lesions so the base is never clipped near one."""
    t = sample_truth(SiteSpec(name="boxes", n=8 * k, prevalence=0.5), seed=seed, image_size=size)
    rows = [r for r in t.to_dict("records") if r["D"] == 1][:k]
    assert len(rows) == k
    return [{**r, "lesion_contrast": 0.02} for r in rows]


def _inside(x, y, w, h, col, row) -> bool:
    """Whether the centre of pixel (row, col) lies in the box."""
    return x <= col + 0.5 <= x + w and y <= row + 0.5 <= y + h


def _overlap(start: float, length: float, size: int) -> np.ndarray:
    """How much of each pixel [j, j + 1) the span [start, start + length] covers."""
    lo = np.arange(size)
    return np.clip(np.minimum(lo + 1, start + length) - np.maximum(lo, start), 0.0, 1.0)


# ------------------------------------------------------------------------------------- where the lesion is

@pytest.mark.parametrize("size", [32, 64])
def test_box_holds_the_rendered_lesion(size):
    swapped_misses = 0
    rows = _lesion_rows(seed=int(np.random.default_rng(7).integers(1, 10**6)), k=12, size=size)
    for r in rows:
        lesion = render_base(r, size) - render_base({**r, "D": 0}, size)
        x, y, w, h = lesion_box(r["seed_lesion"], size)
        assert 0 <= x and 0 <= y and x + w <= size and y + h <= size
        peak_row, peak_col = np.unravel_index(np.argmax(lesion), lesion.shape)
        assert _inside(x, y, w, h, peak_col, peak_row)
        swapped_misses += not _inside(y, x, h, w, peak_col, peak_row)  # rows for columns: the lesion is elsewhere
        # centre +/- 2 sigma in each axis holds erf(sqrt 2)^2 = 91 % of a Gaussian's mass (1 sigma: 47 %, 3: 99 %)
        share = (_overlap(y, h, size)[:, None] * _overlap(x, w, size)[None, :] * lesion).sum() / lesion.sum()
        assert 0.88 < share < 0.94, share
        # the box is centred on the blob to a small fraction of a pixel (a half-pixel shift would show)
        centres = np.arange(size) + 0.5
        p = lesion_params(r["seed_lesion"])
        yy, xx = _grid(size)
        blob = np.exp(-((yy - p["cy"]) ** 2 + (xx - p["cx"]) ** 2) / (2 * p["sigma"] ** 2))
        assert abs((blob.sum(axis=0) * centres).sum() / blob.sum() - (x + w / 2)) < 0.05
        assert abs((blob.sum(axis=1) * centres).sum() / blob.sum() - (y + h / 2)) < 0.05
        assert w == pytest.approx(2 * 2 * p["sigma"] * size / 2) and h == pytest.approx(w)
    assert swapped_misses >= len(rows) // 2  # so the axis check above can fail


def test_box_is_clipped_to_the_image():
    rng = np.random.default_rng(3)
    for seed in rng.integers(0, 2**62, size=200):
        for size in (8, 33):
            x, y, w, h = lesion_box(int(seed), size)
            assert 0 <= x <= x + w <= size and 0 <= y <= y + h <= size and w > 0 and h > 0


# ------------------------------------------------------------------------------------ generator on disk

def _scenario(seed: int = 5) -> dict:
    return {"name": "boxes", "seed": seed, "image_size": 32,
            "defaults": {"n": 40, "prevalence": 0.4},
            "sites": [{"name": "alpha"}, {"name": "beta", "n": 25}], "holdout": {"n": 20}}


def test_truth_boxes_round_trip_through_boxes_csv_and_load_boxes(tmp_path):
    dirs = generate_consortium(scenario_from_dict(_scenario()), tmp_path)
    for site_dir in [*dirs, tmp_path / "holdout"]:
        truth = read_truth(site_dir)
        assert all(truth[c].dtype == np.float64 for c in BOX_COLUMNS)
        positive = truth["D"].to_numpy() == 1
        assert 0 < positive.sum() < len(truth)
        assert truth.loc[~positive, BOX_COLUMNS].isna().all().all()
        for r in truth[positive].itertuples():
            assert (r.box_x, r.box_y, r.box_w, r.box_h) == lesion_box(r.seed_lesion, 32)

        manifest = pd.read_csv(site_dir / "manifest.csv", dtype={"patient_id": str})
        site = load_site(site_dir, image_size=32, cache=False)
        assert (site.frame["rows"] == 32).all() and (site.frame["cols"] == 32).all()
        assert pydicom.dcmread(site_dir / manifest["image_path"][0]).Rows == 32
        boxes = load_boxes(site_dir / "boxes.csv", patient_ids=manifest["patient_id"], image_sizes=site.frame)
        assert list(boxes.columns) == ["patient_id", "x", "y", "w", "h", "label"]
        assert boxes["patient_id"].tolist() == truth.loc[positive, "patient_id"].tolist()
        for c in ("x", "y", "w", "h"):  # exact: the CSV round trip loses no bits
            assert np.array_equal(boxes[c].to_numpy(), truth.loc[positive, f"box_{c}"].to_numpy())
        assert (boxes["label"] == 1).all()

        # at twice the size the model sees the lesion at twice the pixel coordinates
        big = rescale_boxes(boxes, site.frame, 64)
        assert np.allclose(big[["x", "y", "w", "h"]].to_numpy(), 2 * boxes[["x", "y", "w", "h"]].to_numpy())
        per = boxes_by_patient(big, site.frame["patient_id"])
        assert [len(b) for b in per] == positive.astype(int).tolist()


def test_a_boxed_patient_whose_image_is_rejected_is_not_an_error(tmp_path):
    from core_models.data.boxes import image_boxes
    site_dir = generate_consortium(scenario_from_dict(_scenario()), tmp_path)[0]
    boxes = pd.read_csv(site_dir / "boxes.csv", dtype={"patient_id": str})
    manifest = pd.read_csv(site_dir / "manifest.csv", dtype={"patient_id": str})
    broken = manifest.loc[manifest["patient_id"] == boxes["patient_id"][0], "image_path"].iloc[0]
    (site_dir / broken).write_bytes(b"not a DICOM file")
    site = load_site(site_dir, image_size=32, cache=False)
    assert boxes["patient_id"][0] not in set(site.frame["patient_id"]) and len(site.rejected) == 1
    per_image, annotated = image_boxes(site_dir, site.frame, 32)
    assert len(per_image) == len(site.frame) and annotated.all()
    assert sum(len(b) for b in per_image) == len(boxes) - 1
    # a patient the manifest does not list is still an error, named
    boxes.loc[len(boxes)] = ["nobody", 1.0, 1.0, 2.0, 2.0, 1]
    boxes.to_csv(site_dir / "boxes.csv", index=False)
    with pytest.raises(ValueError, match="nobody"):
        image_boxes(site_dir, site.frame, 32)


def test_counterfactual_site_keeps_the_boxes(tmp_path):
    site_dir = generate_consortium(scenario_from_dict({**_scenario(), "holdout": {"n": 4}}), tmp_path / "c")[0]
    cf = write_counterfactual_site(site_dir, tmp_path / "cf")
    assert (cf / "boxes.csv").read_bytes() == (site_dir / "boxes.csv").read_bytes()
    pd.testing.assert_frame_equal(read_truth(cf)[BOX_COLUMNS], read_truth(site_dir)[BOX_COLUMNS])


def test_semi_synthetic_site_has_no_boxes(tmp_path):
    rng = np.random.default_rng(11)
    npz = tmp_path / "fake.npz"
    arrays = {}
    for split, m in (("train", 60), ("val", 10), ("test", 10)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(m, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, size=(m, 1))
    np.savez(npz, **arrays)
    (tmp_path / "out" / "semi").mkdir(parents=True)
    (tmp_path / "out" / "semi" / "boxes.csv").write_text("patient_id,x,y,w,h\nstale,1,1,2,2\n")
    site_dir = overlay_social_mechanism(npz, tmp_path / "out", SiteSpec(name="semi", n=1), seed=2, overwrite=True)
    truth = read_truth(site_dir)
    assert (truth["D"] == 1).any() and truth[BOX_COLUMNS].isna().all().all()
    assert not (site_dir / "boxes.csv").exists()  # its positives' lesions are real, not drawn: no box is known


def test_no_lesion_contrast_means_no_box():
    site = dataclasses.replace(SiteSpec(name="faint", n=40, prevalence=0.5), lesion_contrast=0.0)
    truth = sample_truth(site, seed=1, image_size=32)
    assert (truth["D"] == 1).any() and truth[BOX_COLUMNS].isna().all().all()


# ------------------------------------------------------------------------------------ reading boxes.csv

def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_load_boxes_reads_several_boxes_and_default_labels(tmp_path):
    path = _write(tmp_path / "boxes.csv", "patient_id,x,y,w,h\n007,1,2,3,4\n007,0,0,64,64\np2,10.5,0.25,2,2\n")
    boxes = load_boxes(path, patient_ids=["007", "p2", "p3"], image_sizes={"007": (64, 64), "p2": (20, 30)})
    assert boxes["patient_id"].tolist() == ["007", "007", "p2"]  # leading zeros kept
    assert boxes["label"].tolist() == [1, 1, 1] and boxes["label"].dtype == np.int64
    assert boxes[["x", "y", "w", "h"]].to_numpy().tolist() == [[1, 2, 3, 4], [0, 0, 64, 64], [10.5, 0.25, 2, 2]]
    per = boxes_by_patient(boxes, ["p3", "007", "p2"])
    assert [b.shape for b in per] == [(0, 4), (2, 4), (1, 4)]
    assert per[1].tolist() == [[1, 2, 3, 4], [0, 0, 64, 64]]

    labelled = _write(tmp_path / "l.csv", "patient_id,x,y,w,h,label\na,1,1,1,1,2\na,1,1,1,1,\n")
    assert load_boxes(labelled)["label"].tolist() == [2, 1]
    assert len(load_boxes(_write(tmp_path / "empty.csv", "patient_id,x,y,w,h\n"))) == 0


@pytest.mark.parametrize("text, expected", [
    ("patient_id,x,w\na,1,2\n", ["1 problem(s)", "lacks required column(s) y, h", "has: patient_id, x, w"]),
    ("patient_id,x,y,w,h\na,1,1,1,1\na,one,1,1,1\na,1,,1,1\na,1,1,inf,1\na,-inf,1,1,1\n",
     ["3 problem(s)", "x not a finite number in rows 1 ('one'), 4 ('-inf')", "y not a finite number in row 2 (empty)",
      "w not a finite number in row 3 ('inf')"]),
    ("patient_id,x,y,w,h\na,1,1,0,1\na,1,1,2,-3\na,1,1,-1,1\n",
     ["2 problem(s)", "w <= 0 in rows 0 (0), 2 (-1)", "h <= 0 in row 1 (-3)"]),
    ("patient_id,x,y,w,h\na,-1,1,1,1\na,1,-0.5,1,1\n",
     ["2 problem(s)", "x < 0 in row 0 (-1)", "y < 0 in row 1 (-0.5)"]),
    ("patient_id,x,y,w,h\na,60,1,5,1\na,1,1,1,1\nb,0,10,30,11\n",
     ["1 problem(s)", "box outside its image in rows 0 ('a', 64 x 64 px: x + w = 65 > 64 columns), "
      "2 ('b', 20 x 30 px: y + h = 21 > 20 rows)"]),
    ("patient_id,x,y,w,h\nghost,1,1,1,1\na,1,1,1,1\nghost,1,1,1,1\nnobody,1,1,1,1\n, 1,1,1,1\n",
     ["2 problem(s)", "2 patient_id(s) not in the manifest: 'ghost' (rows 0, 2), 'nobody' (row 3)",
      "patient_id missing in row 4"]),
    ("patient_id,x,y,w,h,label\na,1,1,1,1,lesion\na,1,1,1,1,-1\n",
     ["1 problem(s)", "label not a non-negative integer in rows 0 ('lesion'), 1 ('-1')"]),
])
def test_each_problem_is_named_with_its_rows(tmp_path, text, expected):
    path = _write(tmp_path / "boxes.csv", text)
    with pytest.raises(ValueError) as err:
        load_boxes(path, patient_ids=["a", "b"], image_sizes={"a": (64, 64), "b": (20, 30)})
    message = str(err.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_all_problems_in_one_error(tmp_path):
    rows = ["patient_id,x,y,h"] + [f"p{k},{k},1,2" for k in range(14)] + ["p0,x,-1,0"]
    path = _write(tmp_path / "boxes.csv", "\n".join(rows) + "\n")
    with pytest.raises(ValueError) as err:
        load_boxes(path, patient_ids=["p0"])
    message = str(err.value)
    for part in ("5 problem(s)", "lacks required column(s) w", "x not a finite number in row 14 ('x')",
                 "y < 0 in row 14 (-1)", "h <= 0 in row 14 (0)",
                 "13 patient_id(s) not in the manifest: 'p1' (row 1)", "'p10' (row 10) and 3 more"):
        assert part in message, part


def test_unreadable_boxes_files(tmp_path):
    with pytest.raises(ValueError, match="boxes file not found"):
        load_boxes(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="empty"):
        load_boxes(_write(tmp_path / "blank.csv", ""))
    with pytest.raises(ValueError, match="not a regular file"):
        load_boxes(tmp_path)


# ------------------------------------------------------------------------------ rescaling = image resizing

@pytest.mark.parametrize("rows, cols", [(100, 160), (128, 192), (40, 50), (100, 40), (300, 200)])
def test_rescaled_box_bounds_the_resized_rectangle(tmp_path, rows, cols):
    """A bright rectangle in a PNG, read at 64 px by the loader's own path (read_image -> pixels._resize: area
    averaging, integer box means, antialiased bilinear): the rescaled box is where it ends up."""
    rng = np.random.default_rng(rows * 1000 + cols)
    size = 64
    for k in range(4):
        x0 = int(rng.integers(0, cols // 2))
        x1 = int(rng.integers(x0 + cols // 6, cols + 1))
        y0 = int(rng.integers(0, rows // 2))
        y1 = int(rng.integers(y0 + rows // 6, rows + 1))
        pixels = np.zeros((rows, cols), np.uint8)
        pixels[y0:y1, x0:x1] = 255
        Image.fromarray(pixels).save(tmp_path / f"{k}.png")
        img, meta = read_image(tmp_path / f"{k}.png", size)
        assert (meta["rows"], meta["cols"]) == (rows, cols)
        boxes = pd.DataFrame({"patient_id": ["p"], "x": [x0], "y": [y0], "w": [x1 - x0], "h": [y1 - y0], "label": [1]})
        b = rescale_boxes(boxes, {"p": (meta["rows"], meta["cols"])}, size).iloc[0]
        lo = np.arange(size)  # pixel j covers [j, j + 1)
        inner_c, inner_r = (lo >= b.x + 1) & (lo + 1 <= b.x + b.w - 1), (lo >= b.y + 1) & (lo + 1 <= b.y + b.h - 1)
        outer_c, outer_r = (lo + 1 <= b.x - 1) | (lo >= b.x + b.w + 1), (lo + 1 <= b.y - 1) | (lo >= b.y + b.h + 1)
        assert img[np.ix_(inner_r, inner_c)].min() > 0.99  # inside the box by a pixel: the rectangle
        assert img[outer_r[:, None] | outer_c[None, :]].max() < 0.01  # outside it by a pixel: nothing
        assert img.sum() == pytest.approx(b.w * b.h, rel=0.03)  # and its area is the rectangle's


def test_rescale_names_patients_without_a_size():
    boxes = pd.DataFrame({"patient_id": ["a", "b"], "x": [1.0, 1.0], "y": [1.0, 1.0], "w": [1.0, 1.0],
                          "h": [1.0, 1.0], "label": [1, 1]})
    with pytest.raises(ValueError, match="no image size for 1 patient\\(s\\) with boxes: 'b'"):
        rescale_boxes(boxes, {"a": (10, 10)}, 64)
    scaled = rescale_boxes(boxes.iloc[:1], pd.DataFrame({"patient_id": ["a"], "rows": [10], "cols": [40]}), 20)
    assert scaled[["x", "y", "w", "h"]].to_numpy().tolist() == [[0.5, 2.0, 0.5, 2.0]]
