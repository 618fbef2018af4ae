"""A volume run's settings reach every reader: the run config's checks, the site's ceiling on values per input,
the client's site loading (volumes cached apart from a 2-D load of the same folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.policy import PolicyRefusal, SitePolicy
from client.site import open_site
from core_models.config import ConfigError, RunConfig, app_defaults
from core_models.data import ManifestError
from simulations.scenario import scenario_from_dict
from simulations.volume_scenario import VolumeSpec, generate_volumes

DEFAULTS = app_defaults(Path(__file__).resolve().parent.parent / "pyproject.toml")


def run_config(**overrides) -> RunConfig:
    return RunConfig.from_flower({**DEFAULTS, **{k.replace("_", "-"): v for k, v in overrides.items()}})


@pytest.fixture(scope="module")
def volume_site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vol")
    scenario = scenario_from_dict({"name": "vol", "seed": 3, "image_size": 16,
                                   "defaults": {"n": 12, "prevalence": 0.5}, "sites": [{"name": "h0"}]})
    generate_volumes(scenario, out, VolumeSpec(side=16, format="nifti"))
    return out / "h0"


def test_a_volume_run_under_dp_trains_the_3d_cnn_and_refuses_what_is_2d_only():
    cfg = run_config(dims=3, image_size=32, dp=True)
    assert cfg.train.model == "cnn"  # auto: the 2-D scattering recipe does not apply to volumes
    assert (cfg.train.local_epochs, run_config(dims=2).train.local_epochs) == (5, 2)  # fewer studies, longer rounds
    assert cfg.train.volume_settings().window_center is None  # "none": MR-style percentile scaling
    assert run_config(dims=3, volume_window="soft-tissue").train.volume_settings().window_width == 400.0
    assert run_config(dims=2).train.volume_settings() is None
    for bad, said in ((dict(model="scatter-linear"), "scatter-linear"), (dict(in_channels=3), "in-channels = 3"),
                      (dict(detection=True), "detection"), (dict(image_size=160), "image-size > 128"),
                      (dict(image_size=8), "image-size < 16")):
        with pytest.raises(ConfigError, match=said):
            run_config(dims=3, **bad)
    with pytest.raises(ConfigError, match="volume-window"):
        run_config(dims=3, volume_window="liver-ish")
    with pytest.raises(ConfigError, match="'dims'"):
        run_config(dims=4)


def test_a_site_counts_a_volume_s_voxels_against_its_ceiling(tmp_path):
    policy = SitePolicy.load(tmp_path)  # the defaults: max-image-size 512, so 512^2 values per input
    policy.check_request(run_config(dims=3, image_size=64))  # 64^3 = 512^2: allowed
    with pytest.raises(PolicyRefusal, match=r"1 x 65\^3 values per volume"):
        policy.check_request(run_config(dims=3, image_size=65))
    policy.check_request(run_config(dims=2, image_size=512))


def test_the_client_loads_a_volume_site_as_cubes_and_keeps_its_2d_load_apart(volume_site):
    cfg = run_config(dims=3, image_size=16)
    site = open_site(volume_site, image_size=16, seed=0, volume=cfg.train.volume_settings())
    assert site.data.images.shape == (12, 1, 16, 16, 16)
    assert site.data.rejected == []
    assert 0.0 <= site.data.images.min() and site.data.images.max() <= 1.0
    assert set(site.split) <= {"train", "val", "test"} and site.count("train") > 0
    again = open_site(volume_site, image_size=16, seed=0, volume=cfg.train.volume_settings())
    assert again is site  # read once per process
    with pytest.raises(ManifestError, match="12 rows, all rejected"):  # the same folder read as images: refused
        open_site(volume_site, image_size=16, seed=0)


def test_a_hospital_checks_its_folder_of_studies_as_volumes_before_any_run(volume_site, tmp_path):
    from client.supernode import check_data
    from core_models.data.volumes import names_volumes

    summary = check_data(volume_site, image_size=16)  # what `equifed-client check/start` runs
    assert (summary.images, summary.rejected, summary.patients) == (12, 0, 12)
    assert names_volumes(volume_site)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "manifest.csv").write_text("patient_id,image_path,label\np1,a.png,0\np2,scan.nii.gz,1\n")
    assert not names_volumes(flat)  # one image row: an image site (its NIfTI row is then rejected with the reason)
