"""`equifed-predict` writes the table `equifed-audit` reads, from a model and a site folder alone."""

import json

import pandas as pd
import torch

from core_models.model_card import write_card
from core_models.networks import build_model
from fairness.cli import main as audit_main
from fairness.predict import main as predict_main
from simulations.generator import generate_consortium

SCENARIO = """
name = "predict"
seed = 4
image_size = 32
[[sites]]
name = "clinic"
n = 120
"""


def test_predict_then_audit_on_a_simulated_site(tmp_path, capsys):
    (tmp_path / "s.toml").write_text(SCENARIO)
    (site,) = generate_consortium(tmp_path / "s.toml", tmp_path / "data")
    torch.manual_seed(0)
    torch.save(build_model("cnn").state_dict(), tmp_path / "final_model.pt")
    write_card(tmp_path / "final_model.pt", "cnn", 2, 32)
    preds = tmp_path / "preds.csv"
    assert predict_main(["--model", str(tmp_path / "final_model.pt"), "--data", str(site), "--out", str(preds),
                         "--columns", "group,age,scanner_legacy,site"]) == 0
    table = pd.read_csv(preds)
    manifest = pd.read_csv(site / "manifest.csv")
    assert list(table.columns) == ["patient_id", "image_path", "group", "age", "scanner_legacy", "site", "label",
                                   "score"]
    assert len(table) == len(manifest) and table["score"].between(0, 1).all() and table["score"].std() > 0
    merged = table.merge(manifest, on="image_path", suffixes=("", "_m"))
    assert (merged["label"] == merged["label_m"]).all() and (merged["group"] == merged["group_m"]).all()
    assert audit_main(["--predictions", str(preds), "--graph", "synthetic", "--out", str(tmp_path / "audit"),
                       "--n-boot", "20", "--no-dowhy", "--no-placebo"]) == 0
    audit = json.loads((tmp_path / "audit" / "fairness_audit.json").read_text())
    assert audit["verdict"] and (tmp_path / "audit" / "fairness_audit.html").exists()


def test_predict_names_what_is_wrong(tmp_path, capsys):
    (tmp_path / "s.toml").write_text(SCENARIO)
    (site,) = generate_consortium(tmp_path / "s.toml", tmp_path / "data")
    torch.save(build_model("cnn").state_dict(), tmp_path / "m.pt")
    base = ["--model", str(tmp_path / "m.pt"), "--data", str(site), "--out", str(tmp_path / "p.csv")]
    assert predict_main(base) == 2  # no card, no --image-size: never guessed
    assert "give --image-size" in capsys.readouterr().err
    assert predict_main(base + ["--image-size", "32", "--columns", "race"]) == 2
    assert "no column(s) ['race']" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()
    # weights of another network than the card says: named, exit 2; the card's network is what loads them
    torch.save(build_model("resnet").state_dict(), tmp_path / "r.pt")
    write_card(tmp_path / "r.pt", "cnn", 2, 32)
    wrong = ["--model", str(tmp_path / "r.pt"), "--data", str(site), "--out", str(tmp_path / "p.csv")]
    assert predict_main(wrong) == 2
    assert f"model file {tmp_path / 'r.pt'} does not fit the network 'cnn' (its model card)" in capsys.readouterr().err
    write_card(tmp_path / "r.pt", "resnet", 2, 32)
    assert predict_main(wrong) == 0 and (tmp_path / "p.csv").exists()
