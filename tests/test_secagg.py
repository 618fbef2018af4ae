"""Secure aggregation driven as the wire would: every request and reply, and each site's state between stages,
goes through serialised Flower records (protobuf bytes). What the server sees of one site, what it recovers, and
what a site refuses."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.common import serde
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from scipy import stats

from client import secagg as site
from core_models.networks import build_model
from core_models.secagg import (
    SECAGG,
    EncryptedShares,
    MaskedInput,
    MaskedInputRequest,
    PublicKeys,
    SecAggError,
    SecAggParams,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskShares,
    VectorLayout,
    add_mod,
    encode,
    mask,
)
from server import secagg as server

NODES = [3, 2**63 + 17, 41, 1005]  # Flower node ids are uint64
WEIGHTS = [57.0, 230.0, 121.0, 402.0]  # the sites' num-examples
MAX_WEIGHT = 1000.0


@pytest.fixture(autouse=True)
def seeded_rounding():
    """Flower's quantize rounds stochastically with numpy's global generator: seeded here, restored after."""
    saved = np.random.get_state()
    np.random.seed(20240534)
    yield
    np.random.set_state(saved)


def _wire(record):
    """A record as the other side reads it: serialised to protobuf bytes and parsed back."""
    proto = serde.recorddict_to_proto(RecordDict({SECAGG: record}))
    return serde.recorddict_from_proto(ProtoRecordDict.FromString(proto.SerializeToString()))[SECAGG]


def _site_arrays(count: int) -> list[dict[str, np.ndarray]]:
    """The default cnn's state dict, perturbed per site as local training would."""
    gen = torch.Generator().manual_seed(34)
    base = build_model("cnn", 2, 1).state_dict()
    return [{k: (v + 0.05 * torch.randn(v.shape, generator=gen)).numpy() for k, v in base.items()}
            for _ in range(count)]


class Round:
    """One secure sum: the server's state, each site's state as its Context would store it, the last requests."""

    def __init__(self, params: SecAggParams, layout: VectorLayout, nodes=NODES, min_sites: int = 2):
        self.server, request = server.start(params, layout, list(nodes))
        self.states, keys = {}, {}
        for nid in nodes:
            state, reply = site.advertise_keys(nid, SecAggParams.from_record(_wire(request.to_record())), min_sites)
            self.states[nid] = state.to_record()
            keys[nid] = PublicKeys.from_record(_wire(reply.to_record()))
        self.server, self.requests = server.share_keys(self.server, keys)

    def site(self, nid, stage, request_type, reply_type, *extra):
        state = site.SiteState.from_record(_wire(self.states[nid]))
        state, reply = stage(state, request_type.from_record(_wire(self.requests[nid].to_record())), *extra)
        self.states[nid] = state.to_record()
        return reply_type.from_record(_wire(reply.to_record()))

    def share_keys(self, nodes):
        shares = {nid: self.site(nid, site.share_keys, ShareKeysRequest, EncryptedShares) for nid in nodes}
        self.server, self.requests = server.route_shares(self.server, shares)

    def masked_inputs(self, inputs: dict[int, np.ndarray]) -> dict[int, MaskedInput]:
        masked = {nid: self.site(nid, site.masked_input, MaskedInputRequest, MaskedInput, x)
                  for nid, x in inputs.items()}
        self.server, self.requests = server.request_unmask(self.server, masked)
        return masked

    def unmask(self, nodes) -> dict[int, UnmaskShares]:
        return {nid: self.site(nid, site.unmask, UnmaskRequest, UnmaskShares) for nid in nodes}


def _secure_round(arrays, weights, nodes=NODES, drop=()):
    """A whole round in which `drop` leave after sharing keys; returns the sum, what each site put in, the masked
    inputs and the unmask replies as the server received them."""
    layout = VectorLayout.of(arrays[0])
    params = SecAggParams.majority(len(nodes), max_weight=MAX_WEIGHT)
    rnd = Round(params, layout, nodes)
    rnd.share_keys(nodes)
    inputs = {nid: encode(a, w, layout, params) for nid, a, w in zip(nodes, arrays, weights) if nid not in drop}
    masked = rnd.masked_inputs(inputs)
    replies = rnd.unmask(inputs)
    return server.unmask(rnd.server, replies), inputs, masked, replies, params


def _uniformity_p(vector: np.ndarray, modulus: int) -> float:
    """The smallest p-value of three tests of uniformity over [0, modulus): chi-square of the top and bottom 8 bits,
    Kolmogorov-Smirnov of the values."""
    v = np.asarray(vector, dtype=np.uint64)
    bits = modulus.bit_length() - 1
    top = np.bincount((v >> np.uint64(bits - 8)).astype(np.int64), minlength=256)
    low = np.bincount((v & np.uint64(255)).astype(np.int64), minlength=256)
    return min(stats.chisquare(top).pvalue, stats.chisquare(low).pvalue,
               stats.kstest(v / modulus, "uniform").pvalue)


def _fedavg(arrays, weights) -> dict[str, np.ndarray]:
    """Plain FedAvg: Flower's own weighted aggregation of the sites' train replies."""
    replies = [RecordDict({"arrays": ArrayRecord({k: Array(v.astype(np.float64)) for k, v in a.items()}),
                           "metrics": MetricRecord({"num-examples": w})}) for a, w in zip(arrays, weights)]
    return {k: v.numpy() for k, v in aggregate_arrayrecords(replies, "num-examples").items()}


def _relative_error(got: dict, want: dict) -> float:
    diff = np.concatenate([(got[k] - want[k]).ravel() for k in want])
    return float(np.linalg.norm(diff) / np.linalg.norm(np.concatenate([v.ravel() for v in want.values()])))


def test_one_sites_masked_input_looks_uniform_to_the_server():
    arrays = _site_arrays(4)
    result, inputs, masked, replies, params = _secure_round(arrays, WEIGHTS)
    nid = NODES[0]
    seen = masked[nid].vector
    assert seen.dtype == np.uint32 and seen.size == inputs[nid].size == 60706 + 1
    assert _uniformity_p(seen, params.modulus) > 1e-6
    assert _uniformity_p(inputs[nid], params.modulus) < 1e-12  # the same test on the unmasked input fails
    # the server rebuilds this survivor's self-mask seed at unmasking; the pairwise masks still hide its input
    seed = combine_shares([r.seed_shares[nid] for r in replies.values()][: params.threshold])
    unseeded = add_mod(seen, mask(seed, seen.size, params.modulus), params.modulus, sign=-1)
    assert _uniformity_p(unseeded, params.modulus) > 1e-6
    assert np.array_equal(result.total, sum(x.astype(np.uint64) for x in inputs.values()))


def test_secure_sum_equals_fedavg_to_quantisation_error():
    arrays = _site_arrays(4)
    result, _, _, _, params = _secure_round(arrays, WEIGHTS)
    want = _fedavg(arrays, WEIGHTS)
    assert result.sites == tuple(NODES) and result.dropped == ()
    assert abs(result.result.total_weight - sum(WEIGHTS)) <= len(NODES) * MAX_WEIGHT / params.quantization_range
    got = result.result.mean()
    assert _relative_error(got, want) <= 1e-4
    # every entry within the rounding of 4 inputs (under 1 quantum each, in weight units) over the total weight,
    # plus the shift from rounding each weight to 1/quantization_range of max-weight (relative eps at most)
    eps = 0.5 * MAX_WEIGHT / (params.quantization_range * min(WEIGHTS))
    largest = max(float(np.abs(a[k]).max()) for a in arrays for k in a)
    bound = len(NODES) * params.quantum * MAX_WEIGHT / (sum(WEIGHTS) * (1 - eps)) + 2 * largest * eps / (1 - eps)
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) <= bound


def test_a_site_dropped_after_key_sharing_leaves_the_exact_sum_of_the_rest():
    arrays = _site_arrays(4)
    gone = NODES[1]
    result, inputs, _, _, _ = _secure_round(arrays, WEIGHTS, drop={gone})
    assert result.sites == tuple(n for n in NODES if n != gone) and result.dropped == (gone,)
    assert np.array_equal(result.total, sum(inputs[n].astype(np.uint64) for n in result.sites))  # exact
    keep = [i for i, n in enumerate(NODES) if n != gone]
    want = _fedavg([arrays[i] for i in keep], [WEIGHTS[i] for i in keep])
    assert _relative_error(result.result.mean(), want) <= 1e-4


def _round_up_to_unmask(gone):
    """4 sites (threshold 3), `gone` dropped after sharing keys, masked inputs in: the unmask requests are out."""
    layout = VectorLayout.of({"w": np.zeros(50, np.float32)})
    params = SecAggParams.majority(4)
    rnd = Round(params, layout)
    rnd.share_keys(NODES)
    rng = np.random.default_rng(5)
    rnd.masked_inputs({n: encode({"w": rng.normal(size=50)}, 1.0, layout, params) for n in NODES if n != gone})
    return rnd


def test_a_server_asking_both_shares_of_one_site_is_refused():
    gone = NODES[3]
    rnd = _round_up_to_unmask(gone)
    asked = NODES[0]
    honest = rnd.requests[asked]
    assert set(honest.survivors) & set(honest.dropped) == set()
    # the dropped site's self-mask share asked along with its mask-key share
    rnd.requests[asked] = UnmaskRequest(honest.survivors + (gone,), honest.dropped)
    with pytest.raises(SecAggError, match=r"both the self-mask share .* of site\(s\) \[1005\]"):
        rnd.unmask([asked])
    # a survivor named dropped too
    rnd.requests[asked] = UnmaskRequest(honest.survivors, honest.dropped + (NODES[2],))
    with pytest.raises(SecAggError, match=r"both the self-mask share .* of site\(s\) \[41\]"):
        rnd.unmask([asked])
    # one answer per round: after the honest answer, a second request with other lists is refused
    rnd.requests[asked] = honest
    assert set(rnd.unmask([asked])[asked].key_shares) == {gone}
    rnd.requests[asked] = UnmaskRequest(tuple(n for n in honest.survivors if n != NODES[2]), (NODES[2],))
    with pytest.raises(SecAggError, match="after 'unmask'"):
        rnd.unmask([asked])


def test_unmasking_with_fewer_than_the_threshold_is_refused():
    layout = VectorLayout.of({"w": np.zeros(50, np.float32)})
    params = SecAggParams.majority(4)
    assert params.threshold == 3
    rnd = Round(params, layout)
    rnd.share_keys(NODES)
    x = encode({"w": np.full(50, 0.5)}, 1.0, layout, params)
    masked = {n: rnd.site(n, site.masked_input, MaskedInputRequest, MaskedInput, x) for n in NODES[:2]}
    with pytest.raises(SecAggError, match="only 2 site.*fewer than the threshold 3"):
        server.request_unmask(rnd.server, masked)
    # a site asked to unmask with two survivors refuses too
    rnd.requests[NODES[0]] = UnmaskRequest(tuple(NODES[:2]), tuple(NODES[2:]))
    with pytest.raises(SecAggError, match="2 survivors, fewer than the threshold 3"):
        rnd.unmask([NODES[0]])
    # and the server does not combine fewer than t answers
    rnd = _round_up_to_unmask(NODES[3])
    with pytest.raises(SecAggError, match="only 2 site.*fewer than the threshold 3"):
        server.unmask(rnd.server, rnd.unmask(NODES[:2]))


def test_a_site_refuses_fewer_participants_than_its_policy_or_a_minority_threshold():
    layout = VectorLayout.of({"w": np.zeros(5, np.float32)})
    with pytest.raises(SecAggError, match="4 planned participants, fewer than this site's secagg-min-sites=5"):
        Round(SecAggParams.majority(4), layout, min_sites=5)
    with pytest.raises(SecAggError, match="threshold 2 is not a strict majority of 4"):
        Round(SecAggParams(num_sites=4, threshold=2), layout)
    # one site failing to share keys: the others refuse to mask without its shares
    rnd = Round(SecAggParams.majority(4), layout, min_sites=4)
    rnd.share_keys(NODES[:3])
    with pytest.raises(SecAggError, match=rf"refuses to mask: no shares from participant\(s\) \[{NODES[3]}\]"):
        rnd.site(NODES[0], site.masked_input, MaskedInputRequest, MaskedInput, np.zeros(6, np.int64))


def test_a_server_that_withholds_shares_to_split_the_survivors_is_refused():
    """The deviating server's attack: route a target only t-1 peers' shares, then hand the others different survivor
    lists so that t of them return the target's seed shares and t its peers' key shares. The target refuses to mask
    with fewer shares than it shared keys with."""
    layout = VectorLayout.of({"w": np.zeros(5, np.float32)})
    nodes = NODES + [77]
    rnd = Round(SecAggParams.majority(5), layout, nodes)
    rnd.share_keys(nodes)
    target = nodes[0]
    request = rnd.requests[target]
    keep = [i for i, src in enumerate(request.sources) if src not in nodes[1:3]]  # two peers' shares withheld
    rnd.requests[target] = MaskedInputRequest(tuple(request.sources[i] for i in keep),
                                              tuple(request.ciphertexts[i] for i in keep))
    x = encode({"w": np.full(5, 0.25)}, 1.0, layout, SecAggParams.majority(5))
    with pytest.raises(SecAggError, match="refuses to mask: no shares from participant"):
        rnd.site(target, site.masked_input, MaskedInputRequest, MaskedInput, x)


def test_a_site_masks_once_and_forgets_its_secrets():
    """After masking, the state a site keeps holds no seed and no secret key, and a replayed stage is refused."""
    layout = VectorLayout.of({"w": np.zeros(5, np.float32)})
    params = SecAggParams.majority(4)
    rnd = Round(params, layout)
    rnd.share_keys(NODES)
    before = site.SiteState.from_record(_wire(rnd.states[NODES[0]]))
    assert before.seed and before.mask_secret and before.encryption_secret
    x = encode({"w": np.full(5, 0.25)}, 1.0, layout, params)
    masked = rnd.site(NODES[0], site.masked_input, MaskedInputRequest, MaskedInput, x)
    after = site.SiteState.from_record(_wire(rnd.states[NODES[0]]))
    assert after.seed == after.mask_secret == after.encryption_secret == b""
    secrets = (before.seed, before.mask_secret, before.encryption_secret)
    assert not any(sec in masked.vector.tobytes() for sec in secrets)
    with pytest.raises(SecAggError, match="out of order"):  # a second masked input of the same update
        rnd.site(NODES[0], site.masked_input, MaskedInputRequest, MaskedInput, x)
