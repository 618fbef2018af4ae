"""`equifed-partition` on a MedMNIST-format .npz and on a manifest folder (both written here from seeded
generators), then `equifed-simulate --sites` on the folders it wrote: real PNGs, one real Flower run."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from simulations.partition import main as partition
from simulations.run import main as simulate
from tests.conftest import ONE_ACTOR

SIZE = 28
SPLITS = {"train": 180, "val": 36, "test": 90}  # K=3: 60 train + 12 val images per site, a 90-image holdout
FAST = ["-c", f"image-size={SIZE}", "-c", "local-epochs=1", "-c", "batch-size=16", "-c", "learning-rate=0.003",
        *ONE_ACTOR]
FAIRNESS_COLUMNS = {"group", "scanner_legacy", "age", "sex"}


def _images(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Grey noise; class 1 carries a brighter 8x8 square in the centre (learnable in one round)."""
    x = rng.normal(100.0, 25.0, size=(len(labels), SIZE, SIZE))
    x[labels == 1, 10:18, 10:18] += 70.0
    return np.clip(x, 0, 255).astype(np.uint8)


def _write_npz(path: Path, seed: int = 0, splits: dict = SPLITS) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in splits.items():
        labels = rng.integers(0, 2, size=n)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = _images(rng, labels), labels.reshape(-1, 1)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    return _write_npz(tmp_path_factory.mktemp("npz") / "toy.npz")


def _manifests(out: Path) -> dict[str, pd.DataFrame]:
    return {d.name: pd.read_csv(d / "manifest.csv") for d in sorted(out.iterdir()) if (d / "manifest.csv").exists()}


def _max_label_gap(frames) -> float:
    """Largest difference in the share of label 1 between two sites."""
    shares = [f["label"].mean() for f in frames]
    return max(shares) - min(shares)


def test_iid_partition_puts_train_val_in_sites_and_test_in_the_holdout(npz, tmp_path):
    out = tmp_path / "iid"
    assert partition([str(npz), "--out", str(out), "-k", "3", "--seed", "0"]) == 0
    frames = _manifests(out)
    assert list(frames) == ["holdout", "site_1", "site_2", "site_3"]
    with np.load(npz) as z:
        source = {s: (z[f"{s}_images"], z[f"{s}_labels"].ravel()) for s in SPLITS}
    sites = [frames[f"site_{j}"] for j in (1, 2, 3)]
    for site in sites:
        assert {"patient_id", "image_path", "label", "split"} <= set(site.columns)
        assert set(site["split"]) == {"train", "val"}
        assert (site["split"] == "train").sum() == 60 and (site["split"] == "val").sum() == 12  # IID: equal shares
    assert set(frames["holdout"]["split"]) == {"test"}
    for split in SPLITS:  # every source image in exactly one folder, with its own split, label and pixels
        rows = pd.concat([f[f["split"] == split].assign(folder=name) for name, f in frames.items()])
        assert sorted(rows["source_index"]) == list(range(SPLITS[split]))
        images, labels = source[split]
        assert (rows["label"].to_numpy() == labels[rows["source_index"]]).all()
        row = rows.iloc[len(rows) // 2]
        assert np.array_equal(np.asarray(Image.open(out / row["folder"] / row["image_path"])),
                              images[row["source_index"]])
    assert _max_label_gap(sites) < 0.2


def test_dirichlet_partition_skews_labels_and_is_reproducible(npz, tmp_path):
    args = [str(npz), "-k", "3", "--alpha", "0.2", "--seed", "4"]
    assert partition([*args[:1], "--out", str(tmp_path / "a"), *args[1:]]) == 0
    assert partition([*args[:1], "--out", str(tmp_path / "b"), *args[1:]]) == 0
    a, b = _manifests(tmp_path / "a"), _manifests(tmp_path / "b")
    assert all(a[name].equals(b[name]) for name in a)  # same seed, same partition
    sites = [a[f"site_{j}"] for j in (1, 2, 3)]
    assert _max_label_gap(sites) > 0.5  # IID above: < 0.2
    for site in sites:  # skewed, still usable: >= 10 images and a validation split at every site
        assert len(site) >= 10 and (site["split"] == "val").any()
    record = json.loads((tmp_path / "a" / "partition.json").read_text())
    assert record["alpha"] == 0.2 and record["folders"] == ["site_1", "site_2", "site_3", "holdout"]


def test_bad_input_exits_2_with_the_reason(npz, tmp_path, capsys):
    partial = tmp_path / "partial.npz"
    np.savez(partial, train_images=np.zeros((20, SIZE, SIZE), np.uint8), train_labels=np.zeros((20, 1)))
    (tmp_path / "not.npz").write_text("patient_id,label\n")
    cases = [
        ([str(partial), "--out", str(tmp_path / "o1"), "-k", "3"], "missing array(s) val_images, val_labels"),
        ([str(npz), "--out", str(tmp_path / "o2"), "-k", "500"], "-k 500 is larger than the 180 training image(s)"),
        ([str(tmp_path / "not.npz"), "--out", str(tmp_path / "o3"), "-k", "2"], "not a .npz archive"),
        ([str(npz), "--out", str(tmp_path / "o4"), "-k", "3", "--alpha", "0"], "--alpha must be > 0"),
    ]
    for argv, reason in cases:
        assert partition(argv) == 2
        err = capsys.readouterr().err
        assert reason in err and "Traceback" not in err
        assert not Path(argv[2]).exists()  # nothing written
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert partition([str(npz), "--out", str(kept), "-k", "3", "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err and (kept / "notes.txt").read_text() == "mine"
    assert simulate(["--sites", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_manifest_folder_without_split_is_split_by_patient(tmp_path, capsys):
    rng = np.random.default_rng(7)
    src = tmp_path / "src"
    (src / "scans").mkdir(parents=True)
    rows = []
    for p in range(60):
        label = int(rng.integers(0, 2))
        for j, img in enumerate(_images(rng, np.array([label, label]))):  # two images per patient
            Image.fromarray(img).save(src / "scans" / f"p{p:02d}_{j}.png")
            rows.append({"patient_id": f"P{p:02d}", "image_path": f"scans/p{p:02d}_{j}.png", "label": label})
    pd.DataFrame(rows).to_csv(src / "manifest.csv", index=False)
    out = tmp_path / "out"
    assert partition([str(src), "--out", str(out), "-k", "2", "--seed", "1"]) == 0
    assert "split by patient" in capsys.readouterr().out
    frames = _manifests(out)
    assert list(frames) == ["holdout", "site_1", "site_2"]
    everyone = pd.concat([f.assign(folder=name) for name, f in frames.items()])
    assert len(everyone) == 120 and everyone.groupby("patient_id")["folder"].nunique().max() == 1
    assert everyone.groupby("patient_id")["split"].nunique().max() == 1
    assert set(frames["holdout"]["split"]) == {"test"} and len(frames["holdout"]) > 0
    row = frames["site_2"].iloc[0]
    assert (out / "site_2" / row["image_path"]).read_bytes() == (src / row["image_path"]).read_bytes()


@pytest.fixture(scope="module")
def sites_run(npz, tmp_path_factory):
    """Three partitioned sites plus one whose manifest lacks the label column; two rounds, no fairness columns."""
    base = tmp_path_factory.mktemp("sites")
    data = base / "data"
    assert partition([str(npz), "--out", str(data), "-k", "3", "--seed", "0"]) == 0
    broken = data / "broken_site"
    broken.mkdir()
    (broken / "manifest.csv").write_text("patient_id,image_path\np1,images/p1.png\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = simulate(["--sites", str(data), "--holdout", str(data / "holdout"), "--out", str(base / "run"),
                         "--rounds", "2", "--timeout", "600", *FAST])
    return {"code": code, "out": base / "run", "data": data, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def test_simulate_sites_trains_the_partition_without_fairness_columns(sites_run):
    assert sites_run["code"] == 0
    for name in ("site_1", "site_2", "site_3"):
        assert not FAIRNESS_COLUMNS & set(pd.read_csv(sites_run["data"] / name / "manifest.csv").columns)
    metrics = pd.read_csv(sites_run["out"] / "metrics.csv")
    assert list(metrics["round"]) == [0, 1, 2]
    assert metrics["holdout_auroc"].iloc[-1] > metrics["holdout_auroc"].iloc[0] + 0.1
    summary = json.loads((sites_run["out"] / "summary.json").read_text())
    assert summary["flower_status"] == "finished:completed"
    assert summary["final_holdout_auroc"] == pytest.approx(metrics["holdout_auroc"].iloc[-1])
    train = pd.read_csv(sites_run["out"] / "per_site.csv").query("phase == 'train' and status == 'ok'")
    assert sorted(train["site"].unique()) == ["site_1", "site_2", "site_3"]
    assert sorted(train["round"].unique()) == [1, 2]
    assert not (sites_run["data"] / "site_1" / ".equifed" / "client_errors.log").exists()


def test_a_failing_site_is_named_with_its_last_error(sites_run):
    lines = [line for line in sites_run["stderr"].splitlines() if "site broken_site failed" in line]
    assert len(lines) == 1
    assert "lacks required column(s) label" in lines[0] and "client_errors.log" in lines[0]
    assert "site site_1 failed" not in sites_run["stderr"]
