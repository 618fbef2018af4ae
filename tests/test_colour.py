"""Colour modalities end to end (run config in-channels=3): RGB PNG and colour DICOM kept as RGB, grey replicated,
3-channel networks under DP-SGD, RGB checkpoints, colour npz partitions, 5-class macro AUROC, RGB explanations.
Grey (in-channels=1, the default) must stay exactly as it was."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sklearn.metrics import roc_auc_score

from core_models.config import ConfigError, RunConfig, app_defaults
from core_models.data import ImageError, ManifestError, load_npz, load_site, read_image
from core_models.data.cache import CACHE_DIR
from core_models.networks import build_model, input_channels
from core_models.pretrained import load_pretrained
from core_models.processes import APP_DIR
from core_models.training import auroc, evaluate, make_loader

RETINA = Path("/work/shared/data/retinamnist.npz")
SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
BT601 = np.array([0.299, 0.587, 0.114])


def colour_bars(h=16, w=24) -> np.ndarray:
    """(h, w, 3) uint8: red, green, blue and a mixed colour band, every channel different."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, :6] = (255, 0, 0)
    rgb[:, 6:12] = (0, 255, 0)
    rgb[:, 12:18] = (0, 0, 255)
    rgb[:, 18:] = (200, 120, 40)
    return rgb


def write_dicom(path: Path, pixels: np.ndarray, photometric: str) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SC, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SC, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = "P1", "XC"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def chw(rgb: np.ndarray) -> np.ndarray:
    return rgb.transpose(2, 0, 1).astype(np.float64) / 255.0


# ------------------------------------------------------------------------------------------------------- images


def test_rgb_png_and_jpeg_keep_their_colours_grey_is_replicated(tmp_path):
    rgb = colour_bars()
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(tmp_path / "a.png")  # RGBA
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=98, subsampling=0)
    grey = np.arange(16 * 24, dtype=np.uint8).reshape(16, 24)
    Image.fromarray(grey).save(tmp_path / "g.png")

    for name in ("c.png", "a.png"):
        img, meta = read_image(tmp_path / name, channels=3)
        assert img.shape == (3, 16, 24) and img.dtype == np.float32 and (meta["rows"], meta["cols"]) == (16, 24)
        np.testing.assert_allclose(img, chw(rgb), atol=1e-6)
    jpeg, _ = read_image(tmp_path / "c.jpg", channels=3)
    assert np.abs(jpeg - chw(rgb)).mean() < 0.02
    assert np.argmax(jpeg[:, 8, 2]) == 0 and np.argmax(jpeg[:, 8, 8]) == 1 and np.argmax(jpeg[:, 8, 14]) == 2
    small, _ = read_image(tmp_path / "c.png", 8, channels=3)  # resized channel by channel
    assert small.shape == (3, 8, 8) and small[0, :, 0].min() > 0.99 and small[1, :, 0].max() < 0.01

    # grey: channels=1 exactly as before, channels=3 the same image in each channel
    g1, _ = read_image(tmp_path / "g.png")
    g3, _ = read_image(tmp_path / "g.png", channels=3)
    assert g1.shape == (16, 24) and g3.shape == (3, 16, 24)
    np.testing.assert_allclose(g1, grey / 255.0, atol=1e-6)
    for c in range(3):
        np.testing.assert_array_equal(g3[c], g1)
    # a grey run still refuses colour PNGs, and says what to set
    with pytest.raises(ImageError, match="colour image, expected grayscale.*in-channels=3"):
        read_image(tmp_path / "c.png")
    with pytest.raises(ValueError, match="channels must be 1"):
        read_image(tmp_path / "g.png", channels=2)


def test_colour_dicom_rgb_and_ybr_become_rgb_grey_runs_keep_luminance(tmp_path):
    rgb = colour_bars()
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    as_rgb = write_dicom(tmp_path / "rgb.dcm", rgb, "RGB")
    as_ybr = write_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL")
    img, meta = read_image(as_rgb, channels=3)
    assert img.shape == (3, 16, 24) and meta["modality"] == "XC"
    np.testing.assert_allclose(img, chw(rgb), atol=1e-6)
    from_ybr, _ = read_image(as_ybr, channels=3)
    np.testing.assert_allclose(from_ybr, chw(rgb), atol=2.5 / 255)  # YBR is 8-bit rounded once
    # pydicom's own YBR -> RGB conversion agrees to rounding
    np.testing.assert_allclose(from_ybr, chw(convert_color_space(ybr, "YBR_FULL", "RGB")), atol=1.01 / 255)
    # grey runs: luminance as before
    luma, _ = read_image(as_rgb)
    np.testing.assert_allclose(luma, rgb.astype(np.float64) @ BT601 / 255.0, atol=1e-5)
    # a grey DICOM in an RGB run: its grey image in each channel
    grey = np.tile(np.arange(24, dtype=np.uint8) * 10, (16, 1))
    g1, _ = read_image(write_dicom(tmp_path / "g.dcm", grey, "MONOCHROME2"))
    g3, _ = read_image(tmp_path / "g.dcm", channels=3)
    assert g3.shape == (3, 16, 24) and all(np.array_equal(g3[c], g1) for c in range(3))


def _bundled(name: str) -> Path | None:
    """One of pydicom's bundled test files, never downloaded."""
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file(name, download=False)
    except TypeError:  # a pydicom without the keyword
        path = None
    return Path(path) if path else None


@pytest.mark.parametrize("name, atol", [("SC_rgb_rle.dcm", 0.5 / 255), ("SC_ybr_full_422_uncompressed.dcm", 6 / 255),
                                        ("SC_rgb_dcmtk_+eb+cy+np.dcm", 8 / 255)])
def test_pydicoms_bundled_colour_bars(name, atol):
    """pydicom's colour test images: bands of red, light red, green, ..., black, grey, white (its own tests' values)."""
    path = _bundled(name)
    if path is None:
        pytest.skip(f"pydicom's test file {name} is not installed")
    img, _ = read_image(path, channels=3)
    assert img.shape == (3, 100, 100)
    bars = {5: (255, 0, 0), 15: (255, 128, 128), 25: (0, 255, 0), 35: (128, 255, 128), 45: (0, 0, 255),
            55: (128, 128, 255), 65: (0, 0, 0), 75: (64, 64, 64), 85: (192, 192, 192), 95: (255, 255, 255)}
    for row, colour in bars.items():
        np.testing.assert_allclose(img[:, row, 50], np.array(colour) / 255.0, atol=atol, err_msg=f"row {row}")


# ------------------------------------------------------------------------------------------------------- sites


def _colour_site(path: Path) -> Path:
    (path / "img").mkdir(parents=True)
    rgb = colour_bars()
    Image.fromarray(rgb).save(path / "img" / "a.png")
    Image.fromarray(rgb[:, ::-1].copy()).save(path / "img" / "b.png")
    Image.fromarray(np.full((16, 24), 90, np.uint8)).save(path / "img" / "c.png")
    write_dicom(path / "img" / "d.dcm", rgb, "RGB")
    pd.DataFrame({"patient_id": ["p1", "p2", "p3", "p4"], "image_path": ["img/a.png", "img/b.png", "img/c.png",
                                                                         "img/d.dcm"],
                  "label": [0, 1, 0, 1]}).to_csv(path / "manifest.csv", index=False)
    return path


def test_load_site_rgb_with_its_own_cache_and_grey_unchanged(tmp_path):
    site = _colour_site(tmp_path / "s")
    rgb = load_site(site, image_size=8, channels=3)
    assert rgb.images.shape == (4, 3, 8, 8) and not rgb.rejected and rgb.unlabelled.shape == (0, 3, 8, 8)
    assert rgb.images[0, 0, :, 0].min() > 0.99 and rgb.images[0, 1, :, 0].max() < 0.01  # red stays red
    assert np.array_equal(rgb.images[2, 0], rgb.images[2, 1])  # the grey PNG, replicated
    again = load_site(site, image_size=8, channels=3)  # from the cache: bit-identical
    np.testing.assert_array_equal(again.images, rgb.images)
    # the grey run: colour PNGs refused with what to set, the colour DICOM as luminance, its own cache slot
    grey = load_site(site, image_size=8)
    assert grey.images.shape == (2, 1, 8, 8)
    assert [r.image_path for r in grey.rejected] == ["img/a.png", "img/b.png"]
    assert all("in-channels=3" in r.reason for r in grey.rejected)
    names = sorted(p.name for p in (site / CACHE_DIR).glob("*.npz"))
    assert len(names) == 2 and any("-k2c3-" in n for n in names) and any("-k2-" in n for n in names)
    np.testing.assert_array_equal(load_site(site, image_size=8).images, grey.images)  # both slots kept
    with pytest.raises(ValueError, match="channels"):
        load_site(site, image_size=8, channels=4)


def test_in_channels_is_a_run_config_key_of_1_or_3():
    defaults = app_defaults(APP_DIR / "pyproject.toml")
    assert defaults["in-channels"] == 1
    assert RunConfig.from_flower(defaults).train.in_channels == 1
    assert RunConfig.from_flower({**defaults, "in-channels": 3}).train.in_channels == 3
    with pytest.raises(ConfigError, match="in-channels"):
        RunConfig.from_flower({**defaults, "in-channels": 2})


# ---------------------------------------------------------------------------------------------------- networks


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_three_channel_networks(name):
    torch.manual_seed(0)
    model = build_model(name, 5, in_channels=3)
    assert input_channels(model) == 3 and input_channels(build_model(name, 5)) == 1
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(RuntimeError):  # a grey batch is not an RGB network's input
        model(torch.rand(2, 1, 32, 32))
    from opacus.validators import ModuleValidator

    assert ModuleValidator.validate(model, strict=False) == []  # GroupNorm throughout: Opacus can train it
    # the grey network is the one it always was
    grey = {k: tuple(v.shape) for k, v in build_model(name, 5).state_dict().items()}
    rgb = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert grey.keys() == rgb.keys()
    assert [k for k in grey if grey[k] != rgb[k]] == [next(k for k in grey if len(grey[k]) == 4)]  # the stem only


def test_dp_sgd_step_on_rgb_images(tmp_path):
    from client.dp import DPSettings, PatientData, plan_dp, train_dp
    from client.ledger import PrivacyLedger

    rng = np.random.default_rng(0)
    x = rng.random((48, 3, 16, 16), dtype=np.float32)
    y = rng.integers(0, 5, 48)
    site = tmp_path / "site"
    site.mkdir()
    (site / "manifest.csv").write_text("patient_id,image_path,label\n")
    plan = plan_dp(len(y), batch_size=16, local_epochs=1, rounds=1, target_epsilon=8, delta=1e-5)
    ledger = PrivacyLedger.open(site, delta=1e-5, max_epsilon=100, fingerprint="rgb")
    model = build_model("cnn", 5, in_channels=3)
    before = model.features.stem[0].weight.detach().clone()
    stats = train_dp(model, PatientData(x, y), plan, ledger, DPSettings(max_grad_norm=1.0, physical_batch_size=16),
                     sampling_rng=np.random.default_rng(1), noise_generator=torch.Generator().manual_seed(2))
    assert stats["steps"] == plan.steps_per_round and ledger.epsilon() > 0
    assert set(model.state_dict()) == set(build_model("cnn", 5, in_channels=3).state_dict())
    assert model.features.stem[0].weight.shape == (16, 3, 3, 3)
    assert torch.equal(model.features.stem[0].weight, before)  # DP-SGD keeps the stem frozen (prepare_for_dp)
    assert not torch.equal(model.head.weight, build_model("cnn", 5, in_channels=3).head.weight)


def test_an_rgb_checkpoint_loads_unchanged_into_an_rgb_network(tmp_path):
    torch.manual_seed(1)
    source = build_model("resnet", 2, in_channels=3)
    torch.save(source.state_dict(), tmp_path / "rgb.pt")
    target = build_model("resnet", 2, in_channels=3)
    report = load_pretrained(target, tmp_path / "rgb.pt")
    assert report.adapted == [] and not report.skipped
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    # into a grey network the RGB stem is summed, as before
    grey = build_model("resnet", 2)
    report = load_pretrained(grey, tmp_path / "rgb.pt")
    assert report.adapted == ["1.conv1.weight"]
    assert torch.allclose(grey.state_dict()["1.conv1.weight"], source.state_dict()["1.conv1.weight"].sum(1, True))
    # a grey checkpoint into an RGB network: a third in each channel, so a grey image scores as before
    torch.save(grey.state_dict(), tmp_path / "grey.pt")
    rgb = build_model("resnet", 2, in_channels=3)
    assert load_pretrained(rgb, tmp_path / "grey.pt").adapted == ["1.conv1.weight"]
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rgb.eval()(x.repeat(1, 3, 1, 1)), grey.eval()(x), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- partition, npz


def _write_npz(path: Path, rng, colour: bool, n=(40, 12, 12), side=12, classes=5) -> Path:
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        shape = (count, side, side, 3) if colour else (count, side, side)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape).astype(np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % classes).astype(np.uint8)[:, None]
    np.savez(path, **arrays)
    return path


def _partition(source: Path, out: Path) -> tuple[int, str]:
    from simulations.partition import main as partition

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = partition([str(source), "--out", str(out), "-k", "2", "--seed", "0", "--min-per-site", "2"])
    return code, stdout.getvalue()


def test_partition_of_a_colour_npz_writes_rgb_sites(tmp_path):
    from simulations.run import channel_mismatch

    rng = np.random.default_rng(0)
    source = _write_npz(tmp_path / "colour.npz", rng, colour=True)
    code, said = _partition(source, tmp_path / "sites")
    assert code == 0 and "-c in-channels=3" in said and "-c num-classes=5" in said
    record = json.loads((tmp_path / "sites" / "partition.json").read_text())
    assert record["channels"] == 3 and record["num_classes"] == 5
    original, _ = load_npz(source, "train", channels=3)
    for name in ("site_1", "holdout"):
        manifest = pd.read_csv(tmp_path / "sites" / name / "manifest.csv")
        assert Image.open(tmp_path / "sites" / name / manifest["image_path"].iloc[0]).mode == "RGB"
    site = load_site(tmp_path / "sites" / "site_1", image_size=12, num_classes=5, channels=3, cache=False)
    manifest = pd.read_csv(tmp_path / "sites" / "site_1" / "manifest.csv")
    train = manifest["split"].eq("train").to_numpy()
    index = manifest.loc[train, "patient_id"].str.removeprefix("train-").astype(int).to_numpy()
    np.testing.assert_allclose(site.images[train], original[index], atol=1e-4)  # 8-bit data: lossless
    # a grey run of these sites says what to set, before any process starts
    assert "in-channels=3" in channel_mismatch(str(tmp_path / "sites"), 1)[0]
    assert channel_mismatch(str(tmp_path / "sites"), 3) == (None, None)
    with pytest.raises(ManifestError, match="in-channels=3"):
        load_site(tmp_path / "sites" / "site_1", image_size=12, num_classes=5, cache=False)
    with pytest.raises(ValueError, match="colour images, expected grayscale"):
        load_npz(source, "train")

    # a grey npz: grey PNGs, as before
    code, said = _partition(_write_npz(tmp_path / "grey.npz", rng, colour=False), tmp_path / "grey")
    assert code == 0 and "in-channels" not in said
    assert json.loads((tmp_path / "grey" / "partition.json").read_text())["channels"] == 1
    first = pd.read_csv(tmp_path / "grey" / "site_1" / "manifest.csv")["image_path"].iloc[0]
    assert Image.open(tmp_path / "grey" / "site_1" / first).mode == "L"
    assert channel_mismatch(str(tmp_path / "grey"), 3)[1] is not None  # a note, not an error


def test_partition_of_a_retinamnist_subset(tmp_path):
    if not RETINA.is_file():
        pytest.skip(f"{RETINA} is not here (the shared MedMNIST downloads): the synthetic colour npz test covers it")
    rng = np.random.default_rng(0)
    with np.load(RETINA) as z:
        small = {}
        for split, n in (("train", 30), ("val", 10), ("test", 10)):
            idx = np.sort(rng.choice(len(z[f"{split}_labels"]), n, replace=False))
            small[f"{split}_images"], small[f"{split}_labels"] = z[f"{split}_images"][idx], z[f"{split}_labels"][idx]
    np.savez(tmp_path / "retina.npz", **small)
    code, said = _partition(tmp_path / "retina.npz", tmp_path / "sites")
    assert code == 0 and "in-channels=3" in said
    site = load_site(tmp_path / "sites" / "site_1", image_size=28, num_classes=5, channels=3, cache=False)
    assert site.images.shape[1:] == (3, 28, 28)
    spread = np.abs(site.images[:, 0] - site.images[:, 2]).mean()  # fundus photographs: red far above blue
    assert spread > 0.1, spread


# ------------------------------------------------------------------------------------------------- multi-class


def test_macro_one_vs_rest_auroc_and_accuracy_on_five_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 20)
    logits = rng.normal(0, 1, (100, 5)) + 1.5 * np.eye(5)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    per_class = [roc_auc_score(labels == k, probs[:, k]) for k in range(5)]
    assert auroc(labels, probs) == pytest.approx(np.mean(per_class))
    assert auroc(labels, probs) == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    # a class absent from the labels: the macro mean over the classes present
    present = labels != 4
    assert auroc(labels[present], probs[present]) == pytest.approx(
        np.mean([roc_auc_score(labels[present] == k, probs[present, k]) for k in range(4)]))

    class Fixed(torch.nn.Module):  # "logits" = the images' first pixels
        def forward(self, x):
            return x[:, 0, 0, :5]

    images = np.zeros((100, 3, 1, 5), np.float32)
    images[:, 0, 0] = np.log(probs)
    out = evaluate(Fixed(), make_loader(images, labels, 32), torch.device("cpu"))
    assert out["auroc"] == pytest.approx(np.mean(per_class), abs=1e-6)
    assert out["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels))
    assert out["loss"] == pytest.approx(-np.mean(np.log(probs[np.arange(100), labels])), abs=1e-5)


# ---------------------------------------------------------------------------------------------- explanations


def test_attribution_maps_and_figures_of_rgb_images(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fairness.attribution import gradcam_maps, image_evidence, occlusion_maps, show_image

    torch.manual_seed(0)
    model = build_model("resnet", 2, in_channels=3)
    x = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    x[:, 0, :4, :4] = 1.0  # a red corner
    occ = occlusion_maps(model, x, patch=4, stride=2)
    cam = gradcam_maps(model, x)
    assert occ.shape == cam.shape == (2, 16, 16) and np.isfinite(occ).all() and np.isfinite(cam).all()
    mask = np.zeros((16, 16), bool)
    mask[:4, :4] = True
    ev = image_evidence(model, x, mask, method="occlusion", n_draws=1, occlusion_stride=4)
    assert ev["input_size"] == [16, 16] and ev["n_images"] == 2
    fig, axes = plt.subplots(1, 2)
    show_image(axes[0], x[0], occ[0])  # in colour, the map over it
    show_image(axes[1], x[0, :1])  # grey
    assert axes[0].images[0].get_array().shape == (16, 16, 3) and axes[1].images[0].get_array().shape == (16, 16)
    fig.savefig(tmp_path / "rgb.png")
    plt.close(fig)
    assert Image.open(tmp_path / "rgb.png").mode in ("RGB", "RGBA")


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.simulation
@pytest.mark.slow  # ~30-35 s on 2 cores (Ray's start-up is most of it): `pytest -m slow tests/test_colour.py`
def test_federated_five_class_rgb_run_on_partitioned_colour_sites(tmp_path):
    from simulations.run import main as simulate
    from tests.conftest import ONE_ACTOR

    rng = np.random.default_rng(0)
    if RETINA.is_file():
        with np.load(RETINA) as z:
            small = {}
            for split, n in (("train", 150), ("val", 30), ("test", 60)):
                idx = np.sort(rng.choice(len(z[f"{split}_labels"]), n, replace=False))
                small[f"{split}_images"] = z[f"{split}_images"][idx]
                small[f"{split}_labels"] = z[f"{split}_labels"][idx]
        np.savez(tmp_path / "source.npz", **small)
    else:
        _write_npz(tmp_path / "source.npz", rng, colour=True, n=(150, 30, 60), side=28)
    from simulations.partition import main as partition

    with contextlib.redirect_stdout(io.StringIO()):
        assert partition([str(tmp_path / "source.npz"), "--out", str(tmp_path / "sites"), "-k", "3",
                          "--min-per-site", "5"]) == 0
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = simulate(["--sites", str(tmp_path / "sites"), "--out", str(tmp_path / "run"), "--rounds", "1",
                         "-c", "in-channels=3", "-c", "num-classes=5", "-c", "image-size=28", "-c", "local-epochs=1",
                         "--timeout", "300", *ONE_ACTOR])
    assert code == 0, stderr.getvalue()[-3000:]
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(metrics["round"]) == [0, 1] and np.isfinite(metrics["holdout_auroc"]).all()
    card = json.loads((tmp_path / "run" / "final_model.json").read_text())
    assert card["in_channels"] == 3 and card["num_classes"] == 5
    # the grey run of the same sites is refused before anything starts, saying what to set
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert simulate(["--sites", str(tmp_path / "sites"), "--out", str(tmp_path / "grey"), "--rounds", "1",
                         "-c", "num-classes=5"]) == 2
    assert "-c in-channels=3" in err.getvalue()
