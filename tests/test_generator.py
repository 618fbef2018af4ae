"""Synthetic hospital generator: determinism, on-disk formats, the causal model, counterfactual re-rendering,
scenario files and the MedMNIST helpers."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from simulations.generator import (
    MANIFEST_COLUMNS,
    apply_scanner,
    causal_rates,
    generate_consortium,
    lesion_params,
    load_consortium,
    marker_mask,
    read_site_pixels,
    read_truth,
    render,
    render_base,
    rerender_counterfactual,
    sample_holdout_truth,
    sample_truth,
    to_uint12,
    write_counterfactual_site,
    _grid,
)
from simulations.medmnist_sites import overlay_social_mechanism, partition_npz
from simulations.scenario import (
    SCENARIO_DIR,
    Scenario,
    ScenarioError,
    SiteSpec,
    load_scenario,
    scenario_from_dict,
    scenario_hash,
    scenario_to_toml,
    without_social_path,
)


def small_scenario(seed: int = 11, **site_overrides) -> dict:
    return {
        "name": "small",
        "seed": seed,
        "image_size": 32,
        "defaults": {"n": 40, "p_s_a0": 0.2, "p_s_a1": 0.7, **site_overrides},
        "sites": [
            {"name": "alpha", "legacy_manufacturer": "Siemens", "legacy_model": "Multix 1998"},
            {"name": "beta", "n": 30, "prevalence": 0.5, "modern_manufacturer": "Canon", "modern_model": "CXDI-710C"},
        ],
        "holdout": {"n": 20},
    }


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    out = tmp_path_factory.mktemp("cons")
    scenario = scenario_from_dict(small_scenario())
    dirs = generate_consortium(scenario, out)
    return scenario, out, dirs


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- determinism

def test_generation_is_deterministic_and_seed_dependent(consortium, tmp_path):
    scenario, out, dirs = consortium
    again = tmp_path / "again"
    generate_consortium(scenario_from_dict(small_scenario()), again)
    first, second = _files(out), _files(again)
    assert first.keys() == second.keys()
    assert len([k for k in first if k.endswith(".dcm")]) == 40 + 30 + 20
    assert all(first[k] == second[k] for k in first), "regeneration must be byte-identical (DICOM, CSV, JSON)"

    other = tmp_path / "other"
    generate_consortium(scenario_from_dict(small_scenario(seed=12)), other)
    a, b = read_site_pixels(out / "alpha"), read_site_pixels(other / "alpha")
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert not read_truth(out / "alpha")["A"].equals(read_truth(other / "alpha")["A"]) or \
        not read_truth(out / "alpha")["C"].equals(read_truth(other / "alpha")["C"])


# ------------------------------------------------------------------------------------------ formats on disk

def test_manifest_truth_and_dicom_headers(consortium):
    scenario, out, dirs = consortium
    assert dirs == [out / "alpha", out / "beta"]
    info = json.loads((out / "consortium.json").read_text())
    assert info["site_dirs"] == ["alpha", "beta"] and info["holdout_dir"] == "holdout"
    assert info["scenario_hash"] == scenario_hash(scenario)
    assert load_scenario(out / "scenario.toml") == scenario

    uids = set()
    for site_dir, spec in zip(dirs, scenario.sites):
        manifest = pd.read_csv(site_dir / "manifest.csv")
        truth = read_truth(site_dir)
        assert list(manifest.columns) == MANIFEST_COLUMNS
        assert len(manifest) == spec.n
        assert manifest["patient_id"].tolist() == [f"{spec.name}-{i:05d}" for i in range(spec.n)]
        assert (manifest["image_path"] == "images/" + manifest["patient_id"] + ".dcm").all()
        assert (manifest["label"] == truth["D"]).all() and (manifest["group"] == truth["A"]).all()
        assert (manifest["scanner_legacy"] == truth["S"]).all() and (manifest["age"] == truth["C"]).all()
        assert (manifest["site"] == spec.name).all() and set(manifest["sex"]) <= {"M", "F"}
        assert 0 < manifest["scanner_legacy"].sum() < spec.n  # both scanner types present
        for row in manifest.itertuples():
            ds = pydicom.dcmread(site_dir / row.image_path)
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1" and ds.Modality == "DX"
            assert ds.PhotometricInterpretation == "MONOCHROME2"
            assert ds.BitsAllocated == 16 and ds.BitsStored == 12 and ds.PixelRepresentation == 0
            assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == 0
            assert ds.PatientID == row.patient_id and ds.InstitutionName == spec.name
            assert ds.PatientAge == f"{row.age:03d}Y" and ds.PatientSex == row.sex
            kind = "legacy" if row.scanner_legacy == 1 else "modern"
            assert ds.Manufacturer == getattr(spec, f"{kind}_manufacturer")
            assert ds.ManufacturerModelName == getattr(spec, f"{kind}_model")
            px = ds.pixel_array
            assert px.shape == (32, 32) and px.dtype == np.uint16 and px.max() <= 4095
            uids |= {ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID}
    assert len(uids) == 3 * (40 + 30)  # every UID unique


def test_holdout_pooled_and_named(consortium):
    scenario, out, _ = consortium
    sites, holdout = load_consortium(out)
    truth = read_truth(holdout)
    assert len(truth) == 20 and (truth["site"] == "holdout").all()
    assert set(truth["source_site"]) <= {"alpha", "beta"} and truth["source_site"].nunique() == 2
    # each holdout patient follows its source site's mechanism
    for spec in scenario.sites:
        rows = truth[truth["source_site"] == spec.name]
        assert np.allclose(rows["p_S_a1"], spec.p_s_a1) and np.allclose(rows["base_logit"],
                                                                        causal_rates(spec)["base_logit"])
    named = scenario_from_dict({**small_scenario(), "holdout": {"n": 50, "site": "beta"}})
    assert (sample_holdout_truth(named)["source_site"] == "beta").all()


# --------------------------------------------------------------------------------------- counterfactuals

def test_rerender_with_own_s_reproduces_stored_pixels(consortium):
    _, out, dirs = consortium
    for d in [*dirs, out / "holdout"]:
        stored = read_site_pixels(d)
        again = rerender_counterfactual(d, "scanner_legacy")
        assert np.array_equal(to_uint12(again), stored)
        assert np.array_equal(np.round(again * 4095).astype(np.uint16), stored)


def test_marker_only_changes_marker_region(tmp_path):
    same = {f"{k}_{p}": v for k in ("legacy", "modern") for p, v in
            (("noise_std", 0.04), ("contrast", 0.9), ("blur_sigma", 0.5))}
    sc = scenario_from_dict({**small_scenario(marker=True, **same), "holdout": {"n": 5}})
    site_dir = generate_consortium(sc, tmp_path)[0]
    truth = read_truth(site_dir)
    stored = read_site_pixels(site_dir).astype(int)
    cf = to_uint12(rerender_counterfactual(site_dir)).astype(int)  # S -> S_cf
    changed = (truth["S"] != truth["S_cf"]).to_numpy()
    assert 0 < changed.sum() < len(truth)
    mask = marker_mask(32)
    diff = stored != cf
    assert not diff[:, ~mask].any(), "outside the marker nothing may change"
    assert diff[changed][:, mask].any(axis=1).all() and not diff[~changed].any()
    legacy_img = np.where(truth["S"].to_numpy()[:, None, None] == 1, stored, cf)
    assert (legacy_img[changed][:, mask] == 4095).all()  # the marker is the bright square


def test_counterfactual_changes_only_the_scanner_stage(consortium):
    _, _, dirs = consortium
    truth = read_truth(dirs[0])
    cf = rerender_counterfactual(dirs[0], "S_cf", quantize=False)
    rows = truth.to_dict("records")
    flipped = [i for i, r in enumerate(rows) if r["S"] != r["S_cf"]]
    assert flipped
    for i in flipped:
        r = rows[i]
        base = render_base(r)
        # the base ignores A and S entirely
        assert np.array_equal(base, render_base({**r, "A": 1 - r["A"], "S": 1 - r["S"]}))
        assert np.array_equal(cf[i], apply_scanner(base, r["S_cf"], r, r["seed_noise"]))
        assert np.array_equal(render(r), apply_scanner(base, r["S"], r, r["seed_noise"]))
        assert np.abs(cf[i] - render(r)).mean() > 0.005  # legacy vs modern scanner is a visible change
    # a lesion is part of the base: D changes the base, S does not
    r = next(r for r in rows if r["D"] == 1)
    assert not np.array_equal(render_base(r), render_base({**r, "D": 0}))


def test_write_counterfactual_site_follows_s_cf(consortium, tmp_path):
    _, _, dirs = consortium
    site_dir = dirs[0]
    cf_dir = write_counterfactual_site(site_dir, tmp_path / "cf")
    truth = read_truth(site_dir)
    manifest = pd.read_csv(cf_dir / "manifest.csv")
    assert (manifest["scanner_legacy"] == truth["S_cf"]).all() and (manifest["label"] == truth["D"]).all()
    assert np.array_equal(read_site_pixels(cf_dir), to_uint12(rerender_counterfactual(site_dir)))
    i = int(np.flatnonzero(truth["S_cf"] == 1)[0])
    assert pydicom.dcmread(cf_dir / manifest["image_path"][i]).Manufacturer == truth["legacy_manufacturer"][i]


# ----------------------------------------------------------------------------------------- causal model

def test_s_cf_follows_the_coupling():
    site = SiteSpec(name="c", n=3000, p_s_a0=0.2, p_s_a1=0.7)
    t = sample_truth(site, seed=5)
    assert (t["S_a0"] <= t["S_a1"]).all()
    assert (t["S"] == np.where(t["A"] == 1, t["S_a1"], t["S_a0"])).all()
    a0, a1 = t[t["A"] == 0], t[t["A"] == 1]
    assert (a0["S_cf"] >= a0["S"]).all() and (a1["S_cf"] <= a1["S"]).all()
    assert (a0["S_cf"] > a0["S"]).any()
    assert (t["S"] == (t["U_S"] < t["p_S"])).all()



def test_without_social_path_cuts_a_to_s_and_keeps_everything_else():
    site = SiteSpec(name="cut", n=4000, p_a=0.3, p_s_a0=0.1, p_s_a1=0.9)
    scenario = Scenario(name="cut", seed=3, image_size=32, sites=[site])
    cut = without_social_path(scenario).sites[0]
    assert cut.p_s_a0 == cut.p_s_a1 == pytest.approx(0.3 * 0.9 + 0.7 * 0.1)
    real, blind = sample_truth(site, seed=3), sample_truth(cut, seed=3)
    for col in ("A", "C", "D", "U_S", "seed_noise"):
        assert real[col].equals(blind[col]), col
    assert real.groupby("A")["S"].mean().diff().iloc[-1] > 0.7  # the social mechanism is there
    assert abs(blind.groupby("A")["S"].mean().diff().iloc[-1]) < 0.05  # and cut
    assert abs(blind["S"].mean() - real["S"].mean()) < 0.03  # the share of legacy scans is kept

def _within(x: np.ndarray, p: float, k: float = 4.0) -> bool:
    return abs(x.mean() - p) <= k * np.sqrt(p * (1 - p) / len(x))


def test_empirical_rates_match_the_causal_model():
    site = SiteSpec(name="rates", n=3000, p_a=0.4, p_s_a0=0.15, p_s_a1=0.6, prevalence=0.3, beta_a=1.0)
    t = sample_truth(site, seed=21)
    rates = causal_rates(site)
    assert abs(rates["prevalence"] - 0.3) < 1e-9
    assert _within(t["A"].to_numpy(), 0.4)
    for a in (0, 1):
        g = t[t["A"] == a]
        assert _within(g["S"].to_numpy(), rates[f"p_s_a{a}"])
        assert _within(g["D"].to_numpy(), rates[f"p_d_a{a}"])
    assert rates["p_d_a1"] - rates["p_d_a0"] > 0.15  # A -> D is really there
    assert _within(t["D"].to_numpy(), 0.3)
    # no S -> D edge by default: within A, D does not depend on S beyond noise; and switching S leaves D as is
    assert (t["D_S_cf"] == t["D"]).all()
    # the label-shift knob moves prevalence, nothing else
    shifted = dataclasses.replace(site, prevalence_offset=0.3)
    t2 = sample_truth(shifted, seed=21)
    assert _within(t2["D"].to_numpy(), 0.6) and t2["S"].equals(t["S"]) and t2["A"].equals(t["A"])
    # with an S -> D edge, switching S can switch D (D is a recanting witness)
    t3 = sample_truth(dataclasses.replace(site, beta_s=2.0), seed=21)
    assert (t3["D_S_cf"] != t3["D"]).any()
    assert t3.groupby("S")["D"].mean().diff().iloc[-1] > 0.2


def test_lesion_is_detectable_but_not_trivially():
    spec = load_scenario(SCENARIO_DIR / "default.toml").sites[0]
    site = dataclasses.replace(spec, n=600, prevalence=0.4)
    t = sample_truth(site, seed=3, image_size=64)
    x = np.stack([render(r) for r in t.to_dict("records")])
    y = t["D"].to_numpy()
    # (a) logistic regression on 16x16 downsampled pixels (unknown lesion position)
    feats = x.reshape(len(x), 16, 4, 16, 4).mean(axis=(2, 4)).reshape(len(x), -1)
    clf = LogisticRegression(C=1.0, max_iter=3000).fit(feats[:400], y[:400])
    auc_lr = roc_auc_score(y[400:], clf.decision_function(feats[400:]))
    assert 0.65 < auc_lr < 0.95

    # (b) an oracle that knows where the lesion would be: matched Gaussian minus surrounding ring
    def oracle(images):
        yy, xx = _grid(64)
        out = []
        for img, r in zip(images, t.to_dict("records")):
            p = lesion_params(r["seed_lesion"])
            d2 = (yy - p["cy"]) ** 2 + (xx - p["cx"]) ** 2
            w = np.exp(-d2 / (2 * p["sigma"] ** 2))
            ring = (d2 > (2 * p["sigma"]) ** 2) & (d2 < (3 * p["sigma"]) ** 2)
            out.append((w * img).sum() / w.sum() - img[ring].mean())
        return np.array(out)

    auc_oracle = roc_auc_score(y, oracle(x))
    assert 0.9 < auc_oracle < 1.0  # faint, small lesions over anatomy keep even the oracle imperfect
    # without a lesion the same statistic is chance: it measures the lesion, nothing else
    blank = np.stack([render({**r, "lesion_contrast": 0.0}) for r in t.to_dict("records")])
    assert 0.4 < roc_auc_score(y, oracle(blank)) < 0.6


# -------------------------------------------------------------------------------------------- scenarios

def test_shipped_scenarios_load():
    names = {p.stem: load_scenario(p) for p in SCENARIO_DIR.glob("*.toml")}
    assert set(names) >= {"default", "iid", "label_skew", "social_shortcut"}
    default = names["default"]
    assert len(default.sites) == 4 and default.holdout.n == 400 and default.image_size == 64
    assert all(300 <= s.n <= 450 for s in default.sites)
    assert len({(s.p_s_a0, s.p_s_a1) for s in default.sites}) == 4
    iid = names["iid"]
    assert len({dataclasses.replace(s, name="x") for s in iid.sites}) == 1
    prevs = [s.target_prevalence for s in names["label_skew"].sites]
    assert max(prevs) - min(prevs) >= 0.5
    shortcut = names["social_shortcut"]
    assert all(s.marker and s.p_s_a1 - s.p_s_a0 >= 0.6 for s in shortcut.sites)
    assert load_scenario("default") == default  # bare name resolves to the shipped file
    for sc in names.values():  # the resolved TOML written next to a consortium reads back identically
        assert scenario_hash(scenario_from_dict(tomllib.loads(scenario_to_toml(sc)))) == scenario_hash(sc)


@pytest.mark.parametrize("patch, key", [
    ({"sites": [{"name": "a", "n": 5, "p_sa1": 0.3}]}, "sites[0].p_sa1"),
    ({"sites": [{"name": "a", "n": 5, "p_s_a1": 1.3}]}, "sites[0].p_s_a1"),
    ({"defaults": {"p_a": -0.1}}, "sites[0].p_a"),
    ({"defaults": {"lesion_contrst": 0.2}}, "defaults.lesion_contrst"),
    ({"sites": [{"n": 5}]}, "sites[0].name"),
    ({"sites": [{"name": "a", "n": 5, "prevalence_offset": 0.8}]}, "sites[0].prevalence_offset"),
    ({"sites": [{"name": "a", "n": "ten"}]}, "sites[0].n"),
    ({"holdout": {"n": 10, "site": "nowhere"}}, "holdout.site"),
    ({"colour": "blue"}, "colour"),
])
def test_scenario_errors_name_the_key_and_file(tmp_path, patch, key):
    raw = {"name": "bad", "seed": 1, "sites": [{"name": "a", "n": 5}], **patch}
    lines = [f'name = "{raw["name"]}"', f'seed = {raw["seed"]}']
    for k, v in raw.items():
        if k not in ("name", "seed", "sites", "defaults", "holdout"):
            lines.append(f"{k} = {json.dumps(v)}")
    for table in ("defaults", "holdout"):
        if table in raw:
            lines.append(f"[{table}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in raw[table].items()]
    for site in raw["sites"]:
        lines.append("[[sites]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in site.items()]
    path = tmp_path / "bad.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_missing_required_top_level_key():
    with pytest.raises(ScenarioError, match="'seed'"):
        scenario_from_dict({"name": "x", "sites": [{"name": "a", "n": 3}]})


# ------------------------------------------------------------------------------------ reuse / overwrite

def test_reuse_does_not_rewrite_and_changed_scenario_raises(tmp_path):
    sc = scenario_from_dict({**small_scenario(), "holdout": {"n": 5}})
    dirs = generate_consortium(sc, tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert generate_consortium(sc, tmp_path) == dirs
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == mtimes

    changed = scenario_from_dict({**small_scenario(), "holdout": {"n": 6}})
    with pytest.raises(FileExistsError, match="different scenario"):
        generate_consortium(changed, tmp_path)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == mtimes  # untouched
    generate_consortium(changed, tmp_path, overwrite=True)
    assert json.loads((tmp_path / "consortium.json").read_text())["scenario_hash"] == scenario_hash(changed)
    assert len(read_truth(tmp_path / "holdout")) == 6


# ----------------------------------------------------------------------------------------------- MedMNIST

def _fake_npz(path: Path, n: int = 400, classes: int = 4, size: int = 28, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, m in (("train", n), ("val", n // 4), ("test", n // 4)):
        labels = rng.integers(0, classes, size=(m, 1))
        imgs = rng.integers(0, 256, size=(m, size, size), dtype=np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = imgs, labels
    np.savez(path, **arrays)
    return path


def _label_dist(site_dir: Path, classes: int) -> np.ndarray:
    labels = pd.read_csv(site_dir / "manifest.csv")["label"]
    return np.bincount(labels, minlength=classes) / len(labels)


def test_partition_npz_iid_vs_dirichlet(tmp_path):
    npz = _fake_npz(tmp_path / "fake.npz", n=800)
    with np.load(npz) as z:
        images, labels = z["train_images"], z["train_labels"].ravel()
    spread = {}
    for tag, alpha in (("iid", None), ("skew", 0.1)):
        dirs = partition_npz(npz, tmp_path / tag, k=4, alpha=alpha, seed=3)
        assert [d.name for d in dirs] == ["site_1", "site_2", "site_3", "site_4"]
        used = np.concatenate([pd.read_csv(d / "manifest.csv")["source_index"].to_numpy() for d in dirs])
        assert len(used) == 800 and len(np.unique(used)) == 800  # each image once, no overlap
        dists = np.stack([_label_dist(d, 4) for d in dirs])
        spread[tag] = max(0.5 * np.abs(p - q).sum() for p in dists for q in dists)  # max total variation
        manifest = pd.read_csv(dirs[0] / "manifest.csv")
        row = manifest.iloc[0]
        assert np.array_equal(np.asarray(Image.open(dirs[0] / row["image_path"])), images[row["source_index"]])
        assert (manifest["label"].to_numpy() == labels[manifest["source_index"]]).all()
    assert spread["iid"] < 0.2 and spread["skew"] > 0.5


def test_overlay_keeps_real_labels_and_adds_social_mechanism(tmp_path):
    npz = _fake_npz(tmp_path / "bin.npz", n=300, classes=2)
    spec = SiteSpec(name="semi", n=1, p_s_a0=0.1, p_s_a1=0.9, marker=True)
    site_dir = overlay_social_mechanism(npz, tmp_path / "out", spec, seed=4, p_a_given_d=(0.2, 0.8), n=200)
    with np.load(npz) as z:
        images, labels = z["train_images"], z["train_labels"].ravel()
    manifest, truth = pd.read_csv(site_dir / "manifest.csv"), read_truth(site_dir)
    assert len(manifest) == 200 and truth["base_index"].is_unique
    src = truth["base_index"].to_numpy()
    assert (manifest["label"].to_numpy() == labels[src]).all()
    diff = truth.groupby("D")["A"].mean()
    assert diff[1] - diff[0] > 0.4  # A associated with D
    assert truth.groupby("A")["S"].mean().diff().iloc[-1] > 0.6  # S follows A
    assert np.array_equal(render_base(truth.iloc[0]), images[src[0]] / 255.0)  # the real image is the base
    stored = read_site_pixels(site_dir)
    assert np.array_equal(to_uint12(rerender_counterfactual(site_dir, "scanner_legacy")), stored)
    legacy = truth["S"].to_numpy() == 1
    assert (stored[legacy][:, marker_mask(28)] == 4095).all()
