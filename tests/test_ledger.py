"""The privacy ledger: Opacus' own epsilon, never reset, survives restarts, refuses
corruption and over-budget charges, counts exactly the noised optimizer steps."""

import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as privacy_analysis
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.cli import main as cli_main
from client.ledger import (
    BudgetExhausted,
    LedgerError,
    PrivacyLedger,
    dataset_fingerprint,
    ledger_path,
)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]


def _site(tmp_path: Path, name: str = "site", n_images: int = 3) -> Path:
    site = tmp_path / name
    (site / "img").mkdir(parents=True)
    rows = ["patient_id,image_path,label"]
    for i in range(n_images):
        (site / "img" / f"{i}.dcm").write_bytes(bytes(range(i, i + 64)))
        rows.append(f"p{i},img/{i}.dcm,{i % 2}")
    (site / "manifest.csv").write_text("\n".join(rows) + "\n")
    return site


def _opacus_eps(history, delta=1e-5) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta)


def _run(code: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


# --------------------------------------------------------------------------- accounting


def test_epsilon_is_opacus_rdp_of_the_whole_history(tmp_path):
    ledger = PrivacyLedger.open(_site(tmp_path), delta=1e-5, fingerprint="fp")
    assert ledger.epsilon() == 0.0
    for _ in range(20):  # round 1 step by step, as the optimizer hook does
        ledger.charge(1.1, 0.05, round=1)
    ledger.release(np.zeros(4), sensitivity=1.0, noise_multiplier=10.0, label="labels", round=1)
    ledger.charge(1.1, 0.05, steps=20, round=2)
    ledger.charge(0.9, 0.08, steps=15, round=3)  # another run, another plan
    ledger.release(np.zeros(4), sensitivity=2.0, noise_multiplier=8.0, label="bbsd", round=3)

    expected = [(1.1, 0.05, 20), (10.0, 1.0, 1), (1.1, 0.05, 20), (0.9, 0.08, 15), (8.0, 1.0, 1)]
    assert ledger.history == expected
    assert [e["steps"] for e in ledger.entries] == [20, 1, 20, 15, 1]  # one entry per round, not per step
    for delta in (1e-5, 1e-7):
        eps = ledger.epsilon(delta)
        assert eps == pytest.approx(_opacus_eps(expected, delta), rel=1e-12)
        orders = RDPAccountant.DEFAULT_ALPHAS
        rdp = sum(privacy_analysis.compute_rdp(q=q, noise_multiplier=s, steps=k, orders=orders) for s, q, k in expected)
        direct, _ = privacy_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
        assert eps == pytest.approx(direct, rel=1e-12)
    assert ledger.epsilon(1e-7) > ledger.epsilon(1e-5)
    after = [e["epsilon_after"] for e in ledger.entries]
    assert after == sorted(after) and after[-1] == ledger.epsilon()

    s = ledger.summary()
    assert s["epsilon"] == ledger.epsilon()
    assert s["epsilon_train"] == pytest.approx(_opacus_eps([(1.1, 0.05, 40), (0.9, 0.08, 15)]), rel=1e-12)
    assert s["epsilon_release"] == pytest.approx(_opacus_eps([(10.0, 1.0, 1), (8.0, 1.0, 1)]), rel=1e-12)
    assert s["epsilon"] < s["epsilon_train"] + s["epsilon_release"]  # RDP: parts do not add up
    assert s["train_steps"] == 55 and s["releases"] == 2 and s["n_entries"] == 5


def test_epsilon_grows_across_process_restarts(tmp_path):
    site = _site(tmp_path)
    charge = (
        "import sys; from client.ledger import PrivacyLedger\n"
        "l = PrivacyLedger.open(sys.argv[1], fingerprint='fp')\n"
        "before = l.epsilon()\n"
        "for _ in range(int(sys.argv[2])): l.charge(1.0, 0.04, round=int(sys.argv[3]))\n"
        "print(before, l.epsilon())\n"
    )
    before1, eps1 = map(float, _run(charge, str(site), "10", "1").split())
    assert before1 == 0.0 and eps1 == pytest.approx(_opacus_eps([(1.0, 0.04, 10)]), rel=1e-12)

    ledger = PrivacyLedger.open(site, fingerprint="fp")  # this process, after the other exited
    assert ledger.epsilon() == eps1
    eps2 = ledger.charge(1.0, 0.04, steps=10, round=2)
    assert eps2 > eps1

    # two more processes at once (rounds 3 and 4): both continue the history, no step is lost
    procs = [subprocess.Popen([sys.executable, "-c", charge, str(site), "30", str(r)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE) for r in (3, 4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    for out in outs:
        before, after = map(float, out.split())
        assert eps2 <= before < after
    assert sum(h[2] for h in ledger.history) == 80
    assert ledger.epsilon() == pytest.approx(_opacus_eps([(1.0, 0.04, 80)]), rel=1e-12)
    assert ledger.epsilon() > max(float(o.split()[1]) for o in outs) - 1e-12
    assert sorted({e["round"] for e in ledger.entries}) == [1, 2, 3, 4]


def test_two_open_ledgers_on_one_file_lose_no_step(tmp_path):
    """Every charge re-reads the file under the lock, so a stale object cannot overwrite."""
    site = _site(tmp_path)
    a = PrivacyLedger.open(site, fingerprint="fp")
    b = PrivacyLedger.open(site, fingerprint="fp")
    for _ in range(5):
        a.charge(1.0, 0.04, round=1)
        b.charge(1.0, 0.04, round=2)
    assert a.history == b.history == [(1.0, 0.04, 10)]
    assert len(a.entries) == 10  # alternating rounds: nothing to merge


# --------------------------------------------------------------------------- corruption


def _truncate(text: str) -> str:
    return text[: len(text) // 2]


def _edit_number(text: str) -> str:
    doc = json.loads(text)
    ds = doc["datasets"]["fp"]
    ds["history"][0][2] = 1  # someone "forgets" most of the steps, consistently
    ds["entries"][0]["steps"] = 1
    return json.dumps(doc, indent=1)


def _wrong_version(text: str) -> str:
    return text.replace('"version": 1', '"version": 2')


@pytest.mark.parametrize("corrupt", [_truncate, _edit_number, _wrong_version])
def test_corrupted_ledger_stops_training_and_is_kept(tmp_path, corrupt):
    site = _site(tmp_path)
    ledger = PrivacyLedger.open(site, fingerprint="fp")
    ledger.charge(1.0, 0.05, steps=50)
    path = ledger_path(site)
    bad = corrupt(path.read_text())
    assert bad != path.read_text()
    path.write_text(bad)
    raw = path.read_bytes()

    with pytest.raises(LedgerError, match="privacy ledger .* is corrupted") as err:
        PrivacyLedger.open(site, fingerprint="fp")
    assert str(path) in str(err.value) and "backup" in str(err.value)
    with pytest.raises(LedgerError):
        ledger.charge(1.0, 0.05)  # an already open ledger cannot charge either
    with pytest.raises(LedgerError):
        ledger.epsilon()
    with pytest.raises(LedgerError):
        ledger.release([1.0], 1.0, 5.0, "x")
    assert path.read_bytes() == raw  # never overwritten, never reset


def test_a_ledger_deleted_during_training_is_not_recreated(tmp_path):
    site = _site(tmp_path)
    ledger = PrivacyLedger.open(site, fingerprint="fp")
    ledger.charge(1.0, 0.05, steps=5)
    ledger_path(site).unlink()
    with pytest.raises(LedgerError, match="missing, but its witness"):
        ledger.charge(1.0, 0.05)
    assert not ledger_path(site).exists()


# --------------------------------------------------------------------------- budget


def test_budget_refuses_charges_and_releases_without_writing(tmp_path):
    site = _site(tmp_path)
    ledger = PrivacyLedger.open(site, fingerprint="fp", max_epsilon=2.0)
    round_ = (1.2, 0.05, 25)
    projected = ledger.projected_epsilon([round_])
    ledger.check_budget([round_])
    assert ledger.charge(*round_) == projected  # projection is exactly what the charge costs
    assert ledger.projected_epsilon([round_, round_]) == pytest.approx(_opacus_eps([(1.2, 0.05, 75)]), rel=1e-12)

    path = ledger_path(site)
    raw = path.read_bytes()
    spent = ledger.epsilon()
    too_much = (1.2, 0.05, 400)
    assert ledger.projected_epsilon([too_much]) > 2.0
    with pytest.raises(BudgetExhausted, match=r"max-epsilon=2") as err:
        ledger.check_budget([too_much])
    assert f"{spent:.4f}" in str(err.value)
    with pytest.raises(BudgetExhausted):
        ledger.charge(*too_much)
    with pytest.raises(BudgetExhausted):
        ledger.release(np.ones(3), sensitivity=1.0, noise_multiplier=0.5, label="too revealing")
    assert path.read_bytes() == raw and ledger.epsilon() == spent

    # the same file under a more generous site budget goes on from where it was
    generous = PrivacyLedger.open(site, fingerprint="fp", max_epsilon=100.0)
    assert generous.epsilon() == spent
    assert generous.charge(*too_much) > 2.0


# --------------------------------------------------------------------------- release


def test_release_adds_calibrated_noise_and_charges_q1(tmp_path):
    ledger = PrivacyLedger.open(_site(tmp_path), fingerprint="fp")
    before = ledger.epsilon()
    value = np.full((100, 200), 7, dtype=np.int64)
    out = ledger.release(value, sensitivity=1.5, noise_multiplier=2.0, label="intensity",
                         rng=np.random.default_rng(0))
    assert out.shape == value.shape and out.dtype == np.float64
    noise = out - value
    assert noise.std() == pytest.approx(3.0, rel=0.03)
    assert abs(noise.mean()) < 0.05
    assert ledger.history[-1] == (2.0, 1.0, 1)
    assert ledger.entries[-1]["kind"] == "release" and ledger.entries[-1]["label"] == "intensity"
    assert ledger.epsilon() > before
    assert ledger.epsilon() == pytest.approx(_opacus_eps([(2.0, 1.0, 1)]), rel=1e-12)


def test_five_label_histograms_move_epsilon_as_accounted(tmp_path):
    """5 rounds 4.90 -> 7.99; five histograms at noise std 10 on top -> 8.06.

    The history is a plan that spends 8 over 5 rounds (n=270, batch 16, 1 local epoch)."""
    q, steps = 16 / 270, math.ceil(270 / 16)
    sigma = get_noise_multiplier(target_epsilon=8, target_delta=1e-5, sample_rate=q, steps=5 * steps,
                                 accountant="rdp")
    ledger = PrivacyLedger.open(_site(tmp_path), fingerprint="fp")
    eps = [ledger.charge(sigma, q, steps=steps, round=r) for r in range(1, 6)]
    assert eps[0] == pytest.approx(4.90, abs=0.03) and eps[-1] == pytest.approx(7.99, abs=0.02)
    for k in range(5):
        ledger.release(np.zeros(2), sensitivity=1.0, noise_multiplier=10.0, label=f"labels-{k}", round=5)
    assert ledger.epsilon() == pytest.approx(8.06, abs=0.01)
    assert ledger.epsilon() == pytest.approx(_opacus_eps([(sigma, q, 5 * steps), (10.0, 1.0, 5)]), rel=1e-12)


# --------------------------------------------------------------------------- optimizer hook


def _train(ledger, sigma, physical: int | None, epochs=2, n=256, batch=64, updates=None):
    torch.manual_seed(0)
    x, y = torch.randn(n, 6), torch.randint(0, 2, (n,))
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(x, y), batch_size=batch),
        noise_multiplier=sigma, max_grad_norm=1.0, poisson_sampling=True,
    )
    opt.attach_step_hook(_chain(opt.step_hook, ledger.optimizer_hook(sigma, batch / n, round=1)))
    updates = [0] if updates is None else updates
    real_step = opt.original_optimizer.step

    def counted_step(*a, **k):
        updates[0] += 1
        return real_step(*a, **k)

    opt.original_optimizer.step = counted_step
    calls = 0
    for _ in range(epochs):
        manager = (nullcontext(loader) if physical is None else
                   BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=opt))
        with manager as batches:
            for xb, yb in batches:
                nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
                opt.zero_grad()
                calls += 1
    return engine, updates[0], calls


def _chain(*hooks):
    def hook(optimizer):
        for h in hooks:
            h(optimizer)

    return hook


def test_optimizer_hook_counts_every_noised_step_and_only_those(tmp_path):
    sigma, q = 1.3, 64 / 256
    results = {}
    for physical in (None, 64, 16):
        site = tmp_path / f"p{physical}"
        site.mkdir()
        ledger = PrivacyLedger.open(site, fingerprint="fp")
        engine, updates, calls = _train(ledger, sigma, physical)
        ledger_steps = sum(h[2] for h in ledger.history)
        assert ledger.history == [(sigma, q, ledger_steps)]
        assert ledger_steps == updates == sum(h[2] for h in engine.accountant.history)
        assert [tuple(h) for h in engine.accountant.history] == ledger.history
        assert ledger.epsilon() == pytest.approx(engine.accountant.get_epsilon(1e-5), rel=1e-12)
        results[physical] = (ledger_steps, calls)
    assert results[None][0] == 2 * 4  # 2 epochs of 1/q Poisson batches
    assert results[None][1] == 8
    # Poisson batches vary in size: physical 64 splits the ones above 64, physical 16 most of them;
    # the skipped physical steps are not charged
    assert results[64][0] == results[16][0] == 8
    assert results[16][1] > results[64][1] >= 8


def test_optimizer_hook_refuses_over_budget_before_the_update(tmp_path):
    sigma, q = 1.3, 0.25
    budget = (_opacus_eps([(sigma, q, 3)]) + _opacus_eps([(sigma, q, 4)])) / 2
    ledger = PrivacyLedger.open(_site(tmp_path), fingerprint="fp", max_epsilon=budget)
    updates = [0]
    with pytest.raises(BudgetExhausted):
        _train(ledger, sigma, physical=16, updates=updates)
    assert ledger.history == [(sigma, q, 3)]
    assert updates[0] == 3  # the 4th noised gradient never reached the weights


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_follows_patients_and_image_bytes_and_the_budget_keeps_old_histories(tmp_path):
    site = _site(tmp_path)
    old = 1_600_000_000_000_000_000
    for f in (site / "img").iterdir():
        os.utime(f, ns=(old, old))  # old files: their digests get cached
    fp1 = dataset_fingerprint(site)
    cache = json.loads((site / ".equifed" / "fingerprint_cache.json").read_text())
    assert sorted(Path(k).name for k in cache) == ["0.dcm", "1.dcm", "2.dcm"]
    assert dataset_fingerprint(site) == fp1
    assert dataset_fingerprint(site) == fp1  # from the cache

    ledger = PrivacyLedger.open(site, max_epsilon=50)
    assert ledger.fingerprint == fp1
    eps_old = ledger.charge(1.0, 0.1, steps=30, round=1)

    image = site / "img" / "1.dcm"
    original = image.read_bytes()
    image.write_bytes(original[:10] + bytes([original[10] ^ 1]) + original[11:])  # one bit, same size
    fp2 = dataset_fingerprint(site)
    assert fp2 != fp1
    image.write_bytes(original)
    assert dataset_fingerprint(site) == fp1
    (site / "manifest.csv").write_text((site / "manifest.csv").read_text() + "p9,img/9.dcm,1\n")
    fp3 = dataset_fingerprint(site)  # a patient more (whose file is missing)
    assert fp3 not in (fp1, fp2)

    changed = PrivacyLedger.open(site, max_epsilon=50)
    assert changed.fingerprint == fp3 and changed.dataset_epsilon() == 0.0 and changed.entries == []
    assert changed.epsilon() == eps_old  # the site's budget composes every history
    s = changed.summary()
    assert s["other_fingerprints"][fp1]["epsilon"] == eps_old
    changed.charge(1.0, 0.1, steps=10)
    assert changed.epsilon() == pytest.approx(_opacus_eps([(1.0, 0.1, 40)]), rel=1e-12)
    assert changed.summary()["epsilon_all_fingerprints"] == changed.epsilon()
    doc = json.loads(ledger_path(site).read_text())
    assert set(doc["datasets"]) == {fp1, fp3}
    assert doc["datasets"][fp1]["history"] == [[1.0, 0.1, 30]]
    assert ledger.dataset_epsilon() == eps_old  # the old dataset's history is kept as it was


# --------------------------------------------------------------------------- CLI


def test_cli_ledger_prints_epsilon_history_and_exit_codes(tmp_path, capsys):
    site = _site(tmp_path)
    assert cli_main(["ledger", "--data", str(site)]) == 2
    assert "no privacy ledger" in capsys.readouterr().err
    assert not ledger_path(site).exists()  # looking does not create one

    ledger = PrivacyLedger.open(site, fingerprint="fp")
    ledger.charge(1.1, 0.05, steps=40, round=1, run_id="run-7")
    ledger.release(np.zeros(3), 1.0, 10.0, label="label-counts", round=1)
    assert cli_main(["ledger", "--data", str(site)]) == 0
    out = capsys.readouterr().out
    assert f"epsilon = {ledger.epsilon():.4f} at delta = 1e-05" in out
    assert "label-counts" in out and "run-7" in out and " 40 " in out

    assert cli_main(["ledger", "--data", str(site), "--json", "--delta", "1e-7"]) == 0
    report = json.loads(capsys.readouterr().out)
    (ds,) = report["datasets"]
    assert ds["epsilon"] == ledger.epsilon(1e-7)
    assert [e["epsilon_after"] for e in ds["entries"]] == pytest.approx(
        [_opacus_eps([(1.1, 0.05, 40)], 1e-7), ledger.epsilon(1e-7)], rel=1e-12)

    proc = subprocess.run([sys.executable, "-m", "client.cli", "ledger", "--data", str(site)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and f"{ledger.epsilon():.4f}" in proc.stdout

    ledger_path(site).write_text(ledger_path(site).read_text().replace("1.1", "1.7"))
    assert cli_main(["ledger", "--data", str(site)]) == 1
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and str(ledger_path(site)) in err
