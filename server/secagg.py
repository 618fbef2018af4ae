"""The server's side of secure aggregation (core_models/secagg.py describes the protocol): one function per stage,
each taking the replies of the previous one (by the sender's node id) and returning the requests of the next.

The server routes what it cannot read and sums what it cannot unmask alone. It refuses (SecAggError) to go on
when fewer than the threshold remain, since no one site's shares can then be combined; it never puts one site
in both the survivors and the dropped of an unmask request. What it ends with (SecureSum): the sum of the
survivors' inputs, the survivors and the dropped sites.

`sum_over_grid` drives the four stages over the ServerApp's grid (train messages of action "secagg"); a site that
answers a stage with an error, a malformed record or not at all is out from that stage on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from logging import WARNING
from typing import Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common import log
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, public_key_to_bytes

from core_models import wire
from core_models.secagg import (
    STAGE,
    STAGE_ADVERTISE_KEYS,
    STAGE_COLLECT_MASKED_INPUT,
    STAGE_SHARE_KEYS,
    STAGE_UNMASK,
    DecodedSum,
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
    decode_sum,
    mask,
    pairwise_seed,
    pairwise_sign,
)


@dataclass(frozen=True, eq=False)
class ServerState:
    """Where the server is in one secure sum and who is still in it."""

    params: SecAggParams
    layout: VectorLayout
    stage: str  # the stage of the requests last sent (whose replies come next)
    sampled: tuple[int, ...]
    public_keys: Mapping[int, PublicKeys] = field(default_factory=dict)  # advertised keys (in the key round)
    sharers: tuple[int, ...] = ()  # sent their encrypted shares: their masks are in the others' inputs
    survivors: tuple[int, ...] = ()  # sent a masked input
    masked_sum: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class SecureSum:
    """What the server learns: the survivors' summed input (`result`), its integer form, who is in it."""

    result: DecodedSum
    total: np.ndarray
    sites: tuple[int, ...]
    dropped: tuple[int, ...]


def start(params: SecAggParams, layout: VectorLayout, node_ids: list[int]) -> tuple[ServerState, SecAggParams]:
    """Stage 1: the parameters every sampled site gets (`params.to_record()`)."""
    if len(set(node_ids)) != len(node_ids) or len(node_ids) != params.num_sites:
        raise SecAggError(f"secagg: {len(node_ids)} distinct sites sampled, the parameters say {params.num_sites}")
    return ServerState(params, layout, STAGE_ADVERTISE_KEYS, tuple(node_ids)), params


def share_keys(
    state: ServerState, replies: Mapping[int, PublicKeys]
) -> tuple[ServerState, dict[int, ShareKeysRequest]]:
    """Stage 2: every site that advertised keys gets the list of all advertised keys."""
    _expect(state, STAGE_ADVERTISE_KEYS)
    members = _members(state, replies, state.sampled, "advertised keys")
    keys = [k for nid in members for k in (replies[nid].mask_key, replies[nid].encryption_key)]
    if len(set(keys)) != len(keys):
        raise SecAggError("secagg: two sites advertised the same public key")
    public_keys = {nid: replies[nid] for nid in members}
    request = ShareKeysRequest(public_keys)
    return replace(state, stage=STAGE_SHARE_KEYS, public_keys=public_keys), {nid: request for nid in members}


def route_shares(
    state: ServerState, replies: Mapping[int, EncryptedShares]
) -> tuple[ServerState, dict[int, MaskedInputRequest]]:
    """Stage 3: forward each ciphertext to its recipient, among the sites that shared keys."""
    _expect(state, STAGE_SHARE_KEYS)
    sharers = _members(state, replies, tuple(state.public_keys), "shared keys")
    inbox: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in sharers}
    for src in sharers:
        reply = replies[src]
        expected = set(state.public_keys) - {src}
        if set(reply.destinations) != expected:
            raise SecAggError(f"secagg: site {src} sent shares to {sorted(reply.destinations)}, "
                              f"expected every other participant {sorted(expected)}")
        for dst, ciphertext in zip(reply.destinations, reply.ciphertexts):
            if dst in inbox:
                inbox[dst][0].append(src)
                inbox[dst][1].append(ciphertext)
    requests = {nid: MaskedInputRequest(tuple(srcs), tuple(cts)) for nid, (srcs, cts) in inbox.items()}
    return replace(state, stage=STAGE_COLLECT_MASKED_INPUT, sharers=sharers), requests


def request_unmask(
    state: ServerState, replies: Mapping[int, MaskedInput]
) -> tuple[ServerState, dict[int, UnmaskRequest]]:
    """Stage 4: sum the masked inputs; ask every survivor for the survivors' seed shares and the dropped sites'
    key shares."""
    _expect(state, STAGE_COLLECT_MASKED_INPUT)
    survivors = _members(state, replies, state.sharers, "sent a masked input")
    params, size = state.params, state.layout.size + 1
    total = np.zeros(size, dtype=np.uint64)
    for nid in survivors:
        vector = replies[nid].vector
        if vector.shape != (size,) or (vector.size and int(vector.max()) >= params.modulus):
            raise SecAggError(f"secagg: site {nid}'s masked input is not {size} integers below the modulus")
        total = add_mod(total, vector, params.modulus)
    dropped = tuple(nid for nid in state.sharers if nid not in survivors)
    request = UnmaskRequest(survivors, dropped)
    new = replace(state, stage=STAGE_UNMASK, survivors=survivors, masked_sum=total)
    return new, {nid: request for nid in survivors}


def unmask(state: ServerState, replies: Mapping[int, UnmaskShares]) -> SecureSum:
    """The end: rebuild the survivors' seeds and the dropped sites' mask keys from t shares each, remove their
    masks, and decode the sum."""
    _expect(state, STAGE_UNMASK)
    _members(state, replies, state.survivors, "answered the unmask request")
    params, size = state.params, state.layout.size + 1
    dropped = tuple(nid for nid in state.sharers if nid not in state.survivors)
    seed_shares: dict[int, list[bytes]] = {nid: [] for nid in state.survivors}
    key_shares: dict[int, list[bytes]] = {nid: [] for nid in dropped}
    for src, reply in replies.items():
        if set(reply.seed_shares) - set(seed_shares) or set(reply.key_shares) - set(key_shares):
            raise SecAggError(f"secagg: site {src} answered with shares that were not asked for")
        for owner, share in reply.seed_shares.items():
            seed_shares[owner].append(share)
        for owner, share in reply.key_shares.items():
            key_shares[owner].append(share)

    total = state.masked_sum
    for nid, shares in seed_shares.items():
        seed = _combine(shares, params.threshold, f"site {nid}'s self-mask seed")
        total = add_mod(total, mask(seed, size, params.modulus), params.modulus, sign=-1)
    for nid, shares in key_shares.items():
        secret = _combine(shares, params.threshold, f"dropped site {nid}'s mask key")
        try:
            rebuilt = public_key_to_bytes(bytes_to_private_key(secret).public_key())
        except ValueError:
            rebuilt = b""
        if rebuilt != state.public_keys[nid].mask_key:
            raise SecAggError(f"secagg: the shares of dropped site {nid}'s mask key do not rebuild it")
        for peer in state.survivors:  # each survivor added sign(peer, nid) x the pair's mask
            pair = mask(pairwise_seed(secret, state.public_keys[peer].mask_key), size, params.modulus)
            total = add_mod(total, pair, params.modulus, sign=-pairwise_sign(peer, nid))
    result = decode_sum(total, len(state.survivors), state.layout, params)
    return SecureSum(result, total, state.survivors, dropped)


def _expect(state: ServerState, stage: str) -> None:
    if state.stage != stage:
        raise SecAggError(f"secagg server: {stage!r} replies while waiting for {state.stage!r} ones (out of order)")


def _members(state: ServerState, replies: Mapping[int, object], asked: tuple[int, ...], what: str) -> tuple[int, ...]:
    """The sites of `asked` that replied, in `asked`'s order; refuses when fewer than the threshold did."""
    strangers = set(replies) - set(asked)
    if strangers:
        raise SecAggError(f"secagg: replies from {sorted(strangers)}, who were not asked")
    members = tuple(nid for nid in asked if nid in replies)
    if len(members) < state.params.threshold:
        raise SecAggError(
            f"secagg refused: only {len(members)} site(s) {what}, fewer than the threshold "
            f"{state.params.threshold}: the sum cannot be unmasked"
        )
    return members


def _combine(shares: list[bytes], threshold: int, what: str) -> bytes:
    if len(shares) < threshold:
        raise SecAggError(f"secagg refused: {len(shares)} share(s) of {what}, fewer than the threshold {threshold}")
    try:
        return combine_shares(shares[:threshold])
    except ValueError:
        raise SecAggError(f"secagg: the shares of {what} do not combine") from None


# --- over the grid ---------------------------------------------------------------------------------------------------


def sum_over_grid(grid: Grid, params: SecAggParams, layout: VectorLayout, nodes: list[int], server_round: int,
                  timeout: float, left: dict[int, str]) -> SecureSum:
    """The secure sum of the inputs `nodes` hold for `server_round`. `left` gets why each site left (node -> the
    reason), also when the sum fails (SecAggError: fewer than the threshold remain)."""
    state, request = start(params, layout, nodes)
    keys = _exchange(grid, {n: request.to_record() for n in nodes}, PublicKeys.from_record, server_round, timeout,
                     left)
    state, requests = share_keys(state, keys)
    shares = _exchange(grid, _records(requests), EncryptedShares.from_record, server_round, timeout, left)
    state, requests = route_shares(state, shares)
    masked = _exchange(grid, _records(requests), MaskedInput.from_record, server_round, timeout, left)
    state, requests = request_unmask(state, masked)
    answers = _exchange(grid, _records(requests), UnmaskShares.from_record, server_round, timeout, left)
    return unmask(state, answers)


def _records(requests: Mapping[int, object]) -> dict[int, ConfigRecord]:
    return {nid: request.to_record() for nid, request in requests.items()}


def _exchange(grid: Grid, records: Mapping[int, ConfigRecord], read: Callable[[ConfigRecord | ArrayRecord], object],
              server_round: int, timeout: float, left: dict[int, str]) -> dict[int, object]:
    """One stage: a request to each site, the readable replies by node id; the others' reasons into `left`."""
    stage = next(iter(records.values()))[STAGE] if records else "?"
    replies = grid.send_and_receive([wire.secagg_request(r, nid, server_round) for nid, r in records.items()],
                                    timeout=timeout)
    got: dict[int, object] = {}
    for msg in replies:
        nid = msg.metadata.src_node_id
        if nid not in records or nid in got:
            continue  # e.g. the SuperLink's stand-in for a site that went away: "no reply" below
        if msg.has_error():
            left[nid] = f"{stage}: {msg.error.reason}"
            continue
        try:
            got[nid] = read(wire.secagg_record(msg))
        except SecAggError as err:
            left[nid] = f"{stage}: unreadable reply ({err})"
    for nid in records:
        if nid not in got and nid not in left:
            left[nid] = f"{stage}: no reply"
    for nid in records:
        if nid not in got:
            log(WARNING, "equifed secure sum, round %d: node %d left at %s", server_round, nid, left[nid])
    return got
