"""Key material for a consortium, made with `cryptography` (no openssl binary needed).

- a private certificate authority (`ca.crt`, and `ca.key`, which is written outside the server's
  folder and kept offline): hospitals trust the server through it;
- the server's TLS certificate (`server.crt`, `server.key`) signed by the CA, valid for the
  host names and IP addresses the hospitals will dial.

The consortium never makes a hospital's key: each hospital makes its own SuperNode key pair
(`equifed-client keygen`: EC P-384 in OpenSSH format, the format Flower 1.42's
`flower-supernode --auth-supernode-private-key` and `flwr supernode register` read) and sends
only the public key, which `read_site_public_key` checks before it goes on the allow-list.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 825  # the longest lifetime common TLS clients accept for a server certificate


def _write_private(path: Path, data: bytes) -> None:
    """Private keys are readable by their owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when the file was there before with a wider mode
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _save_pair(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
               key_path: Path | None = None) -> tuple[Path, Path]:
    """Write <stem>.crt (PEM) and the key (owner-only; <stem>.key beside it unless `key_path`);
    return both paths."""
    crt_path, key_path = folder / f"{stem}.crt", Path(key_path) if key_path else folder / f"{stem}.key"
    folder.mkdir(parents=True, exist_ok=True)
    crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, _pem_key(key))
    return crt_path, key_path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "equifed consortium"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create_ca(folder: Path, key_path: Path, name: str = "equifed consortium CA") -> tuple[Path, Path]:
    """A self-signed CA certificate (`folder`/ca.crt) and its key (at `key_path`, which the
    caller puts outside the server's folder); returns (ca.crt, ca.key)."""
    folder = Path(folder)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name)).issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return _save_pair(folder, "ca", cert, key, key_path=key_path)


def create_server_cert(folder: Path, ca_crt: Path, ca_key: Path, hosts: list[str]) -> tuple[Path, Path]:
    """The SuperLink's TLS certificate, signed by the CA, with every host as a SAN
    (IP addresses as IP SANs, names as DNS SANs); returns (server.crt, server.key)."""
    if not hosts:
        raise ValueError("the server certificate needs at least one host name or IP address")
    folder = Path(folder)
    ca_cert = x509.load_pem_x509_certificate(Path(ca_crt).read_bytes())
    ca_private = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
        .sign(ca_private, hashes.SHA384())
    )
    return _save_pair(folder, "server", cert, key)


class PublicKeyError(ValueError):
    """A file that cannot go on the allow-list; the message says why."""


def read_site_public_key(path: Path) -> bytes:
    """A hospital's SuperNode public key as the allow-list stores it (`ecdsa-sha2-nistpNNN AAAA...`):
    an OpenSSH EC key on a NIST curve, the kind Flower's SuperNode authentication accepts.
    A private key is refused (it must never leave the hospital), as is anything else."""
    path = Path(path)
    if not path.is_file():
        raise PublicKeyError(f"public key {path} not found")
    data = path.read_bytes()
    if len(data) > 16_384:
        raise PublicKeyError(f"{path} is not an OpenSSH public key (too large)")
    if b"PRIVATE KEY" in data:
        raise PublicKeyError(f"{path} is a PRIVATE key: it must stay with the hospital. Ask for the .pub file "
                             f"that `equifed-client keygen` printed, and have the hospital make a new key pair "
                             f"(this one is no longer secret)")
    fields = data.split()
    try:
        key = serialization.load_ssh_public_key(b" ".join(fields[:2]))
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm) as err:
        raise PublicKeyError(f"{path} is not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)):
        raise PublicKeyError(f"{path}: Flower's SuperNode authentication needs an EC key on a NIST curve "
                             f"(make one with `equifed-client keygen`)")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def public_key_fingerprint(pub_path: Path) -> str:
    """SHA-256 of the key's bytes, to compare the allow-list with what a hospital holds
    (`equifed-client keygen` prints the same value)."""
    return "SHA256:" + hashlib.sha256(read_site_public_key(pub_path)).hexdigest()
