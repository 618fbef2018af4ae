"""The path-specific penalty (fairness/mitigation.py): its gradient, its per-sample and per-site decompositions (DP-SGD,
federation), the lambda = 0 no-op, its wiring into the client, and its effect on a marker-shortcut toy, measured
against counterfactual re-renders."""

import importlib.util
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from opacus import GradSampleModule
from torch import nn

from client.app import statistics as statistics_handler
from client.app import train as train_handler
from client.dp import DPSettings, PatientData, plan_dp, train_dp
from client.ledger import PrivacyLedger
from core_models.networks import SmallCNN, build_model
from core_models.training import make_loader, train_epochs
from fairness.mitigation import (
    DensityRatio,
    MediatorOffset,
    PathSpecificPenalty,
    ScoreShiftCorrection,
    StratifiedPathPenalty,
    batch_pse,
    cell_index,
    consortium_pse,
    consortium_strata,
    penalty_term,
    positive_score,
    site_release_vectors,
    stratum_index,
)
from simulations.generator import FAIRNESS_RUN_CONFIG, generate_consortium
from tests.conftest import ONE_ACTOR

ROOT = Path(__file__).resolve().parent.parent
RUN_CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
RUN_CONFIG = {**RUN_CONFIG, **FAIRNESS_RUN_CONFIG}  # the generator's columns, named as a user names theirs
torch.set_num_threads(1)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_mitigation", ROOT / "benchmarks" / "bench_mitigation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# counts (a, s): a0 = 90 modern / 10 legacy, a1 = 10 / 90 -> r(legacy) = 0.9/0.1 = 9, r(modern) = 0.1/0.9 = 1/9,
# E[r | a0] = 0.9/9 + 0.1*9 = 1 (no renormalisation), P(a0) = 0.5
KNOWN = np.array([[90.0, 10.0], [10.0, 90.0]])


def test_density_ratio_and_penalty_gradient_known_answer():
    w = DensityRatio.from_counts(KNOWN, prior=0.0)
    assert w.ratio == pytest.approx([1 / 9, 9.0])
    assert w.p0 == 0.5
    a = np.array([0, 0, 0, 1])
    s = np.array([1, 0, 0, 1])
    h = w.h(a, s)
    assert h == pytest.approx([16.0, -16 / 9, -16 / 9, 0.0])  # (r - 1)/p0 in a0, 0 in a1
    scores = torch.tensor([0.8, 0.3, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    ht = torch.tensor(h)
    assert float(batch_pse(scores.detach(), ht)) == pytest.approx((16 * 0.8 - 16 / 9 * 0.8) / 4)
    lam, running = 3.0, 0.2
    penalty_term(scores, ht, running, lam).backward()
    # d/d score_i = 2 * lam * running * h_i / B: down on the legacy a0 row, up on the modern a0 rows, a1 untouched
    assert scores.grad.numpy() == pytest.approx(2 * lam * running * h / 4)
    assert scores.grad[0] > 0 > scores.grad[1] and scores.grad[3] == 0
    # with the running PSE negative the push reverses
    scores.grad = None
    penalty_term(scores, ht, -0.2, lam).backward()
    assert scores.grad[0] < 0


def test_penalty_gradient_matches_finite_differences_of_lambda_pse_squared():
    torch.manual_seed(0)
    model = nn.Linear(5, 2).double()
    x = torch.randn(12, 5, dtype=torch.float64)
    a = np.array([0, 1] * 6)
    s = np.array([1, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1, 1])
    h = torch.tensor(DensityRatio.from_counts(KNOWN).h(a, s))
    lam = 2.5

    def big_f() -> float:  # lam * PSE(theta)^2 on this batch
        with torch.no_grad():
            return lam * float(batch_pse(positive_score(model(x)), h)) ** 2

    with torch.no_grad():
        pse_now = float(batch_pse(positive_score(model(x)), h))
    model.zero_grad()
    penalty_term(positive_score(model(x)), h, pse_now, lam).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    eps = 1e-6
    for p, g in zip(model.parameters(), grads):
        for idx in [(0, 0), (1, 3)] if p.dim() == 2 else [(0,), (1,)]:
            old = p.data[idx].item()
            p.data[idx] = old + eps
            up = big_f()
            p.data[idx] = old - eps
            down = big_f()
            p.data[idx] = old
            assert g[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-10)
    assert any(float(g.abs().max()) > 1e-4 for g in grads)


def test_federated_penalty_equals_pooled_penalty_two_sites():
    rng = np.random.default_rng(1)
    # two sites with very different A/S mixes (scanner ~ site), scores of a fixed model
    sites = []
    for n, p_a, p_s in [(40, 0.3, (0.05, 0.9)), (60, 0.7, (0.3, 0.6))]:
        a = (rng.random(n) < p_a).astype(float)
        s = (rng.random(n) < np.where(a == 1, p_s[1], p_s[0])).astype(float)
        sites.append((np.stack([a, s, rng.normal(55, 10, n)], 1), rng.normal(size=(n, 4))))
    meta_all = np.concatenate([m for m, _ in sites])
    x_all = np.concatenate([x for _, x in sites])
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    with torch.no_grad():
        scores = [positive_score(model(torch.tensor(x))).numpy() for _, x in sites]
    # the server's table and PSE from the sites' vectors == the pooled fit
    labels = [(rng.random(len(m)) < 0.4).astype(int) for m, _ in sites]
    released = [site_release_vectors(m, sc, y) for (m, _), sc, y in zip(sites, scores, labels)]
    weights, pse = consortium_pse([c for c, _ in released], [t for _, t in released])
    pooled = DensityRatio.fit(meta_all[:, 0], meta_all[:, 1])
    assert weights.ratio == pytest.approx(pooled.ratio)
    assert weights.p0 == pytest.approx(pooled.p0)
    assert pse == pytest.approx(pooled.pse(meta_all[:, 0], meta_all[:, 1], None, np.concatenate(scores)))
    assert abs(pse) > 1e-3

    def grad(meta, x):
        model.zero_grad()
        pen = PathSpecificPenalty(weights, lam=4.0, pse=pse)
        h = torch.tensor(weights.h(meta[:, 0], meta[:, 1]))
        penalty_term(positive_score(model(torch.tensor(x))), h, pen.running, pen.lam).backward()
        return [p.grad.clone() for p in model.parameters()]

    n = [len(m) for m, _ in sites]
    site_grads = [grad(m, x) for m, x in sites]
    fed = [sum(nk / sum(n) * g[i] for nk, g in zip(n, site_grads)) for i in range(2)]  # FedAvg's weighting
    pooled_grad = grad(meta_all, x_all)
    for f, p in zip(fed, pooled_grad):
        assert torch.allclose(f, p, rtol=1e-10, atol=1e-14)
        assert float(p.abs().max()) > 1e-5


def test_stratified_penalty_estimates_the_same_pse_with_less_variance():
    """StratifiedPathPenalty's stratum-weighted means have the per-sample estimator's expectation (the plug-in PSE
    of the pool), exactly when every row is counted, and a much smaller spread than 32-row minibatches."""
    rng = np.random.default_rng(2)
    n = 2000
    a = (rng.random(n) < 0.5).astype(int)
    s = (rng.random(n) < np.where(a == 1, 0.85, 0.1)).astype(int)
    d = (rng.random(n) < np.where(a == 1, 0.45, 0.3)).astype(int)
    x = np.stack([d + rng.normal(0, 0.7, n), s + rng.normal(0, 0.3, n), rng.normal(size=n)], 1)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    with torch.no_grad():
        scores = positive_score(model(torch.tensor(x, dtype=torch.float32))).double().numpy()
    weights = DensityRatio.fit(a, s)
    plug_in = weights.pse(a, s, None, scores)
    assert abs(plug_in) > 0.01
    m0 = a == 0
    cells = cell_index(s[m0], None, (), 2)
    pen = StratifiedPathPenalty(model, x[m0], cells * 2 + d[m0], weights.ratio[cells], lam=1.0, per_cell=64)
    strata = cells * 2 + d[m0]
    exact = sum(w * scores[m0][strata == k].mean() for w, k in zip(pen.stratum_weights, np.unique(strata)))
    assert exact == pytest.approx(plug_in, rel=1e-6)
    assert sum(pen.stratum_weights) == pytest.approx(0.0, abs=1e-9)  # E[r | a0] = 1
    with torch.no_grad():
        draws = np.array([float(pen.estimate()) for _ in range(400)])
    assert abs(draws.mean() - plug_in) < 4 * draws.std() / 20
    h = weights.h(a, s)
    mini = np.array([np.mean((h * scores)[rng.choice(n, 32 * 4, replace=False)]) for _ in range(400)])
    assert draws.std() < 0.5 * mini.std()  # same number of rows scored (4 strata x 32 vs 128)
    # the hook: no penalty before a running value exists, then 2 * lam * running * estimate
    logits = model(torch.tensor(x[:4], dtype=torch.float32))
    assert float(pen(logits, None, None)) == 0.0 and pen.running != 0.0


def _toy_images(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 32, 32)).astype(np.float32)
    y = (rng.random(n) < 0.4).astype(np.int64)
    a = (rng.random(n) < 0.5).astype(float)
    s = (rng.random(n) < np.where(a == 1, 0.85, 0.1)).astype(float)
    x[s == 1, 0, 1:4, 1:4] = 1.0  # the corner marker
    return x, y, np.stack([a, s, np.zeros(n)], 1)


def test_lambda_zero_is_bit_identical_to_unmitigated_training():
    x, y, meta = _toy_images()
    weights = DensityRatio.fit(meta[:, 0], meta[:, 1])
    states = []
    for penalty in (None, PathSpecificPenalty(weights, lam=0.0), PathSpecificPenalty(weights, lam=5.0, pse=0.1)):
        torch.manual_seed(3)
        model = SmallCNN()
        loader = make_loader(x, y, 16, shuffle=True, seed=3, meta=None if penalty is None else meta)
        train_epochs(model, loader, epochs=2, optimizer="adam", lr=0.002, device=torch.device("cpu"),
                     penalty_fn=penalty)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])  # lam > 0 does change training


def test_penalty_is_a_per_sample_loss_under_opacus(tmp_path):
    """Opacus' per-sample gradients of CE + penalty average to the batch gradient (so clipping bounds each
    patient), and DP-SGD training with the penalty runs its planned steps, charged to the ledger."""
    x, y, meta = _toy_images(32)
    weights = DensityRatio.fit(meta[:, 0], meta[:, 1])
    pen = PathSpecificPenalty(weights, lam=10.0, pse=0.15)
    torch.manual_seed(0)
    model = SmallCNN()
    xb, yb, mb = torch.tensor(x), torch.tensor(y), torch.tensor(meta, dtype=torch.float32)

    def objective(m):
        logits = m(xb)
        return nn.functional.cross_entropy(logits, yb) + pen(logits, yb, mb)

    objective(model).backward()
    full = [p.grad.clone() for p in model.parameters()]
    gsm = GradSampleModule(SmallCNN(), loss_reduction="mean")
    gsm._module.load_state_dict(model.state_dict())
    objective(gsm).backward()
    for p, g in zip(gsm._module.parameters(), full):
        assert torch.allclose(p.grad_sample.mean(0), g, rtol=1e-4, atol=1e-6)
    # without the penalty the gradients differ: the check above saw the penalty's part
    model.zero_grad()
    nn.functional.cross_entropy(model(xb), yb).backward()
    assert max(float((p.grad - g).abs().max()) for p, g in zip(model.parameters(), full)) > 1e-4

    (tmp_path / "s").mkdir()
    ledger = PrivacyLedger.open(tmp_path / "s", delta=1e-5, max_epsilon=100, fingerprint="toy")
    plan = plan_dp(len(y), 16, 1, 3, 8.0, 1e-5)
    stats = train_dp(SmallCNN(), PatientData(x, y, meta=meta), plan, ledger,
                     DPSettings(max_grad_norm=1.0, physical_batch_size=8),
                     penalty_fn=PathSpecificPenalty(weights, lam=10.0, pse=0.15))
    assert stats["steps"] == plan.steps_per_round
    assert ledger.epsilon() > 0


def test_score_shift_correction_removes_a_known_shift():
    rng = np.random.default_rng(0)
    n = 4000
    a = (rng.random(n) < 0.5).astype(int)
    s = (rng.random(n) < np.where(a == 1, 0.8, 0.1)).astype(int)
    d = (rng.random(n) < np.where(a == 1, 0.45, 0.3)).astype(int)
    z = -1 + 2.0 * d + 0.7 * s + rng.normal(0, 0.5, n)
    post = ScoreShiftCorrection().fit(1 / (1 + np.exp(-z)), a, s, d)
    assert post.delta[1] == pytest.approx(0.7, abs=0.06)
    corrected = post.transform(1 / (1 + np.exp(-z)), s)
    zc = np.log(corrected / (1 - corrected))
    assert abs(zc[s == 1].mean() - zc[s == 0].mean() - 2.0 * (d[s == 1].mean() - d[s == 0].mean())) < 0.08



def test_score_shift_correction_zeroes_the_effect_when_s_compresses_the_logit():
    """Blur/noise: S = 1 halves the lesion's logit evidence and adds a shift. Each a0 patient's logit under both S
    values is known, so the true social PSE after correction (mean over a0 of corrected(S under a1) - corrected(S))
    is exact; equal mean logits per (A, D) stratum (the old fit) leave a clear residual."""
    rng = np.random.default_rng(1)
    n = 20000
    a = (rng.random(n) < 0.5).astype(int)
    u_s = rng.random(n)
    s_a0, s_a1 = (u_s < 0.1).astype(int), (u_s < 0.85).astype(int)
    s = np.where(a == 1, s_a1, s_a0)
    d = (rng.random(n) < np.where(a == 1, 0.45, 0.27)).astype(int)
    evidence = (2.0 * d - 1.0) * 2.5 + rng.normal(0, 1.2, n)

    def z_of(s_, rows=slice(None)):
        return -1.0 + evidence[rows] * (1 - 0.5 * s_) + 0.6 * s_

    def true_pse(fn):
        a0 = a == 0
        return float(np.mean(fn(z_of(s_a1[a0], a0), s_a1[a0]) - fn(z_of(s_a0[a0], a0), s_a0[a0])))

    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    unmitigated = true_pse(lambda z, s_: sig(z))
    post = ScoreShiftCorrection().fit(sig(z_of(s)), a, s, d)
    corrected = true_pse(lambda z, s_: post.transform(sig(z), s_))
    assert unmitigated > 0.04
    assert abs(corrected) < 0.1 * unmitigated
    # the mean-logit shift (what the correction fitted before) is a different number and misses
    logit_gap = np.mean([z_of(s)[(s == 1) & (d == y)].mean() - z_of(s)[(s == 0) & (d == y)].mean() for y in (0, 1)])
    shifted = true_pse(lambda z, s_: sig(z - logit_gap * s_))
    assert abs(shifted) > 0.15 * unmitigated

# ---------------------------------------------------------------------------------- client wiring

SCENARIO = """
name = "mitigation-client"
seed = 11
image_size = 32
[defaults]
n = 60
marker = true
p_s_a0 = 0.1
p_s_a1 = 0.9
[[sites]]
name = "east"
[[sites]]
name = "west"
"""


def test_federated_stratified_penalty_equals_pooled_stratified_penalty_two_sites():
    """Each site's share (StratifiedPathPenalty.for_site, weights from the released (A, stratum) counts), averaged
    with FedAvg's n_site / n weights, is the centralised stratified estimate on the pooled rows, value and gradient;
    and the consortium PSE the server computes from the released score sums is that same number."""
    rng = np.random.default_rng(3)
    sites = []
    for n, p_a, p_s in [(50, 0.3, (0.05, 0.9)), (70, 0.7, (0.3, 0.6))]:
        a = (rng.random(n) < p_a).astype(float)
        s = (rng.random(n) < np.where(a == 1, p_s[1], p_s[0])).astype(float)
        y = (rng.random(n) < np.where(a == 1, 0.5, 0.3)).astype(int)
        x = np.stack([y + rng.normal(0, 0.5, n), s + rng.normal(0, 0.5, n), rng.normal(size=n)], 1)
        sites.append((np.stack([a, s, np.zeros(n)], 1), x, y))
    meta = np.concatenate([m for m, _, _ in sites])
    x_all = np.concatenate([x for _, x, _ in sites])
    y_all = np.concatenate([y for _, _, y in sites])
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    with torch.no_grad():
        scores = [positive_score(model(torch.tensor(x, dtype=torch.float32))).double().numpy() for _, x, _ in sites]
    released = [site_release_vectors(m, sc, y) for (m, _, y), sc in zip(sites, scores)]
    for pool_groups, factorise in [(True, True), (True, False), (False, False)]:
        consortium = consortium_strata([c for c, _ in released], [t for _, t in released], pool_groups=pool_groups,
                                       factorise_label=factorise)
        weights = DensityRatio.fit(meta[:, 0], meta[:, 1])
        assert consortium.weights.ratio == pytest.approx(weights.ratio)
        strata = stratum_index(meta, y_all)
        ref = meta[:, 0] == 0
        pool = np.ones(len(y_all), bool) if pool_groups else ref
        by_stratum = None
        if factorise:  # w(s, d) = p(s | a0) (r_s - 1) p(d | a0), from the pooled rows
            p_s = np.array([(meta[ref, 1] == v).mean() for v in (0, 1)])
            p_d = np.array([(y_all[ref] == v).mean() for v in (0, 1)])
            by_stratum = np.array([p_s[k // 2] * (weights.ratio[k // 2] - 1) * p_d[k % 2] for k in range(4)])
        central = StratifiedPathPenalty(model, x_all[pool], strata[pool], weights.ratio[strata[pool] // 2], lam=1.0,
                                        reference=ref[pool], weights_by_stratum=by_stratum)
        shares = [StratifiedPathPenalty.for_site(model, x, m, y, consortium, lam=1.0) for m, x, y in sites]
        n = [len(y) for _, _, y in sites]

        def value_and_grad(pen):
            model.zero_grad()
            v = pen.exact()
            v.backward()
            return float(v), [p.grad.clone() for p in model.parameters()]

        c_val, c_grad = value_and_grad(central)
        site_vg = [value_and_grad(pen) for pen in shares]
        fed_val = sum(nk / sum(n) * v for nk, (v, _) in zip(n, site_vg))
        assert fed_val == pytest.approx(c_val, rel=1e-5)
        assert consortium.pse == pytest.approx(c_val, rel=1e-5)
        assert abs(c_val) > 1e-3
        for i, g in enumerate(c_grad):
            fed = sum(nk / sum(n) * vg[1][i] for nk, vg in zip(n, site_vg))
            assert torch.allclose(fed, g, rtol=1e-4, atol=1e-7)
            assert float(g.abs().max()) > 1e-4
        if not pool_groups:  # the reference-group form is the per-sample plug-in PSE
            assert consortium.pse == pytest.approx(weights.pse(meta[:, 0], meta[:, 1], None, np.concatenate(scores)))


def test_client_applies_the_broadcast_penalty_and_releases_its_statistics(tmp_path, task_identity):
    (tmp_path / "s.toml").write_text(SCENARIO)
    east, west = generate_consortium(tmp_path / "s.toml", tmp_path / "data")
    torch.manual_seed(0)
    start = build_model("cnn").state_dict()
    counts = np.stack([np.repeat(KNOWN[0] / 2, 2), np.repeat(KNOWN[1] / 2, 2)])  # (A, stratum = cell * 2 + D)
    broadcast = consortium_strata([counts.ravel()], [counts.ravel() * 0.4]).to_config()
    broadcast["fair-pse"] = 0.2

    def run(lam, extra, state=None, **run_config):
        ctx = Context(run_id=1, node_id=7, node_config={"data-path": str(east), "require-dp": False},
                      state=RecordDict() if state is None else state,
                      run_config={**RUN_CONFIG, "image-size": 32, "local-epochs": 1, "fair-lambda": lam, **run_config})
        msg = Message(content=RecordDict({"arrays": ArrayRecord(start),
                                          "config": ConfigRecord({"server-round": 2, **extra})}),
                      dst_node_id=7, message_type="train")
        return train_handler(msg, ctx).content["arrays"].to_torch_state_dict()

    plain = run(0.0, {})
    off = run(0.0, broadcast)  # fair-lambda = 0 (the default): the broadcast is ignored
    assert all(torch.equal(plain[k], off[k]) for k in plain)
    on = run(20.0, broadcast)
    assert any(not torch.equal(plain[k], on[k]) for k in plain)
    per_sample = run(20.0, broadcast, **{"fair-form": "per-sample"})  # the training batch's term instead
    assert any(not torch.equal(per_sample[k], on[k]) for k in plain)
    assert any(not torch.equal(per_sample[k], plain[k]) for k in plain)
    first_round = run(20.0, {})  # nothing broadcast yet (round 1): unpenalised
    assert all(torch.equal(plain[k], first_round[k]) for k in plain)
    # the mediator offset alone (fair-lambda 0): the site's own counts give logit P(D | S), no broadcast needed
    offset_only = run(0.0, {}, **{"fair-offset": True})
    assert any(not torch.equal(plain[k], offset_only[k]) for k in plain)
    # augmented Lagrangian: the multiplier lives in the node's state (never in the reply) and carries over rounds
    state = RecordDict()
    dual = run(20.0, broadcast, state=state, **{"fair-dual-lr": 5.0})
    assert any(not torch.equal(dual[k], on[k]) for k in plain)
    mu1 = float(state.config_records["fair-state"]["mu"])
    assert mu1 != 0.0
    run(20.0, broadcast, state=state, **{"fair-dual-lr": 5.0})
    assert float(state.config_records["fair-state"]["mu"]) != mu1

    # the statistics query: noised counts (2 groups x 2 scanner levels) and a0 score sums, charged to the ledger
    ctx = Context(run_id=1, node_id=7, node_config={"data-path": str(west)}, state=RecordDict(),
                  run_config={**RUN_CONFIG, "image-size": 32, "release-noise": 1.0, "release-min-count": 0})
    fair_keys = {k: v for k, v in RUN_CONFIG.items() if k.startswith("fair-")}  # what the server sends with it
    query = Message(content=RecordDict({"arrays": ArrayRecord(start), "config": ConfigRecord(
        {"statistics": "fair-pse", "server-round": 1, "seed": 0, **fair_keys})}),
        dst_node_id=7, message_type="query")
    reply = statistics_handler(query, ctx).content
    rec = reply["fair-pse"]
    assert len(rec["counts"]) == 8 and len(rec["sums"]) == 8  # (2 groups) x (2 scanner levels x 2 labels)
    from client.site import open_site

    n_val = int((open_site(west, image_size=32, seed=int(RUN_CONFIG["seed"])).split == "val").sum())
    assert abs(sum(rec["counts"]) - n_val) < 12  # 8 cells, noise std 1 each: the penalty's pool, the val split
    assert reply["metrics"]["epsilon"] > reply["metrics"]["epsilon-before"]
    # later rounds: the server already holds the counts and asks only for the score sums
    query = Message(content=RecordDict({"arrays": ArrayRecord(start), "config": ConfigRecord(
        {"statistics": "fair-pse", "server-round": 2, "seed": 0, **fair_keys, "fair-counts": False})}),
        dst_node_id=7, message_type="query")
    assert set(statistics_handler(query, ctx).content["fair-pse"].keys()) == {"sums"}


@pytest.mark.simulation
def test_federated_penalty_through_flower(tmp_path):
    """A real simulation (own SuperLink, Flower's engine) with fair-lambda > 0: the server asks every site for its
    released statistics before round 1 and after each round, records the consortium PSE per round, and each release
    is charged to the site's ledger. The same run uses Flower's central DP (its server-side wrapper noises the
    aggregate), which the fairness statistics do not depend on."""
    from client.ledger import PrivacyLedger
    from simulations.run import main as simulate

    # release-min-count 0 and 150 patients per site: at the defaults the ~16 validation rows per site in 8 noised
    # cells were at times all suppressed in one group, leaving the server no density ratio to broadcast
    (tmp_path / "s.toml").write_text(SCENARIO.replace("n = 60", "n = 150"))
    code = simulate([str(tmp_path / "s.toml"), "--out", str(tmp_path / "run"), "--rounds", "2", "--timeout", "600", *ONE_ACTOR,
                     "-c", "local-epochs=1", "-c", "image-size=32", "-c", "fair-lambda=10", "-c", "fair-per-cell=8",
                     "-c", "fraction-evaluate=0", "-c", "release-min-count=0",
                     "-c", "central-dp=true", "-c", "central-dp-noise=0.5", "-c", "central-dp-clip=5.0"])
    assert code == 0
    assert "central DP noise" in (tmp_path / "run" / "flower.log").read_text()  # the wrapper noised the aggregate
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(metrics["round"]) == [0, 1, 2]
    assert metrics["fair_pse"].notna().all() and (metrics["fair_sites"] == 2).all()
    assert metrics["fair_pse"].abs().max() < 1.0
    per_site = pd.read_csv(tmp_path / "run" / "per_site.csv")
    fair = per_site[per_site["phase"] == "fair-pse"]
    assert sorted(zip(fair["round"], fair["site"])) == [(r, s) for r in (0, 1, 2) for s in ("east", "west")]
    assert (fair["status"] == "ok").all()
    train = per_site[per_site["phase"] == "train"]
    assert (train["status"] == "ok").sum() == 4  # both sites, both rounds, under the wrapper
    for site in ("east", "west"):
        ledger = PrivacyLedger.open(tmp_path / "run" / "data" / site)
        releases = sorted((e["round"], e["label"]) for e in ledger.entries if e["kind"] == "release")
        assert releases == [(0, "fair-pse-counts"), (0, "fair-pse-sums"), (1, "fair-pse-sums"), (2, "fair-pse-sums")]
        assert ledger.history == [(5.0, 1.0, 4)]  # release-noise 5, q = 1, four Gaussian steps
        assert ledger.epsilon() > 0


# ---------------------------------------------------------------------------------- effect on the toy

@pytest.mark.slow  # 75 s, and its 10-epoch training varies with the machine: `pytest -m slow` (benchmarks cover it)
def test_penalty_removes_social_effect_and_keeps_permissible_on_marker_toy():
    """Centralised, fixed seed, small version of benchmarks/bench_mitigation.py on the marker-only scenario
    (stratified penalty, lambda 30): the true (counterfactual) social PSE falls by most of its size, most of the true
    permissible PSE and of the AUROC stay, and the training-set PSE the penalty tracks ends near 0."""
    b = _bench()
    data = b.load_data(ROOT / "simulations" / "scenarios" / "social_marker_32.toml", n_holdout=600, seed=0)
    base, _ = b.train_cnn(data, epochs=10, seed=0)
    pen, info = b.train_cnn(data, epochs=10, seed=0, lam=30.0, mode="stratified-sd")
    r0 = b.evaluate(lambda x, s, a: b.cnn_scores(base, x), data)
    r1 = b.evaluate(lambda x, s, a: b.cnn_scores(pen, x), data)
    print("unmitigated", r0, "\npenalised", r1, info)
    assert r0["true_social_pse"] > 0.05  # the shortcut is used
    # at least 60 % removed (measured 73 % here; 10 epochs of float training vary a little with the machine's BLAS)
    assert abs(r1["true_social_pse"]) < 0.4 * r0["true_social_pse"]
    assert r1["true_permissible_pse"] > 0.7 * r0["true_permissible_pse"]
    assert r1["auroc"] > r0["auroc"] - 0.04
    assert abs(info["running_pse_last"]) < 0.02


def test_label_factorised_stratum_weights_same_target_less_noise():
    """With D ⟂ S | A (no S -> D edge) p(d | a0) may replace p(d | a0, s): the same PSE in the population, and far
    less noise when the mediator level is rare in a0, because p(d | a0, s) of that level then comes from few rows."""
    rng = np.random.default_rng(0)
    true_pse = 0.8 * 0.05  # (p(S=1 | a1) - p(S=1 | a0)) x the score's S-contrast, the same for both labels

    def draw(n=2000):
        a = (rng.random(n) < 0.5).astype(float)
        s = (rng.random(n) < np.where(a == 1, 0.9, 0.1)).astype(float)
        y = (rng.random(n) < np.where(a == 1, 0.45, 0.25)).astype(int)
        score = np.clip(0.2 + 0.5 * y + 0.05 * s + rng.normal(0, 0.1, n), 0, 1)
        return site_release_vectors(np.stack([a, s, np.zeros(n)], 1), score, y)

    draws = [draw() for _ in range(300)]
    est = {f: np.array([consortium_strata([c], [t], factorise_label=f).pse for c, t in draws]) for f in (True, False)}
    for f in (True, False):
        assert abs(est[f].mean() - true_pse) < 0.004, (f, est[f].mean())
    assert est[True].std() < 0.7 * est[False].std(), (est[True].std(), est[False].std())
    # in the population (expected counts) the two weightings give the same PSE
    counts, sums = np.mean([c for c, _ in draws], 0), np.mean([t for _, t in draws], 0)
    assert consortium_strata([counts], [sums], factorise_label=True).pse == pytest.approx(
        consortium_strata([counts], [sums], factorise_label=False).pse, abs=2e-3)


def test_mediator_offset_removes_the_incentive_to_learn_the_mediator():
    """A linear model on (lesion evidence, marker = S): with S -> D's log-odds given as a fixed offset during
    training, the marker's weight falls to ~0 while the lesion's stays; the hook's loss is CE(logits + offset)."""
    rng = np.random.default_rng(0)
    n = 4000
    a = (rng.random(n) < 0.5).astype(float)
    s = (rng.random(n) < np.where(a == 1, 0.9, 0.1)).astype(float)
    y = (rng.random(n) < np.where(a == 1, 0.6, 0.2)).astype(int)
    x = np.stack([y + rng.normal(0, 1.0, n), s], 1).astype(np.float32)
    meta = np.stack([a, s, np.zeros(n)], 1)
    counts, _ = site_release_vectors(meta, np.zeros(n), y)
    offset = MediatorOffset.from_counts(counts)
    p_d = [y[s == v].mean() for v in (0, 1)]
    assert offset.delta[1] - offset.delta[0] == pytest.approx(
        np.log(p_d[1] / (1 - p_d[1])) - np.log(p_d[0] / (1 - p_d[0])), abs=0.01)

    def marker_and_lesion_weight(hook):
        torch.manual_seed(0)
        model = nn.Linear(2, 2)
        loader = make_loader(x, y, 64, shuffle=True, seed=0, meta=meta)
        train_epochs(model, loader, epochs=10, optimizer="adam", lr=0.01, device=torch.device("cpu"), penalty_fn=hook)
        w = model.weight.detach().numpy()
        return w[1, 1] - w[0, 1], w[1, 0] - w[0, 0]

    plain_marker, plain_lesion = marker_and_lesion_weight(None)
    off_marker, off_lesion = marker_and_lesion_weight(offset)
    assert plain_marker > 1.0  # the unmitigated model uses the marker
    assert abs(off_marker) < 0.15 * plain_marker
    assert off_lesion == pytest.approx(plain_lesion, rel=0.15)
    logits = torch.randn(8, 2)
    yy = torch.tensor([0, 1] * 4)
    mm = torch.tensor(meta[:8], dtype=torch.float32)
    shift = torch.as_tensor(offset.delta[mm[:, 1].long().numpy()] - offset.delta[0], dtype=torch.float32)
    expected = nn.functional.cross_entropy(logits + torch.stack([torch.zeros(8), shift], 1), yy)
    assert float(nn.functional.cross_entropy(logits, yy) + offset(logits, yy, mm)) == pytest.approx(float(expected))
