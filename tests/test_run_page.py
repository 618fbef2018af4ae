"""The run page (server/run_page.py): built from small run folders written here with the columns real runs write;
what it shows, what it escapes, what it survives, and (when a Chromium is installed) that a browser renders it."""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from server.run_page import write_run_page

HOSTILE = "<script>alert(1)</script>"
SITES = ("st_aurelia", "valley_rural", HOSTILE)
# the headers an `equifed-simulate --out DIR -c statistics=shift,fairness` run writes (a DP run's per_site.csv)
METRICS = ("round,elapsed_s,holdout_loss,holdout_accuracy,holdout_auroc,holdout_ece,holdout_brier,sites_trained,"
           "train_loss,val_loss,val_auroc,best_metric,best_round,best_value").split(",")
PER_SITE = ("round,phase,site,status,node,train-loss,val-auroc,val-loss,num-examples,rejected,steps,epsilon-before,"
            "epsilon,epsilon-train,epsilon-release,noise-multiplier,noised,withheld,eval-auroc,eval-accuracy,"
            "eval-loss,error").split(",")
SHIFT = ("round,site,status,epsilon,n_labelled,n_holdout,p_covariate,tv_covariate,p_bbsd,tv_bbsd,p_label,"
         "label_shift_l1,mmd2,mmd2_cond,p_intensity,tv_intensity,p_scanner,tv_scanner,shift").split(",")
HOLDOUT_AUROC = {0: 0.6606, 1: 0.5678, 2: 0.7223, 3: 0.9170}


def _write(path: Path, header: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _global(rnd: int) -> dict:
    return {"round": rnd, "elapsed_s": 5.0 * rnd, "holdout_loss": 1.1 - 0.2 * rnd, "holdout_accuracy": 0.7,
            "holdout_auroc": HOLDOUT_AUROC[rnd], "holdout_ece": 0.05, "holdout_brier": 0.2,
            "sites_trained": 3 if rnd else ""}


def _site_rows(rnd: int) -> list[dict]:
    rows = []
    for i, site in enumerate(SITES):
        if site == "valley_rural" and rnd == 3:  # out of budget; its refusal states the budget
            rows.append({"round": rnd, "phase": "train", "site": site, "status": "budget exhausted",
                         "error": f"site {site}: budget exhausted: the site has spent epsilon=7.5; this would take "
                                  "it to 10.2, over the site's max-epsilon=10"})
            continue
        rows.append({"round": rnd, "phase": "train", "site": site, "status": "ok", "node": str(100 + i),
                     "train-loss": 0.7 - 0.05 * rnd, "num-examples": 200 + i, "epsilon": 2.5 * rnd + 0.01 * i,
                     "noised": "num-examples"})
        rows.append({"round": rnd, "phase": "evaluate", "site": site, "status": "ok", "node": str(100 + i),
                     "num-examples": 50, "eval-auroc": 0.6 + 0.1 * rnd + 0.01 * i})
    if rnd == 2:
        rows.append({"round": rnd, "phase": "statistics", "site": "st_aurelia", "status": "no reply", "node": "100"})
    return rows


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """A run folder after round 2 of 3, with the reports a statistics=shift,fairness run writes."""
    out = tmp_path / "run"
    out.mkdir()
    _write(out / "metrics.csv", METRICS, [_global(r) for r in range(3)])
    _write(out / "per_site.csv", PER_SITE, [row for r in (1, 2) for row in _site_rows(r)])
    _write(out / "shift.csv", SHIFT, [{"round": 2, "site": s, "status": "ok", "p_covariate": 0.01 * (i + 1),
                                       "p_label": 0.5, "shift": "covariate" if i else "none"}
                                      for i, s in enumerate(SITES)])
    (out / "fairness_audit.json").write_text(json.dumps(
        {"round": 2, "warnings": [], "verdict": {"significant": False, "text": "no effect <img src=x onerror=1>"}}))
    (out / "fairness_audit.html").write_text("<html></html>")
    _write(out / "rejected.csv", ["image_path", "row", "reason", "site"],
           [{"image_path": "images/<b>x</b>.dcm", "row": 3, "reason": "not a DICOM file", "site": HOSTILE}])
    return out


def test_page_shows_each_round_and_site_and_escapes_what_files_say(run_folder):
    path = write_run_page(run_folder, planned_rounds=3)
    assert path == run_folder / "index.html"
    page = path.read_text()
    assert "running: round 2 of 3 done" in page
    for rnd in range(3):  # each round's holdout figure, in the round table
        assert f"{HOLDOUT_AUROC[rnd]:.3f}" in page
    for site in ("st_aurelia", "valley_rural", "&lt;script&gt;alert(1)&lt;/script&gt;"):
        assert site in page
    assert "<script" not in page and "<img" not in page and "<b>x" not in page  # only as text
    assert "&lt;img src=x onerror=1&gt;" in page and 'href="fairness_audit.html"' in page
    assert "5.02" in page  # the hostile-named site's ledger after round 2 (2.5 x 2 + 0.02)
    assert "no reply" in page and "Rejected files (1)" in page
    assert "~202" in page  # a noised example count is marked as such
    assert '<meta http-equiv="refresh"' in page  # a run still going: the page reloads itself


def test_budget_from_a_refusal_or_from_the_caller(run_folder):
    _write(run_folder / "per_site.csv", PER_SITE, [row for r in (1, 2, 3) for row in _site_rows(r)])
    page = write_run_page(run_folder).read_text()
    assert "budget exhausted" in page and "max-epsilon=10" in page
    assert page.count("<td class=\"num\">10.00</td>") == 1  # valley_rural stated its budget; the others did not
    page = write_run_page(run_folder, budgets={"st_aurelia": 12.5}).read_text()
    assert "<td class=\"num\">12.50</td>" in page


def test_a_deployment_shows_the_sites_own_counts_of_rejected_images(run_folder):
    (run_folder / "rejected.csv").unlink()  # only a simulation gathers the files; a site reports its count
    rows = [{**row, "rejected": 4 if row["site"] == HOSTILE and row["phase"] == "train" else 0}
            for r in (1, 2) for row in _site_rows(r)]
    _write(run_folder / "per_site.csv", PER_SITE, rows)
    page = write_run_page(run_folder).read_text()
    assert "latest training round: &lt;script&gt;alert(1)&lt;/script&gt;: 4." in page


def test_page_after_round_one_with_only_the_metrics(tmp_path):
    _write(tmp_path / "metrics.csv", METRICS, [_global(0), _global(1)])
    page = write_run_page(tmp_path).read_text()
    assert "running: round 1 done" in page and "0.568" in page and "could not" not in page


def test_garbled_and_missing_files_cost_their_section_only(run_folder):
    (run_folder / "per_site.csv").write_bytes(b"round,site\n1,\x00\x00\xff\xfe garbage\n")
    (run_folder / "summary.json").write_text("{not json")
    (run_folder / "fairness_audit.json").write_text("[1, 2]")
    (run_folder / "shift.csv").write_bytes(b"\xff\xfe\x00")
    (run_folder / "rejected.csv").unlink()  # and per_site.csv has no counts of its own: no section
    page = write_run_page(run_folder).read_text()
    assert f"{HOLDOUT_AUROC[2]:.3f}" in page  # metrics.csv still drawn
    for bad in ("summary.json", "fairness"):
        assert f"the run page could not use {bad}" in page
    assert "\x00" not in page and "garbage" in page  # per_site.csv's junk shown as text, control bytes dropped
    assert "Rejected files" not in page
    empty = run_folder / "empty"  # a run folder before round 0 is recorded
    empty.mkdir()
    assert "No round has finished yet" in write_run_page(empty).read_text()


def test_rewritten_when_a_round_is_added_and_never_half_written(run_folder):
    path = write_run_page(run_folder)
    before = path.read_text()
    assert f"{HOLDOUT_AUROC[3]:.3f}" not in before
    _write(run_folder / "metrics.csv", METRICS, [_global(r) for r in range(4)])
    with open(path, encoding="utf-8") as reader:  # a reader of the old page keeps the whole old page
        after = write_run_page(run_folder).read_text()
        assert reader.read() == before
    assert after != before and f"{HOLDOUT_AUROC[3]:.3f}" in after and "running: round 3" in after
    assert sorted(p.name for p in run_folder.iterdir() if p.name.startswith(".")) == []  # no temp file left
    summary = {"status": "completed", "rounds": 2, "warnings": ["worse <than> before"], "notes": [],
               "analysis_failures": []}
    (run_folder / "summary.json").write_text(json.dumps(summary))  # a finished run's, now resumed to round 3
    resumed = write_run_page(run_folder).read_text()
    assert "running: round 3" in resumed and "worse" not in resumed and "http-equiv" in resumed
    (run_folder / "summary.json").write_text(json.dumps({**summary, "rounds": 3}))
    final = write_run_page(run_folder).read_text()
    assert "completed, 3 round(s)" in final and "worse &lt;than&gt; before" in final and "http-equiv" not in final


def _browser() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                None)


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium on PATH (Debian: apt-get install chromium)")
def test_a_browser_renders_the_page(run_folder, tmp_path):
    page = write_run_page(run_folder).resolve()
    shot = tmp_path / "page.png"
    flags = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--window-size=1200,1800", f"--user-data-dir={tmp_path / 'profile'}"]
    done = subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=90)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, timeout=90)
    assert dom.returncode == 0
    text = dom.stdout.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "<script" not in text  # parsed as text, not code
    assert text.count("<svg") >= 3  # the learning curves and the epsilon chart


def test_a_failed_run_page_stops_reloading(tmp_path):
    """A run that failed writes no summary.json: the page it leaves must not keep reloading as if the run went on."""
    from server.run_page import write_run_page

    going = write_run_page(tmp_path, planned_rounds=3).read_text()
    assert 'http-equiv="refresh"' in going
    ended = write_run_page(tmp_path, planned_rounds=3, warnings=["the run did not complete"], finished=True).read_text()
    assert 'http-equiv="refresh"' not in ended and "the run did not complete" in ended
