"""A crafted model or broadcast that makes ONE sample's gradient non-finite must not turn DP-SGD into an exact
membership test.

The server writes the round-0 model and every config value. If only a target patient's per-sample gradient is
inf or NaN, Opacus' clip factor `C / (norm + 1e-6)` is NaN for that sample and the NaN goes through the sum and
the noise into the weights: "the model came back NaN" = "the patient is at this site". Each test below plays the
attack through the real handler `client.app.train` with and without the target patient (fresh site copies, 4
trials each) and checks that what the server sees is the same: finite weights (client.dp.NonfiniteGuard), or
the same refusal (the broadcast's values are checked, fairness/mitigation/strata.py).
"""

import logging
import math
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch import nn

from client.app import SiteError, train
from client.dp import DPPlan, DPSettings, PatientData, train_dp
from client.ledger import PrivacyLedger
from client.shift_stats import rff_features, rff_map
from client.site import open_site
from core_models.networks import build_model
from fairness.mitigation import ConsortiumStrata, DensityRatio, consortium_strata
from simulations.generator import FAIRNESS_RUN_CONFIG, generate_consortium

RUN_CONFIG = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
RUN_CONFIG = {**RUN_CONFIG, **FAIRNESS_RUN_CONFIG, "model": "cnn"}

SCENARIO = """
name = "nonfinite"
seed = 11
image_size = 32
[defaults]
n = 60
[[sites]]
name = "alpha"
"""
TRIALS = 4
# a logical batch above any noised patient count: q = 1, every patient (the target too) in each of the 2 steps, in
# physical chunks of 16 (BatchMemoryManager); it also keeps the noise calibration cheap (q = 1 has a closed form)
EVERY_PATIENT = {"local-epochs": 2, "batch-size": 128, "physical-batch-size": 16}
FLOAT_MAX = 3.4e38  # float32's largest finite value is 3.4028e38

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    out = tmp_path_factory.mktemp("nonfinite")
    (out / "s.toml").write_text(SCENARIO)
    return generate_consortium(out / "s.toml", out / "data")[0]


def _copy(pristine, dest: Path, drop: str | None = None) -> Path:
    """A fresh copy of the site (its own ledger), without patient `drop` when given."""
    shutil.copytree(pristine, dest, ignore=shutil.ignore_patterns(".equifed"))
    if drop is not None:
        manifest = pd.read_csv(dest / "manifest.csv", dtype=str)
        (dest / manifest.loc[manifest["patient_id"] == drop, "image_path"].iloc[0]).unlink()
        manifest[manifest["patient_id"] != drop].to_csv(dest / "manifest.csv", index=False)
    return dest


def _context(site: Path, **overrides) -> Context:
    run_config = {**RUN_CONFIG, "image-size": 32, "num-server-rounds": 3, "dp": True, **overrides}
    return Context(run_id=1, node_id=7, node_config={"data-path": str(site), "site": "alpha"}, state=RecordDict(),
                   run_config=run_config)


def _message(model: nn.Module, **config) -> Message:
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({"server-round": 1, **config})})
    return Message(content=content, dst_node_id=7, message_type="train")


def _observe(msg: Message, ctx: Context) -> tuple:
    """What the server learns from one train task: the error it got, or whether the weights it got are finite."""
    try:
        reply = train(msg, ctx)
    except SiteError as err:
        return ("error", str(err))
    if reply.has_error():
        return ("refused", reply.error.code)
    weights = reply.content["arrays"].to_torch_state_dict()
    return ("weights", all(bool(torch.isfinite(v).all()) for v in weights.values()))


def _trials(pristine, tmp_path, target: str, msg: Message, **overrides) -> tuple[list, list]:
    seen = {True: [], False: []}
    for present in (True, False):
        for i in range(TRIALS):
            site = _copy(pristine, tmp_path / f"{'with' if present else 'without'}{i}",
                         drop=None if present else target)
            seen[present].append(_observe(msg, _context(site, **overrides)))
    return seen[True], seen[False]


def _loaded(pristine):
    site = open_site(pristine, image_size=32, seed=int(RUN_CONFIG["seed"]))
    return site.data.images, site.data.frame.assign(split=site.split.to_numpy())


# ------------------------------------------------------------------------------------ 1. a crafted model


def _last_block_preactivation(model, images: np.ndarray) -> torch.Tensor:
    """(N, C) max over positions of the last block's GroupNorm output: ReLU and the max-pools then give the
    pooled feature relu(that), so scaling the channel's GroupNorm affine by k and shifting its bias by d maps a
    sample's pooled feature to relu(k * m + d)."""
    got = []
    hook = model.features.block4[1].register_forward_hook(lambda _m, _i, out: got.append(out.amax((2, 3))))
    with torch.no_grad():
        model.eval()(torch.as_tensor(images, dtype=torch.float32))
    hook.remove()
    return got[0]


def crafted_membership_model(images: np.ndarray, frame: pd.DataFrame) -> tuple[nn.Module, str]:
    """All weights finite: one GroupNorm channel of the last block rescaled so that its pooled feature is 30 on a
    target training image and at most 3 on every other image of the site (any split), and
    `head.weight[1, c] = 3.4e38 / 10`, so logit 1 overflows to +inf on the target alone. Returns (model, target)."""
    torch.manual_seed(0)
    model = build_model("cnn")
    m = _last_block_preactivation(model, images)
    train_rows = np.flatnonzero(frame["split"].to_numpy() == "train")
    top2 = m.topk(2, dim=0)
    margin = (top2.values[0] - top2.values[1]) / (m.std(0) + 1e-6)
    is_train = torch.as_tensor(np.isin(top2.indices[0].numpy(), train_rows))
    c = int(torch.where(is_train, margin, torch.full_like(margin, -1.0)).argmax())
    t = int(top2.indices[0, c])
    assert t in train_rows
    hi, lo = float(top2.values[0, c]), float(top2.values[1, c])
    k = 27.0 / (hi - lo)
    d = 3.0 - k * lo
    norm = model.features.block4[1]
    with torch.no_grad():
        norm.weight[c] *= k
        norm.bias[c] = norm.bias[c] * k + d
        model.head.weight[1, c] = FLOAT_MAX / 10
        logits = model.eval()(torch.as_tensor(images, dtype=torch.float32))
    overflow = ~torch.isfinite(logits).all(1)
    assert overflow.nonzero().ravel().tolist() == [t]  # the crafted model overflows on the target alone
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return model, str(frame["patient_id"].iloc[t])


def test_crafted_model_overflowing_on_one_patient_is_no_membership_test(pristine, tmp_path):
    model, target = crafted_membership_model(*_loaded(pristine))
    with_target, without = _trials(pristine, tmp_path, target, _message(model), freeze="encoder", **EVERY_PATIENT)
    assert with_target == without == [("weights", True)] * TRIALS, (with_target, without)


# ------------------------------------------------------------------------------------ 2. a NaN in the broadcast


def _fenced_target(frame: pd.DataFrame) -> pd.Series:
    """A reference-group training patient whose age no other patient of the site shares."""
    ages = frame["age"].value_counts()
    pick = frame[(frame["split"] == "train") & (frame["group"].astype(int) == 0)
                 & frame["age"].map(ages).eq(1) & frame["scanner_legacy"].isin([0, 1])]
    assert len(pick), "the scenario has no training patient of group 0 with a unique age"
    return pick.iloc[0]


def _broadcast(n_s: int, n_c: int, nan_cell: int | None = None) -> dict:
    """An honest-looking consortium broadcast for n_s mediator levels x n_c covariate bins (from made-up counts),
    with one ratio cell NaN if asked."""
    counts = np.random.default_rng(0).uniform(5.0, 40.0, (2, n_s * n_c * 2))  # (A, stratum = cell * 2 + D)
    config = consortium_strata([counts.ravel()], [counts.ravel() * 0.4], tuple(range(n_c - 1)), n_s).to_config()
    config["fair-pse"] = 0.2
    if nan_cell is not None:
        config["fair-ratio"][nan_cell] = math.nan
    return config


def test_nan_in_a_broadcast_cell_fenced_around_one_patient_is_refused_alike(pristine, tmp_path):
    _, frame = _loaded(pristine)
    target = _fenced_target(frame)
    age = float(target["age"])
    edges = (age - 0.5, age + 0.5)  # the middle covariate bin holds the target's age alone
    n_c = len(edges) + 1
    cell = int(target["scanner_legacy"]) * n_c + 1  # (S level, C bin) of the target
    config = _broadcast(2, n_c, nan_cell=cell)
    fair = {"fair-lambda": 5.0, "fair-covariate": "age", "fair-covariate-edges": ",".join(f"{e:g}" for e in edges)}
    with_target, without = _trials(pristine, tmp_path, str(target["patient_id"]),
                                   _message(build_model("cnn"), **config), freeze="encoder", **EVERY_PATIENT, **fair)
    assert with_target == without, (with_target, without)
    assert with_target[0][0] == "error" and "ValueError" in with_target[0][1]  # refused, whatever the data
    log = (tmp_path / "with0" / ".equifed" / "client_errors.log").read_text()
    assert "fair-ratio" in log  # the site's own log names the broadcast key


def test_broadcast_values_are_checked_without_any_data():
    n_s, edges = 2, (40.0, 60.0)
    good = _broadcast(n_s, len(edges) + 1)
    assert ConsortiumStrata.from_config(good, n_s, edges).w.shape == (12,)
    assert DensityRatio.from_config(good, n_s, edges).ratio.shape == (6,)
    bad = {
        "fair-ratio": [[math.nan] + good["fair-ratio"][1:], [-1.0] + good["fair-ratio"][1:],
                       good["fair-ratio"][:-1], [math.inf] + good["fair-ratio"][1:]],
        "fair-p0": [math.nan, 0.0, 1.0, -0.5, 1e-9],
        "fair-stratum-w": [[math.inf] + good["fair-stratum-w"][1:], [1e7] + good["fair-stratum-w"][1:],
                           good["fair-stratum-w"] + [0.0]],
        "fair-stratum-n": [[-1.0] + good["fair-stratum-n"][1:], [math.nan] + good["fair-stratum-n"][1:]],
        "fair-n-total": [math.nan, -3.0, math.inf],
        "fair-pse": [math.nan, math.inf, 1e9],
        "fair-stratum-mean": [[1.5] + good["fair-stratum-mean"][1:], [math.nan] + good["fair-stratum-mean"][1:]],
        "fair-pool-groups": ["yes", 0.5],
    }
    for key, values in bad.items():
        for value in values:
            with pytest.raises(ValueError, match=key):
                ConsortiumStrata.from_config({**good, key: value}, n_s, edges)
    with pytest.raises(ValueError, match="fair-stratum-mean"):
        ConsortiumStrata.from_config({k: v for k, v in good.items() if k != "fair-stratum-mean"}, n_s, edges)
    with pytest.raises(ValueError, match="fair-covariate-edges"):
        ConsortiumStrata.from_config(good, n_s, (60.0, 40.0))
    with pytest.raises(ValueError, match="fair-ratio"):  # the run's layout fixes the lengths: 3 levels, not 2
        ConsortiumStrata.from_config(good, 3, edges)


# ------------------------------------------------------------------------------------ 3. the guard itself


class _OverflowOnOne(nn.Module):
    """Finite weights; logit 1 overflows to +inf on the one image whose first pixel is 20 (the others are 0.1)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.weight[1, 0] = FLOAT_MAX / 10
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(x.flatten(1))


def test_train_dp_zeroes_a_nonfinite_sample_and_counts_it(tmp_path, caplog):
    n = 10
    x = np.full((n, 1, 2, 2), 0.1, np.float32)
    x[3, 0, 0, 0] = 20.0  # logit 1 = 3.4e37 x 20: +inf on this sample alone
    y = np.zeros(n, np.int64)
    model = _OverflowOnOne()
    assert (~torch.isfinite(model(torch.as_tensor(x))).all(1)).nonzero().ravel().tolist() == [3]
    plan = DPPlan(noise_multiplier=1.0, sample_rate=1.0, steps_per_round=1, expected_batch_size=float(n))
    ledger = PrivacyLedger.open(tmp_path, delta=1e-5, fingerprint="toy")
    with caplog.at_level(logging.WARNING, logger="client.dp"):
        stats = train_dp(model, PatientData(x, y), plan, ledger,  # 3 physical chunks
                         DPSettings(max_grad_norm=1.0, physical_batch_size=4, optimizer="sgd", lr=0.1))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert stats["nonfinite_samples"] == 1
    assert not math.isfinite(stats["train_loss"])  # withheld from replies; never raised on
    assert any("non-finite" in r.getMessage() and r.name == "client.dp" for r in caplog.records)
    # empty Poisson draws: nothing to check, nothing counted
    empty = DPPlan(noise_multiplier=1.0, sample_rate=1e-9, steps_per_round=2, expected_batch_size=1.0)
    stats = train_dp(_OverflowOnOne(), PatientData(x, y), empty, ledger,
                     DPSettings(max_grad_norm=1.0, physical_batch_size=4))
    assert stats["nonfinite_samples"] == 0


def test_guard_changes_nothing_when_every_gradient_is_finite(tmp_path, monkeypatch):
    import client.dp

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(24, 1, 2, 2)).astype(np.float32), rng.integers(0, 2, 24)
    plan = DPPlan(noise_multiplier=1.0, sample_rate=0.5, steps_per_round=4, expected_batch_size=12.0)

    def trained(name):
        torch.manual_seed(0)
        model = _OverflowOnOne()
        nn.init.normal_(model.head.weight)  # an ordinary model this time
        ledger = PrivacyLedger.open(_dir(tmp_path / name), delta=1e-5, fingerprint="t")
        stats = train_dp(model, PatientData(x, y), plan, ledger, DPSettings(max_grad_norm=1.0, physical_batch_size=5),
                         sampling_rng=np.random.default_rng(1), noise_generator=torch.Generator().manual_seed(2))
        return [p.detach().clone() for p in model.parameters()], stats

    guarded, stats = trained("guarded")
    assert stats["nonfinite_samples"] == 0
    monkeypatch.setattr(client.dp, "NonfiniteGuard", _NoGuard)
    plain, _ = trained("plain")
    assert all(torch.equal(a, b) for a, b in zip(guarded, plain))  # bit for bit


class _NoGuard:
    def __init__(self, optimizer):
        self.count = 0


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_guard_zeroes_the_sample_in_every_parameter_also_when_accumulated():
    from opacus.optimizers import DPOptimizer

    from client.dp import NonfiniteGuard

    w, b = nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(3))
    opt = DPOptimizer(torch.optim.SGD([w, b], lr=1.0), noise_multiplier=0.0, max_grad_norm=100.0,
                      expected_batch_size=5)
    guard = NonfiniteGuard(opt)
    # physical chunk 1: two backward passes accumulated (grad_sample a list); sample 0 of the first pass has
    # -inf in b only, sample 2 of the second pass NaN in w only
    w.grad_sample = [torch.ones(2, 3, 2), torch.ones(3, 3, 2)]
    b.grad_sample = [torch.ones(2, 3), torch.ones(3, 3)]
    w.grad_sample[1][2, 0, 1] = math.nan
    b.grad_sample[0][0, 1] = -math.inf
    opt.clip_and_accumulate()
    assert guard.count == 2
    for g in (w.grad_sample, b.grad_sample):  # zero in EVERY parameter, the others untouched
        assert float(g[0][0].abs().sum()) == 0.0 and float(g[1][2].abs().sum()) == 0.0
        assert bool((g[0][1] == 1).all()) and bool((g[1][:2] == 1).all())
    assert torch.equal(w.summed_grad, torch.full((3, 2), 3.0)) and torch.equal(b.summed_grad, torch.full((3,), 3.0))
    # physical chunk 2 of the same logical batch: finite, added to the sum as Opacus does
    opt._is_last_step_skipped = True  # what BatchMemoryManager's skipped step sets: zero_grad keeps summed_grad
    opt.zero_grad()
    w.grad_sample, b.grad_sample = torch.ones(2, 3, 2), torch.ones(2, 3)
    opt.clip_and_accumulate()
    assert guard.count == 2
    assert torch.equal(w.summed_grad, torch.full((3, 2), 5.0)) and torch.equal(b.summed_grad, torch.full((3,), 5.0))
    # an empty chunk: nothing to check
    opt.zero_grad()
    w.grad_sample, b.grad_sample = torch.ones(0, 3, 2), torch.ones(0, 3)
    opt.clip_and_accumulate()
    assert guard.count == 2 and torch.equal(b.summed_grad, torch.full((3,), 5.0))


# ------------------------------------------------------------------------------------ 4. the shift statistics


def test_rff_rows_with_nonfinite_random_features_become_the_zero_vectors():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 8))
    with np.errstate(all="ignore"):
        freqs = rff_map(0, 8, 16, 1e-320)  # a crafted bandwidth: infinite frequencies
    out = rff_features(feats, freqs, clip=20.0)
    zero = np.concatenate([np.ones(8), np.zeros(8)]) / np.sqrt(8)
    assert np.isfinite(out).all() and np.allclose(out, zero)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0)
    fine = rff_features(feats, rff_map(0, 8, 16, 0.5), clip=20.0)  # an honest map is unchanged
    assert np.isfinite(fine).all() and not np.allclose(fine, zero)
