"""Grad-CAM, HiResCAM and occlusion image evidence for the fairness audit (fairness/attribution.py) and its report
section.

The models under test (a SmallCNN, a ResNet) are trained on noise images whose label is the corner marker alone;
half of all images (either label) carry the same bright square somewhere else, so only the corner position
decides."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch.nn import functional as F

from core_models.model_card import write_card
from core_models.networks import SmallCNN, build_model
from fairness import load_graph_spec, run_audit
from fairness.attribution import (
    DEFAULT_LAYERS,
    RANDOMISATION_PASS,
    area_share,
    cam_resolution,
    deletion_curve,
    gradcam_maps,
    grow_mask,
    hirescam_maps,
    image_evidence,
    occlusion_maps,
    randomisation_check,
    randomised_copy,
    region_share,
)
from fairness.report import render_html
from simulations.generator import marker_mask
from simulations.scenario import SiteSpec

SIZE = 32
MASK = marker_mask(SIZE)


def marker_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, 32, 32) noise images; label 1 = the corner marker is burnt in; half carry a decoy square elsewhere."""
    rng = np.random.default_rng(seed)
    x = np.clip(0.45 + 0.15 * rng.standard_normal((n, 1, SIZE, SIZE)), 0, 1).astype(np.float32)
    y = (rng.random(n) < 0.5).astype(np.int64)
    x[y == 1, 0] = np.where(MASK, 1.0, x[y == 1, 0])
    for i in np.flatnonzero(rng.random(n) < 0.5):
        r, c = rng.integers(8, SIZE - 4, size=2)
        x[i, 0, r:r + 3, c:c + 3] = 1.0
    return x, y


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread for the module, so no number depends on how the machine's BLAS splits a sum."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_on_marker(model: torch.nn.Module, steps: int = 150) -> tuple[torch.nn.Module, np.ndarray, float]:
    """``model`` trained (Adam, seeded batches) to read the corner marker; its held-out accuracy and 48 marked
    held-out images."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        x, y = marker_images(32, 1000 + step)
        loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = marker_images(400, 1)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    return model, x[y == 1][:48], acc


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return train_on_marker(SmallCNN())


@pytest.fixture(scope="module")
def trained_resnet():
    torch.manual_seed(0)
    return train_on_marker(build_model("resnet"))


def test_the_test_model_reads_the_corner_only(trained):
    _model, marked, acc = trained
    assert acc > 0.98  # decoy squares elsewhere do not fool it: it uses the corner position
    assert np.all(marked[:, 0][:, MASK] == 1.0)


def test_gradcam_points_at_the_marker_and_leaves_the_model_alone(trained):
    model, marked, _ = trained
    model.train()
    model.head.bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        maps = gradcam_maps(model, marked)
        assert model.training and not model.head.bias.requires_grad  # mode and flags untouched
    finally:
        model.eval()
        model.head.bias.requires_grad_(True)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())  # MONAI's hooks on the copy
    assert maps.shape == (len(marked), SIZE, SIZE) and maps.dtype == np.float32
    assert np.all(np.isfinite(maps)) and maps.min() >= 0 and np.all(maps.max(axis=(1, 2)) > 0)
    # the maximum sits on the marker (MONAI's default post-processing would flip it to the minimum)
    assert np.all(maps[:, MASK].max(axis=1) == maps.max(axis=(1, 2)))
    share, area = region_share(maps, MASK), area_share(MASK)
    assert area == pytest.approx(9 / 1024)
    # a 2x2 CAM upsampled to 32 px puts at most ~9/256 of its mass on 9 pixels: ~4x the area share
    assert share.mean() > 3.5 * area and np.all(share > 2.5 * area)
    for mirrored in (MASK[::-1], MASK[:, ::-1], MASK[::-1, ::-1]):  # the same square in the other corners
        assert np.all(region_share(maps, mirrored) < area)
    grown = region_share(maps, MASK, grow=16)
    assert np.all(grown > share) and grown.mean() > 2 * area_share(MASK, 16)



def test_occlusion_maps_resolve_the_marker_at_pixel_level(trained):
    model, marked, _ = trained
    x = marked[:8]
    maps = occlusion_maps(model, x)
    assert maps.shape == (len(x), SIZE, SIZE) and maps.dtype == np.float32
    # hiding the marker is what lowers the score: the mass sits on the 3x3 square, far above its area share
    share, area = region_share(maps, MASK), area_share(MASK)
    assert np.all(share > 10 * area)
    assert np.all(maps[:, MASK].mean(axis=1) > 5 * np.abs(maps[:, ~grow_mask(MASK, 4)]).mean(axis=1))
    # pixel (0, 0) lies in one window only (the 4x4 one at the corner): its value is exactly that window's drop
    hidden = x.copy()
    hidden[:, :, :4, :4] = x.mean(axis=(1, 2, 3))[:, None, None, None]
    with torch.no_grad():
        p, q = (torch.softmax(model(torch.from_numpy(v)), 1)[:, 1].numpy() for v in (x, hidden))
    np.testing.assert_allclose(maps[:, 0, 0], p - q, atol=1e-5)
    ev = image_evidence(model, x, MASK, method="occlusion", n_draws=2)
    assert ev["method"] == "occlusion" and ev["cam_resolution"] == [SIZE, SIZE] and ev["grow"] == 0
    assert ev["region_share_mean"] == pytest.approx(float(share.mean()), rel=1e-5)
    assert ev["deletion_auc_attribution"] < ev["deletion_auc_random"]

def test_cams_reduce_to_the_class_activation_map_before_a_global_average_pool():
    """Before global average pooling and a linear head (a MONAI ResNet's last stage) the gradient at every position
    is the head's weight over the number of positions, so Grad-CAM and HiResCAM both equal the class activation
    map ReLU(sum_k w_k A_k) / (h w) (Zhou et al. 2016): the definition, checked on random weights."""
    torch.manual_seed(4)
    model = build_model("resnet").eval()
    x = np.random.default_rng(4).random((3, 1, 32, 32)).astype(np.float32)
    seen = {}
    handle = model[1].layer4.register_forward_hook(lambda _m, _i, o: seen.__setitem__("a", o.detach()))
    with torch.no_grad():
        model(torch.from_numpy(x))
    handle.remove()
    act = seen["a"]
    cam = torch.relu(torch.einsum("k,nkhw->nhw", model[1].fc.weight[1].detach(), act) / (act.shape[2] * act.shape[3]))
    cam = F.interpolate(cam[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0].numpy()
    assert cam.max() > 0 and (cam == 0).any()  # the ReLU bites somewhere: the comparison is not trivial
    np.testing.assert_allclose(hirescam_maps(model, x, "1.layer4"), cam, atol=1e-6)
    np.testing.assert_allclose(gradcam_maps(model, x, "1.layer4"), cam, atol=1e-6)
    # the same inside a caller's no_grad block, and for the model as Opacus wraps it for DP-SGD (its hooks left out)
    with torch.no_grad():
        np.testing.assert_allclose(hirescam_maps(model, x, "1.layer4"), cam, atol=1e-6)
        np.testing.assert_allclose(gradcam_maps(model, x, "1.layer4"), cam, atol=1e-6)
    wrapped = GradSampleModule(copy.deepcopy(model))
    for maps in (hirescam_maps, gradcam_maps):
        np.testing.assert_allclose(maps(wrapped, x, "1.layer4"), cam, atol=1e-6)


def test_a_resnet_gives_maps_with_resolution_that_pass_both_checks(trained_resnet):
    """SmallCNN's CAMs cancel before its last 2x2 block; a ResNet's second stage (8x8 at 32 px) does not, and its
    HiResCAM finds the marker, changes with the weights and orders the deletion better than chance (Grad-CAM at the
    same layer misses the marker here)."""
    model, marked, acc = trained_resnet
    assert acc > 0.98
    assert cam_resolution(model, "1.layer2", (SIZE, SIZE)) == (8, 8)
    ev = {method: image_evidence(model, marked[:24], MASK, method=method, n_draws=3)
          for method in ("hirescam", "gradcam")}
    for e in ev.values():
        assert e["layer"] == "1.layer2" and e["cam_resolution"] == [8, 8] and e["grow"] == 4
        assert e["n_zero_maps"] == 0  # not cancelled, unlike SmallCNN's stem and block2
    hires = ev["hirescam"]
    assert hires["passes_randomisation"] and hires["passes_deletion"]
    assert hires["region_share_mean"] > 4 * hires["region_area_share"]  # measured 0.30 against 0.0625
    # Grad-CAM averages each channel's gradient over the positions: on this model it misses the marker (0.04)
    assert ev["gradcam"]["region_share_mean"] < hires["region_share_mean"] / 2


def test_region_share_on_hand_made_maps():
    inside = np.where(MASK, 2.0, 0.0)
    outside = np.where(MASK, 0.0, 1.0)
    np.testing.assert_array_equal(region_share(np.stack([inside, outside]), MASK), [1.0, 0.0])
    assert region_share(inside - 5 * outside, MASK)[0] == 1.0  # negative mass does not count
    assert region_share(inside + outside, MASK)[0] == pytest.approx(18 / (18 + 1024 - 9))
    just_outside = np.zeros((SIZE, SIZE))
    just_outside[4, 4] = 1.0  # diagonal neighbour of the 3x3 marker at rows/cols 1..3
    assert region_share(just_outside, MASK)[0] == 0.0 and region_share(just_outside, MASK, grow=1)[0] == 1.0
    assert area_share(MASK, 1) == 25 / 1024
    assert np.isnan(region_share(np.zeros((SIZE, SIZE)), MASK)[0])


def test_randomisation_check_separates_trained_from_random_weights(trained):
    model, marked, _ = trained
    assert randomisation_check(model, marked, seed=0) < 0.5
    # the check can fail: a model that *is* those random weights gets its own maps back
    torch.manual_seed(7)
    untrained = SmallCNN()
    again = randomised_copy(untrained, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(untrained.state_dict().values(), again.state_dict().values()))
    assert randomisation_check(untrained, marked, seed=7, n_draws=1) == pytest.approx(1.0)
    state = torch.random.get_rng_state()
    randomised_copy(untrained, seed=8)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random stream is left alone


def test_deletion_curve_drops_faster_along_the_map(trained):
    model, marked, _ = trained
    maps = gradcam_maps(model, marked)
    fractions = (0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
    dc = deletion_curve(model, marked, maps, fractions=fractions)
    with torch.no_grad():
        p = torch.softmax(model(torch.from_numpy(marked)), dim=1)[:, 1].numpy()
    assert dc["fractions"] == list(fractions)
    assert dc["attribution"][0] == pytest.approx(float(p.mean()), abs=1e-6) == dc["random"][0]
    assert dc["attribution"][-1] == pytest.approx(dc["random"][-1], abs=1e-6)  # everything deleted either way
    assert dc["attribution"][2] < 0.5 < dc["random"][2]  # 5% of the pixels, taken from the map, remove the marker
    assert dc["auc_attribution"] < 0.5 * dc["auc_random"]
    assert dc["auc_attribution"] == pytest.approx(np.trapezoid(dc["attribution"], fractions))
    # a flat map (ties everywhere) must delete in random order, not by pixel index (the marker's corner first)
    flat = deletion_curve(model, marked, np.zeros_like(maps), fractions=fractions)
    assert flat["auc_attribution"] > 0.8 * dc["auc_random"]
    other = deletion_curve(model, marked, maps, fractions=fractions, fill=0.0, seed=3)
    assert other["random"] != dc["random"] and other["attribution"][0] == dc["attribution"][0]


def _minimal_audit() -> dict:
    """A real audit of a small synthetic prediction table (no bootstrap-heavy checks)."""
    from tests.test_fairness import add_score, fast_truth

    site = SiteSpec(name="r", p_s_a0=0.2, p_s_a1=0.6)
    t = fast_truth(site, 600, 5)
    add_score(t, site, 5)
    frame = t.rename(columns={"A": "group", "C": "age", "S": "scanner_legacy", "D": "label"})
    return run_audit(frame[["group", "age", "scanner_legacy", "label", "score"]], load_graph_spec("synthetic"),
                     n_boot=10, seed=0)


def test_image_evidence_dict_and_report_section(trained):
    model, marked, _ = trained
    torch.manual_seed(3)
    before = SmallCNN()  # stands in for the unmitigated model
    ev = image_evidence(model, marked[:24], MASK, reference_model=before)
    assert json.loads(json.dumps(ev, allow_nan=False)) == ev  # plain, strict-JSON types
    assert ev["n_images"] == 24 and ev["layer"] == DEFAULT_LAYERS[0] == "features.block4"
    assert ev["cam_resolution"] == [2, 2] and ev["grow"] == 16
    assert ev["region_area_share"] == pytest.approx(area_share(MASK, 16))
    maps = gradcam_maps(model, marked[:24])
    assert ev["region_share_mean"] == pytest.approx(float(region_share(maps, MASK, 16).mean()))
    assert ev["deletion_auc_attribution"] < ev["deletion_auc_random"]
    assert ev["randomisation_draws"] == 10 and 0 < ev["randomisation_pairs"] <= 240
    assert ev["randomisation_spearman"] < 0.5
    assert ev["passes_deletion"] is True
    assert ev["passes_randomisation"] is (ev["randomisation_spearman"] <= RANDOMISATION_PASS)
    assert set(ev["reference"]) >= {"region_share_mean", "randomisation_spearman", "deletion_auc_attribution"}
    with pytest.raises(ValueError, match="1x1"):
        image_evidence(model, np.zeros((2, 1, 28, 28), np.float32), marker_mask(28))

    audit = _minimal_audit()
    html = render_html(audit, {"image_evidence": ev})
    assert "<h2 id='image-evidence'>Image evidence (attribution maps)</h2>" in html
    assert html.index("id='image-evidence'") < html.index("id='privacy'")
    assert f"<td>{ev['region_share_mean']:.4f}</td>" in html
    assert f"<td>{ev['reference']['deletion_auc_random']:.4f}</td>" in html
    named = render_html(audit, {"image_evidence": {"mitigated": ev, "plain": {k: v for k, v in ev.items()
                                                                              if k != "reference"}}})
    assert "<td>mitigated</td>" in named and "<td>plain</td>" in named
    assert "image-evidence" not in render_html(audit, {}) and "Grad-CAM" not in render_html(audit)


def test_audit_cli_adds_image_evidence_from_files(trained, tmp_path, capsys):
    """equifed-audit --model --images: a generated site folder (real DICOMs with the marker on legacy scans), the
    marker-reading model as weights on disk; the report carries the evidence; bad inputs exit 2 with a message."""
    import json

    import pandas as pd

    from fairness.cli import main as audit_main
    from simulations.generator import generate_consortium

    model, _, _ = trained
    (tmp_path / "s.toml").write_text('name = "cam"\nseed = 5\nimage_size = 32\n[defaults]\nn = 40\nmarker = true\n'
                                     'p_s_a0 = 0.5\np_s_a1 = 0.9\n[[sites]]\nname = "east"\n')
    (site,) = generate_consortium(tmp_path / "s.toml", tmp_path / "data")
    torch.save({"model": model.state_dict()}, tmp_path / "final_model.pt")
    write_card(tmp_path / "final_model.pt", "cnn", 2, 32)  # what the server writes beside its models
    rng = np.random.default_rng(0)
    n = 800
    a = rng.integers(0, 2, n)
    s = (rng.random(n) < np.where(a == 1, 0.8, 0.2)).astype(int)
    d = (rng.random(n) < 0.3 + 0.2 * a).astype(int)
    pd.DataFrame({"group": a, "age": rng.normal(60, 10, n), "scanner_legacy": s, "label": d,
                  "score": np.clip(0.2 + 0.4 * d + 0.1 * s + rng.normal(0, 0.05, n), 0, 1)}).to_csv(
        tmp_path / "preds.csv", index=False)
    base = ["--predictions", str(tmp_path / "preds.csv"), "--graph", "synthetic", "--n-boot", "20", "--no-dowhy",
            "--no-placebo"]
    assert audit_main(base + ["--out", str(tmp_path / "audit"), "--model", str(tmp_path / "final_model.pt"),
                              "--images", str(site)]) == 0
    audit = json.loads((tmp_path / "audit" / "fairness_audit.json").read_text())
    ev = audit["context"]["image_evidence"]
    legacy = int((pd.read_csv(site / "manifest.csv")["scanner_legacy"] == 1).sum())
    assert ev["n_images"] == legacy > 0
    assert ev["region_share_mean"] > ev["region_area_share"]  # the marker model looks at the corner
    assert "id='image-evidence'" in (tmp_path / "audit" / "fairness_audit.html").read_text()
    assert audit_main(base + ["--out", str(tmp_path / "occ"), "--model", str(tmp_path / "final_model.pt"),
                              "--images", str(site), "--attribution", "hirescam,occlusion", "--max-images", "4"]) == 0
    both = json.loads((tmp_path / "occ" / "fairness_audit.json").read_text())["context"]["image_evidence"]
    assert list(both) == ["hirescam", "occlusion"] and both["hirescam"]["layer"] == "features.block4"
    occ = both["occlusion"]
    assert occ["method"] == "occlusion" and occ["n_images"] == min(4, legacy) and occ["grow"] == 0
    assert occ["region_share_mean"] > 5 * occ["region_area_share"]  # pixel resolution: far sharper than 2x2
    html = (tmp_path / "occ" / "fairness_audit.html").read_text()
    assert "<td>hirescam</td>" in html and "<td>occlusion</td>" in html and "randomisation pass" in html
    capsys.readouterr()
    for extra, message in [(["--model", str(tmp_path / "final_model.pt")], "both --model and --images"),
                           (["--model", str(tmp_path / "nope.pt"), "--images", str(site)], "not found"),
                           (["--model", str(tmp_path / "final_model.pt"), "--images", str(site), "--region", "0,0,2"],
                            "--region"),
                           (["--model", str(tmp_path / "final_model.pt"), "--images", str(site), "--image-filter",
                             "scanner_legacy=7"], "no image"),
                           (["--model", str(tmp_path / "final_model.pt"), "--images", str(site), "--attribution",
                             "gradcam,lime"], "choose from gradcam, hirescam, occlusion")]:
        assert audit_main(base + ["--out", str(tmp_path / "x")] + extra) == 2
        assert message in capsys.readouterr().err
    # weights without a card: the image size is never guessed
    shutil.copyfile(tmp_path / "final_model.pt", tmp_path / "bare.pt")
    assert audit_main(base + ["--out", str(tmp_path / "x"), "--model", str(tmp_path / "bare.pt"), "--images",
                              str(site)]) == 2
    assert "give --image-size" in capsys.readouterr().err
