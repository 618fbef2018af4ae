"""A site's side of secure aggregation (core_models/secagg.py describes the protocol): one function per stage,
each taking the site's state and the server's request and returning the new state and the reply.

The state holds secret keys and other sites' shares: it lives in the site's own Context state (`to_record`),
never in a reply. Key pairs and the self-mask seed come from the OS (the `cryptography` library, `os.urandom`).

A site refuses (SecAggError) when
- fewer than its policy's `min_sites` would be in the sum, or the threshold is not a strict majority of the
  participants (then two disjoint groups of t sites could each hand over one kind of share of the same site);
- the server asks, for one site, both the share of its self-mask seed (it survived) and the share of its mask key
  (it dropped): the two together remove every mask of that site's input;
- a stage comes out of order or a second time: one unmask answer per round;
- the shares of any site that shared keys did not reach it: with every masking site holding the same peers, the
  strict majority means no two survivor lists the server hands out can both reach the threshold for one site's
  seed and its peers' keys (a site dropping between sharing and masking therefore ends that round's sum).
After masking, the site forgets its own seed and secret keys: only the others' shares remain until unmasking.

`keep_update` and `answer` are the handlers' side: the trained model waits in the site's Context state for the
sum of its round, leaves it once (masked), and the state of the sum is saved there before each reply leaves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Mapping

import numpy as np
from cryptography.fernet import InvalidToken
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from core_models.secagg import (
    STAGE,
    STAGE_ADVERTISE_KEYS,
    STAGE_COLLECT_MASKED_INPUT,
    STAGE_SHARE_KEYS,
    STAGE_UNMASK,
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
    pairwise_seed,
    pairwise_sign,
)

_SEED_BYTES = 32
# the site's Context state: the protocol state, the trained model waiting for its sum, and its round and weight
STATE, UPDATE, INPUT = "secagg-state", "secagg-update", "secagg-input"


@dataclass(frozen=True)
class SiteState:
    """Where one site is in one secure sum: the last stage it answered and what it must remember."""

    stage: str
    node_id: int
    params: SecAggParams
    min_sites: int
    own_keys: PublicKeys
    mask_secret: bytes = b""  # PEM; dropped after masking
    encryption_secret: bytes = b""  # PEM; dropped after masking
    seed: bytes = b""  # self-mask seed; dropped after masking
    peer_keys: Mapping[int, PublicKeys] = field(default_factory=dict)  # every participant's, own included
    seed_shares: Mapping[int, bytes] = field(default_factory=dict)  # this site's shares of each one's seed
    key_shares: Mapping[int, bytes] = field(default_factory=dict)  # ... and of each one's mask key
    in_sum: tuple[int, ...] = ()  # the peers this site's masked input carries pairwise masks with

    def to_record(self) -> ConfigRecord:
        """For the site's Context state only (it holds secrets)."""
        peers = list(self.peer_keys)
        return ConfigRecord({
            **{f"params-{k}": v for k, v in self.params.to_record().items()},
            "stage": self.stage, "node-id": self.node_id, "min-sites": self.min_sites,
            "mask-key": self.own_keys.mask_key, "encryption-key": self.own_keys.encryption_key,
            "mask-secret": self.mask_secret, "encryption-secret": self.encryption_secret, "seed": self.seed,
            "peers": peers, "peer-mask-keys": [self.peer_keys[p].mask_key for p in peers],
            "peer-encryption-keys": [self.peer_keys[p].encryption_key for p in peers],
            "seed-owners": list(self.seed_shares), "seed-shares": list(self.seed_shares.values()),
            "key-owners": list(self.key_shares), "key-shares": list(self.key_shares.values()),
            "in-sum": list(self.in_sum),
        })

    @classmethod
    def from_record(cls, record: ConfigRecord) -> "SiteState":
        params = {k.removeprefix("params-"): v for k, v in record.items() if k.startswith("params-")}
        peer_keys = zip(record["peer-mask-keys"], record["peer-encryption-keys"], strict=True)
        return cls(
            stage=record["stage"], node_id=record["node-id"],
            params=SecAggParams.from_record(ConfigRecord(params)), min_sites=record["min-sites"],
            own_keys=PublicKeys(record["mask-key"], record["encryption-key"]),
            mask_secret=record["mask-secret"], encryption_secret=record["encryption-secret"], seed=record["seed"],
            peer_keys={p: PublicKeys(m, e) for p, (m, e) in zip(record["peers"], peer_keys, strict=True)},
            seed_shares=dict(zip(record["seed-owners"], record["seed-shares"], strict=True)),
            key_shares=dict(zip(record["key-owners"], record["key-shares"], strict=True)),
            in_sum=tuple(record["in-sum"]),
        )


def advertise_keys(node_id: int, params: SecAggParams, min_sites: int) -> tuple[SiteState, PublicKeys]:
    """Stage 1: check the parameters against the site's policy and make two fresh key pairs."""
    if min_sites < 2:
        raise SecAggError(f"secagg-min-sites must be at least 2, got {min_sites}")
    _check_policy(params.num_sites, params.threshold, min_sites, what="planned participants")
    mask_secret, mask_public = generate_key_pairs()
    enc_secret, enc_public = generate_key_pairs()
    own = PublicKeys(public_key_to_bytes(mask_public), public_key_to_bytes(enc_public))
    state = SiteState(STAGE_ADVERTISE_KEYS, node_id, params, min_sites, own,
                      mask_secret=private_key_to_bytes(mask_secret),
                      encryption_secret=private_key_to_bytes(enc_secret))
    return state, own


def share_keys(state: SiteState, request: ShareKeysRequest) -> tuple[SiteState, EncryptedShares]:
    """Stage 2: Shamir-share a fresh self-mask seed and the mask secret key, one encrypted share per peer."""
    _expect(state, STAGE_ADVERTISE_KEYS, STAGE_SHARE_KEYS)
    peers = request.public_keys
    if peers.get(state.node_id) != state.own_keys:
        raise SecAggError(f"secagg site {state.node_id}: its own public keys are missing or altered in the list")
    if len(peers) > state.params.num_sites:
        raise SecAggError(f"secagg: {len(peers)} participants, more than the {state.params.num_sites} planned")
    keys = [k for p in peers.values() for k in (p.mask_key, p.encryption_key)]
    if len(set(keys)) != len(keys):
        raise SecAggError("secagg: two participants advertise the same public key")
    _check_policy(len(peers), state.params.threshold, state.min_sites, what="participants")

    seed = os.urandom(_SEED_BYTES)
    seed_shares = create_shares(seed, state.params.threshold, len(peers))
    key_shares = create_shares(state.mask_secret, state.params.threshold, len(peers))
    encryption_secret = bytes_to_private_key(state.encryption_secret)
    dsts, ciphertexts = [], []
    for peer, keys_of_peer, seed_share, key_share in zip(peers, peers.values(), seed_shares, key_shares):
        if peer == state.node_id:
            own_seed_share, own_key_share = seed_share, key_share
            continue
        shared = generate_shared_key(encryption_secret, bytes_to_public_key(keys_of_peer.encryption_key))
        dsts.append(peer)
        ciphertexts.append(encrypt(shared, share_keys_plaintext_concat(state.node_id, peer, seed_share, key_share)))
    new = replace(state, stage=STAGE_SHARE_KEYS, seed=seed, peer_keys=dict(peers),
                  seed_shares={state.node_id: own_seed_share}, key_shares={state.node_id: own_key_share})
    return new, EncryptedShares(tuple(dsts), tuple(ciphertexts))


def masked_input(state: SiteState, request: MaskedInputRequest, encoded: np.ndarray) -> tuple[SiteState, MaskedInput]:
    """Stage 3: keep the peers' shares, and mask `encoded` (core_models.secagg.encode) with the self mask and one
    pairwise mask per peer whose shares arrived."""
    _expect(state, STAGE_SHARE_KEYS, STAGE_COLLECT_MASKED_INPUT)
    params = state.params
    unknown = set(request.sources) - set(state.peer_keys) | ({state.node_id} & set(request.sources))
    if unknown:
        raise SecAggError(f"secagg site {state.node_id}: shares from non-participants {sorted(unknown)}")
    missing = set(state.peer_keys) - set(request.sources) - {state.node_id}
    if missing:  # a server that routed fewer could hand each survivor a different list and unmask this site
        raise SecAggError(f"secagg site {state.node_id} refuses to mask: no shares from participant(s) "
                          f"{sorted(missing)}; it masks only with shares from every site that shared keys")
    _check_policy(len(request.sources) + 1, params.threshold, state.min_sites, what="sites left", majority=False)
    encoded = np.asarray(encoded)
    if encoded.ndim != 1 or not np.issubdtype(encoded.dtype, np.integer):
        raise SecAggError(f"secagg input must be a vector of integers, got {encoded.dtype}{encoded.shape}")
    if encoded.size and (encoded.min() < 0 or encoded.max() > params.quantization_range):
        raise SecAggError(f"secagg input outside [0, {params.quantization_range}]: encode it first")

    encryption_secret = bytes_to_private_key(state.encryption_secret)
    seed_shares, key_shares = dict(state.seed_shares), dict(state.key_shares)
    for src, ciphertext in zip(request.sources, request.ciphertexts):
        shared = generate_shared_key(encryption_secret, bytes_to_public_key(state.peer_keys[src].encryption_key))
        try:
            plaintext = decrypt(shared, ciphertext)
        except InvalidToken:
            raise SecAggError(f"secagg site {state.node_id}: the shares from {src} do not decrypt") from None
        actual_src, dst, seed_share, key_share = share_keys_plaintext_separate(plaintext)
        if (actual_src, dst) != (src, state.node_id):
            raise SecAggError(f"secagg site {state.node_id}: shares from {actual_src} to {dst} routed as {src}")
        seed_shares[src], key_shares[src] = seed_share, key_share

    vector = add_mod(encoded.astype(np.uint64), mask(state.seed, encoded.size, params.modulus), params.modulus)
    for src in request.sources:
        seed = pairwise_seed(state.mask_secret, state.peer_keys[src].mask_key)
        vector = add_mod(vector, mask(seed, encoded.size, params.modulus), params.modulus,
                         pairwise_sign(state.node_id, src))
    new = replace(state, stage=STAGE_COLLECT_MASKED_INPUT, mask_secret=b"", encryption_secret=b"", seed=b"",
                  seed_shares=seed_shares, key_shares=key_shares, in_sum=tuple(request.sources))
    return new, MaskedInput(vector.astype(np.uint32))


def unmask(state: SiteState, request: UnmaskRequest) -> tuple[SiteState, UnmaskShares]:
    """Stage 4, once: the self-seed shares of survivors and the mask-key shares of dropped sites, never both."""
    _expect(state, STAGE_COLLECT_MASKED_INPUT, STAGE_UNMASK)
    both = set(request.survivors) & set(request.dropped)
    if both:
        raise SecAggError(
            f"secagg site {state.node_id} refuses: the server asks for both the self-mask share (survived) and the "
            f"pairwise-mask share (dropped) of site(s) {sorted(both)}, which would unmask their input"
        )
    if state.node_id not in request.survivors:
        raise SecAggError(f"secagg site {state.node_id} refuses: it sent its masked input but is not a survivor")
    outside = (set(request.survivors) | set(request.dropped)) - set(state.in_sum) - {state.node_id}
    if outside:
        raise SecAggError(f"secagg site {state.node_id}: {sorted(outside)} did not share keys with it this round")
    _check_policy(len(request.survivors), state.params.threshold, state.min_sites, what="survivors",
                  majority=False)
    reply = UnmaskShares({s: state.seed_shares[s] for s in request.survivors},
                         {d: state.key_shares[d] for d in request.dropped})
    return replace(state, stage=STAGE_UNMASK, seed_shares={}, key_shares={}), reply


def _expect(state: SiteState, previous: str, stage: str) -> None:
    if state.stage != previous:
        raise SecAggError(f"secagg site {state.node_id}: a {stage!r} request after {state.stage!r} (out of order)")


def _check_policy(count: int, threshold: int, min_sites: int, *, what: str, majority: bool = True) -> None:
    """The site's conditions: at least `min_sites` (and the threshold) in the sum; a majority threshold."""
    if count < min_sites:
        raise SecAggError(f"secagg refused: {count} {what}, fewer than this site's secagg-min-sites={min_sites}")
    if count < threshold:
        raise SecAggError(f"secagg refused: {count} {what}, fewer than the threshold {threshold}")
    if majority and 2 * threshold <= count:
        raise SecAggError(
            f"secagg refused: threshold {threshold} is not a strict majority of {count} {what} "
            f"(at least {count // 2 + 1})"
        )


# --- the site's Context ------------------------------------------------------------------------------------------


def keep_update(state: RecordDict, server_round: int, arrays: ArrayRecord, weight: float) -> None:
    """A secure train round's model and weight, kept for the sum that follows (a new round's model replaces
    them, and its sum starts afresh)."""
    state[UPDATE] = arrays
    state[INPUT] = ConfigRecord({"round": server_round, "weight": float(weight)})
    if STATE in state:
        del state[STATE]


def answer(state: RecordDict, node_id: int, server_round: int, min_sites: int,
           request: ConfigRecord | ArrayRecord) -> ConfigRecord | ArrayRecord:
    """One stage of the sum of round `server_round`: the reply's record. The new protocol state is in `state`
    before this returns; the kept model is encoded, masked and forgotten at stage 3, so it is in one sum only."""
    stage = request.get(STAGE) if isinstance(request, ConfigRecord) else None
    held = state.config_records.get(INPUT)
    if stage == STAGE_ADVERTISE_KEYS:
        params = SecAggParams.from_record(request)
        if held is None or held["round"] != server_round:
            raise SecAggError(f"secagg site {node_id}: no model trained in round {server_round} waits for a sum")
        if held["weight"] > params.max_weight:
            raise SecAggError(f"secagg site {node_id}: its weight is above the sum's max-weight {params.max_weight}")
        if "sites" in held and held["sites"] != params.num_sites:  # its noise share was sized for that many
            raise SecAggError(f"secagg site {node_id}: the sum is over {params.num_sites} sites, its statistics were "
                              f"noised for {held['sites']}")
        new, reply = advertise_keys(node_id, params, min_sites)
    else:
        if STATE not in state.config_records:
            raise SecAggError(f"secagg site {node_id}: a {stage!r} request before the keys were advertised")
        current = SiteState.from_record(state.config_records[STATE])
        if stage == STAGE_SHARE_KEYS:
            new, reply = share_keys(current, ShareKeysRequest.from_record(request))
        elif stage == STAGE_COLLECT_MASKED_INPUT:
            if held is None or held["round"] != server_round:
                raise SecAggError(f"secagg site {node_id}: no model of round {server_round} left to sum")
            arrays = {k: v.numpy() for k, v in state.array_records[UPDATE].items()}
            encoded = encode(arrays, held["weight"], VectorLayout.of(arrays), current.params)
            new, reply = masked_input(current, MaskedInputRequest.from_record(request), encoded)
            del state[UPDATE], state[INPUT]
        elif stage == STAGE_UNMASK:
            new, reply = unmask(current, UnmaskRequest.from_record(request))
        else:
            raise SecAggError(f"secagg site {node_id}: unknown stage {stage!r}")
    state[STATE] = new.to_record()
    return reply.to_record()
