"""Secure aggregation (SecAgg+, Bell et al. 2020; Flower's protocol): what the sites and the server share.

The server learns the sum of the sites' vectors, never one site's. Each site sends one flat integer vector, its
quantised `weight x update` followed by its quantised weight, plus masks that cancel only in the sum, so the server
recovers the weighted sum and the sum of weights, and FedAvg's mean is their ratio.

Stages (one message each way per stage; the stage names are the STAGE_* constants):
1. advertise keys: the server sends the parameters; each site makes two fresh key pairs (one agrees pairwise mask
   seeds, one encrypts shares) from the OS and answers with the public halves.
2. share keys: the server sends every participant's public keys; each site draws a self-mask seed from the OS and
   splits it and its mask secret key into Shamir shares (threshold t), one per participant, each encrypted to its
   recipient. The server routes ciphertexts it cannot read.
3. collect masked input: the site decrypts the shares it holds and sends
   `quantised input + PRG(self seed) + sum over peers of +-PRG(pairwise seed)  mod modulus`; the pairwise masks
   cancel in the sum of all sites.
4. unmask: the server names survivors (sent a masked input) and dropped sites (shared keys, sent none); each
   survivor returns its shares of the survivors' self seeds and of the dropped sites' mask keys, never both for one
   site. With t shares of each the server removes the survivors' self masks and the dropped sites' pairwise masks.

Trust: an honest-but-curious server and at most t-1 sites colluding with it learn only the sum of the survivors'
inputs (t is the Shamir threshold). A site also refuses a threshold that is not a strict majority of the
participants, answers one unmask request per round and masks only with the shares of every site that shared keys
with it: then a server that lies about who dropped cannot collect t self-seed shares and t key shares of one site
from honest sites. Not covered: a server that swaps a site's public key for its own (keys are not signed) or
otherwise deviates actively (no signed consistency round). What the server still sees: who took
part, who dropped, the sum (weighted update and total weight), the vector's length and the timing.

Masks come from ChaCha20 keyed by HKDF of the seed (the `cryptography` library). Flower's `pseudo_rand_gen` is not
used: it folds a 32-byte seed into a 32-bit MT19937 seed, so a mask would be one of 2**32 and a curious server
could search for it. Everything else is Flower's primitives (`flwr.common.secure_aggregation`).
Records carry ints, bytes and a numpy array (loaded with allow_pickle=False): nothing is unpickled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

SECAGG = "secagg"  # the RecordDict key of a secure-aggregation message's record
ACTION = "secagg"  # the stages travel as train messages of this action (the ClientApp's @app.train(ACTION))
MESSAGE_TYPE = f"train.{ACTION}"
STAGE = "stage"
STAGE_ADVERTISE_KEYS = "advertise-keys"
STAGE_SHARE_KEYS = "share-keys"
STAGE_COLLECT_MASKED_INPUT = "collect-masked-input"
STAGE_UNMASK = "unmask"
STAGES = (STAGE_ADVERTISE_KEYS, STAGE_SHARE_KEYS, STAGE_COLLECT_MASKED_INPUT, STAGE_UNMASK)

_MASK_INFO = b"equifed secagg mask v1"
_MAX_KEY_BYTES = 4096  # a PEM public key is ~215 bytes; anything far larger is not one


class SecAggError(RuntimeError):
    """A refusal or a protocol violation; the text says which and why."""


# --- parameters --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecAggParams:
    """What every participant of one secure sum agrees on.

    Entries of `weight/max_weight x update` outside +-clipping_range are clipped; the quantum is
    2 clipping_range / quantization_range; `num_sites x quantization_range` must stay below the modulus so that
    the sum cannot wrap.
    """

    num_sites: int
    threshold: int
    clipping_range: float = 8.0
    quantization_range: int = 2**24
    modulus: int = 2**32
    max_weight: float = 10_000.0

    def __post_init__(self) -> None:
        for name in ("num_sites", "threshold", "quantization_range", "modulus"):
            if type(getattr(self, name)) is not int:
                raise SecAggError(f"secagg {name} must be an int, got {getattr(self, name)!r}")
        if self.num_sites < 2:
            raise SecAggError(f"secagg needs at least 2 sites, got {self.num_sites}")
        if not 2 <= self.threshold <= self.num_sites:
            raise SecAggError(f"secagg threshold must be in [2, {self.num_sites}], got {self.threshold}")
        if not (math.isfinite(self.clipping_range) and self.clipping_range > 0):
            raise SecAggError(f"secagg clipping range must be positive, got {self.clipping_range}")
        if not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise SecAggError(f"secagg max weight must be positive, got {self.max_weight}")
        if self.modulus < 2 or self.modulus > 2**32 or self.modulus & (self.modulus - 1):
            raise SecAggError(f"secagg modulus must be a power of two <= 2**32, got {self.modulus}")
        if not 2 <= self.quantization_range < 2**31:
            raise SecAggError(f"secagg quantization range must be in [2, 2**31), got {self.quantization_range}")
        if self.num_sites * self.quantization_range >= self.modulus:
            raise SecAggError(
                f"secagg sum of {self.num_sites} sites could wrap: num_sites x quantization_range "
                f"({self.num_sites * self.quantization_range}) must stay below the modulus ({self.modulus})"
            )

    @classmethod
    def majority(cls, num_sites: int, **kwargs: Any) -> "SecAggParams":
        """Parameters with the smallest threshold a site accepts: a strict majority of the sites."""
        return cls(num_sites=num_sites, threshold=num_sites // 2 + 1, **kwargs)

    @classmethod
    def for_weights(cls, weights: list[float], **kwargs: Any) -> "SecAggParams":
        """Majority parameters for sites of these weights (their reported num-examples): max-weight is the
        smallest power of two >= the largest, so the largest site's quantised weight keeps at least half of the
        quantisation range (a larger bound would only coarsen every site's input)."""
        if len(weights) < 2:
            raise SecAggError(f"secagg needs at least 2 sites, got {len(weights)}")
        usable = [w for w in weights if math.isfinite(w) and w > 0]
        if len(usable) != len(weights):
            raise SecAggError(f"secagg weights must be positive numbers, got {weights}")
        return cls.majority(len(weights), max_weight=float(2 ** max(0, math.ceil(math.log2(max(usable))))), **kwargs)

    @property
    def quantum(self) -> float:
        return 2 * self.clipping_range / self.quantization_range

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({
            STAGE: STAGE_ADVERTISE_KEYS,
            "num-sites": self.num_sites,
            "threshold": self.threshold,
            "clipping-range": float(self.clipping_range),
            "quantization-range": self.quantization_range,
            "modulus": self.modulus,
            "max-weight": float(self.max_weight),
        })

    @classmethod
    def from_record(cls, record: ConfigRecord) -> "SecAggParams":
        _check_stage(record, STAGE_ADVERTISE_KEYS)
        return cls(
            num_sites=_int(record, "num-sites"),
            threshold=_int(record, "threshold"),
            clipping_range=_float(record, "clipping-range"),
            quantization_range=_int(record, "quantization-range"),
            modulus=_int(record, "modulus"),
            max_weight=_float(record, "max-weight"),
        )


# --- the vector: packing, quantisation, masks --------------------------------------------------------------------


@dataclass(frozen=True)
class VectorLayout:
    """Names and shapes of the arrays in a flat vector. Site and server build it from the same global model
    (the request's ArrayRecord), so both read the vector in the same order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, arrays: Mapping[str, Any]) -> "VectorLayout":
        return cls(tuple(arrays), tuple(tuple(_numpy(v).shape) for v in arrays.values()))

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def flatten(self, arrays: Mapping[str, Any]) -> np.ndarray:
        if set(arrays) != set(self.names):
            raise SecAggError(f"secagg arrays {sorted(set(arrays) ^ set(self.names))} do not match the layout")
        parts = []
        for name, shape in zip(self.names, self.shapes):
            value = _numpy(arrays[name])
            if value.shape != shape or not np.issubdtype(value.dtype, np.floating):
                raise SecAggError(f"secagg array {name!r}: {value.dtype}{value.shape}, expected float{shape}")
            parts.append(value.astype(np.float64).ravel())
        return np.concatenate(parts) if parts else np.zeros(0)

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        if vector.shape != (self.size,):
            raise SecAggError(f"secagg vector of {vector.shape} does not fit a layout of {self.size}")
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = math.prod(shape)
            out[name] = vector[start : start + n].reshape(shape)
            start += n
        return out


def encode(arrays: Mapping[str, Any], weight: float, layout: VectorLayout, params: SecAggParams) -> np.ndarray:
    """A site's input: `weight x arrays` quantised, then the weight, as integers in [0, quantization_range].

    The weight is quantised first and the arrays are scaled by that quantised weight, so the weighted sum and
    the sum of weights the server recovers belong to the same weights."""
    ratio = float(weight) / params.max_weight
    if not 0.0 <= ratio <= 1.0:
        raise SecAggError(f"secagg weight {weight} outside [0, max-weight={params.max_weight}]")
    q_weight = round(ratio * params.quantization_range)
    scaled = layout.flatten(arrays) * (q_weight / params.quantization_range)
    (q_values,) = quantize([scaled], params.clipping_range, params.quantization_range)
    return np.append(q_values.astype(np.int64), np.int64(q_weight))


@dataclass(frozen=True, eq=False)
class DecodedSum:
    """The consortium's sum: sum of weight x arrays, and the sum of weights (both in the weights' own units)."""

    weighted_sum: dict[str, np.ndarray]
    total_weight: float

    def mean(self) -> dict[str, np.ndarray]:
        """FedAvg's weighted mean."""
        if self.total_weight <= 0:
            raise SecAggError("secagg total weight is zero: no mean")
        return {k: v / self.total_weight for k, v in self.weighted_sum.items()}


def decode_sum(total: np.ndarray, num_inputs: int, layout: VectorLayout, params: SecAggParams) -> DecodedSum:
    """The sum of `num_inputs` sites' `encode` outputs (unmasked, mod the modulus) back to floats."""
    total = np.asarray(total)
    if total.shape != (layout.size + 1,):
        raise SecAggError(f"secagg sum of length {total.shape} does not fit a layout of {layout.size} + 1")
    (values,) = dequantize([total[:-1].astype(np.int64)], params.clipping_range, params.quantization_range)
    values = (values - (num_inputs - 1) * params.clipping_range) * params.max_weight  # each input was shifted by +c
    total_weight = float(total[-1]) / params.quantization_range * params.max_weight
    return DecodedSum(layout.unflatten(values), total_weight)


def mask(seed: bytes, size: int, modulus: int) -> np.ndarray:
    """`size` integers uniform in [0, modulus) expanded from `seed` (ChaCha20 keyed by HKDF-SHA256 of it)."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_MASK_INFO).derive(seed)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(4 * size))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint64) & np.uint64(modulus - 1)


def pairwise_seed(own_secret_key: bytes, peer_public_key: bytes) -> bytes:
    """The seed two sites agree on (ECDH + HKDF, Flower's `generate_shared_key`); the server learns it only
    from t shares of a dropped site's secret key."""
    return generate_shared_key(bytes_to_private_key(own_secret_key), bytes_to_public_key(peer_public_key))


def pairwise_sign(own: int, peer: int) -> int:
    """+1 for the site with the larger node id, -1 for the other: the pair's masks cancel in the sum."""
    return 1 if own > peer else -1


def add_mod(a: np.ndarray, b: np.ndarray, modulus: int, sign: int = 1) -> np.ndarray:
    """a + sign x b mod modulus on uint64 (the modulus is a power of two, so wrapping in 2**64 is harmless)."""
    a, b = a.astype(np.uint64, copy=False), b.astype(np.uint64, copy=False)
    return ((a + b) if sign > 0 else (a - b)) & np.uint64(modulus - 1)


# --- the messages of each stage -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublicKeys:
    """A site's reply to advertise-keys: the public halves of its mask-agreement and encryption key pairs (PEM)."""

    mask_key: bytes
    encryption_key: bytes

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({STAGE: STAGE_ADVERTISE_KEYS, "mask-key": self.mask_key,
                             "encryption-key": self.encryption_key})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> "PublicKeys":
        _check_stage(record, STAGE_ADVERTISE_KEYS)
        return cls(_key(record, "mask-key"), _key(record, "encryption-key"))


@dataclass(frozen=True)
class ShareKeysRequest:
    """Every participant's public keys, by node id."""

    public_keys: Mapping[int, PublicKeys]

    def to_record(self) -> ConfigRecord:
        ids = list(self.public_keys)
        return ConfigRecord({
            STAGE: STAGE_SHARE_KEYS,
            "node-ids": ids,
            "mask-keys": [self.public_keys[i].mask_key for i in ids],
            "encryption-keys": [self.public_keys[i].encryption_key for i in ids],
        })

    @classmethod
    def from_record(cls, record: ConfigRecord) -> "ShareKeysRequest":
        _check_stage(record, STAGE_SHARE_KEYS)
        ids = _ids(record, "node-ids")
        masks, encs = _keys(record, "mask-keys", len(ids)), _keys(record, "encryption-keys", len(ids))
        return cls({i: PublicKeys(m, e) for i, m, e in zip(ids, masks, encs)})


@dataclass(frozen=True)
class EncryptedShares:
    """A site's reply to share-keys: one ciphertext per other participant, readable only by it."""

    destinations: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({STAGE: STAGE_SHARE_KEYS, "destinations": list(self.destinations),
                             "ciphertexts": list(self.ciphertexts)})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> "EncryptedShares":
        _check_stage(record, STAGE_SHARE_KEYS)
        dsts = _ids(record, "destinations")
        return cls(tuple(dsts), tuple(_bytes_list(record, "ciphertexts", len(dsts))))


@dataclass(frozen=True)
class MaskedInputRequest:
    """The ciphertexts addressed to one site, with the node id each came from."""

    sources: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({STAGE: STAGE_COLLECT_MASKED_INPUT, "sources": list(self.sources),
                             "ciphertexts": list(self.ciphertexts)})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> "MaskedInputRequest":
        _check_stage(record, STAGE_COLLECT_MASKED_INPUT)
        srcs = _ids(record, "sources")
        return cls(tuple(srcs), tuple(_bytes_list(record, "ciphertexts", len(srcs))))


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """A site's masked vector (uint32 entries in [0, modulus)): uniform on its own."""

    vector: np.ndarray

    def to_record(self) -> ArrayRecord:
        return ArrayRecord({"masked-input": Array(np.ascontiguousarray(self.vector, dtype=np.uint32))})

    @classmethod
    def from_record(cls, record: ArrayRecord) -> "MaskedInput":
        if list(record) != ["masked-input"]:
            raise SecAggError(f"secagg masked input record holds {list(record)}, expected ['masked-input']")
        try:
            vector = record["masked-input"].numpy()
        except (AttributeError, TypeError, ValueError) as err:  # not an array, or bytes that do not parse
            raise SecAggError(f"secagg masked input does not read as an array: {err}") from None
        if vector.dtype != np.uint32 or vector.ndim != 1:
            raise SecAggError(f"secagg masked input is {vector.dtype}{vector.shape}, expected a uint32 vector")
        return cls(vector)


@dataclass(frozen=True)
class UnmaskRequest:
    """Who sent a masked input (their self-seed shares are wanted) and who shared keys but sent none (their
    mask-key shares are wanted)."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({STAGE: STAGE_UNMASK, "survivors": list(self.survivors),
                             "dropped": list(self.dropped)})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> "UnmaskRequest":
        _check_stage(record, STAGE_UNMASK)
        return cls(tuple(_ids(record, "survivors")), tuple(_ids(record, "dropped")))


@dataclass(frozen=True)
class UnmaskShares:
    """A survivor's reply: its Shamir shares of the survivors' self seeds and of the dropped sites' mask keys."""

    seed_shares: Mapping[int, bytes]
    key_shares: Mapping[int, bytes]

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({
            STAGE: STAGE_UNMASK,
            "seed-owners": list(self.seed_shares), "seed-shares": list(self.seed_shares.values()),
            "key-owners": list(self.key_shares), "key-shares": list(self.key_shares.values()),
        })

    @classmethod
    def from_record(cls, record: ConfigRecord) -> "UnmaskShares":
        _check_stage(record, STAGE_UNMASK)
        seeds, keys = _ids(record, "seed-owners"), _ids(record, "key-owners")
        return cls(dict(zip(seeds, _bytes_list(record, "seed-shares", len(seeds)))),
                   dict(zip(keys, _bytes_list(record, "key-shares", len(keys)))))


# --- strict record readers ----------------------------------------------------------------------------------------


def _numpy(value: Any) -> np.ndarray:
    """A torch tensor, a Flower Array or an array-like as numpy."""
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return value.numpy() if isinstance(value, Array) else np.asarray(value)


def _get(record: ConfigRecord, key: str) -> Any:
    if key not in record:
        raise SecAggError(f"secagg record has no {key!r}")
    return record[key]


def _check_stage(record: ConfigRecord, stage: str) -> None:
    if _get(record, STAGE) != stage:
        raise SecAggError(f"secagg expected a {stage!r} record, got {record[STAGE]!r}")


def _int(record: ConfigRecord, key: str) -> int:
    value = _get(record, key)
    if type(value) is not int:
        raise SecAggError(f"secagg {key!r} must be an int, got {value!r}")
    return value


def _float(record: ConfigRecord, key: str) -> float:
    value = _get(record, key)
    if type(value) is not float:
        raise SecAggError(f"secagg {key!r} must be a float, got {value!r}")
    return value


def _ids(record: ConfigRecord, key: str) -> list[int]:
    value = _get(record, key)
    if not isinstance(value, list) or any(type(v) is not int or v < 0 for v in value):
        raise SecAggError(f"secagg {key!r} must be a list of node ids")
    if len(set(value)) != len(value):
        raise SecAggError(f"secagg {key!r} names a node twice")
    return value


def _bytes_list(record: ConfigRecord, key: str, length: int) -> list[bytes]:
    value = _get(record, key)
    if not isinstance(value, list) or any(type(v) is not bytes for v in value) or len(value) != length:
        raise SecAggError(f"secagg {key!r} must be a list of {length} bytes values")
    return value


def _key(record: ConfigRecord, key: str) -> bytes:
    value = _get(record, key)
    if type(value) is not bytes or not 0 < len(value) <= _MAX_KEY_BYTES:
        raise SecAggError(f"secagg {key!r} must be a public key (PEM bytes)")
    return value


def _keys(record: ConfigRecord, key: str, length: int) -> list[bytes]:
    values = _bytes_list(record, key, length)
    if any(not 0 < len(v) <= _MAX_KEY_BYTES for v in values):
        raise SecAggError(f"secagg {key!r} must hold public keys (PEM bytes)")
    return values
