"""TLS for the broker: a private CA for sites without their own PKI, and the
AppStore's side of TLS (its own client settings, the CA handed to nodes).

``aidc store broker-certs`` calls :func:`ensure_broker_certs`, which keeps in
``<data_dir>/broker/tls/``:

- ``ca.pem`` / ``ca.key``: the CA (ECDSA P-256, 10 years). Made once and never
  overwritten: every node trusts it (enrolment hands ``ca.pem`` out). One that
  cannot be read, whose key does not match or that has expired is an error that
  says what to do, never silently replaced.
- ``server.pem`` / ``server.key``: the broker's certificate (825 days), signed
  by the CA, with the host names and IP addresses the nodes connect to as its
  subjectAltName. Made again when the names asked for differ, when it expires
  within :data:`RENEW_BEFORE_DAYS`, or when it is not the CA's.

Keys are mode 0600 (the server key 0640 with ``group``, for a broker that runs
as another user); certificates 0644. Each file is written atomically.

:func:`issue_client_cert` signs client certificates with the same CA, for a
broker that asks for one (``require_certificate true``, mutual TLS).
"""

from __future__ import annotations

import datetime as dt
import grp
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud_sync.atomic import write_atomic
from cloud_sync.connection import Tls, TlsError

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import AppStoreConfig

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

CA_DAYS = 3650
SERVER_DAYS = 825
#: a server certificate this close to its end is made again
RENEW_BEFORE_DAYS = 30
#: a CA this close to its end is warned about (replacing it means every node
#: must be given the new one)
CA_WARN_DAYS = 180


@dataclass
class BrokerCerts:
    """Where the files are, and what :func:`ensure_broker_certs` did."""

    dir: Path
    ca_created: bool = False
    #: "created", "renewed" or "kept"
    server: str = "kept"
    #: why the server certificate was made again
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"


def tls_dir(cfg: AppStoreConfig) -> Path:
    return cfg.data_dir / "broker" / "tls"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pub(key: ec.EllipticCurvePrivateKey | x509.Certificate) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def split_names(names: list[str]) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) of ``names``; each checked."""
    dns, ips = [], []
    for n in names:
        n = n.strip()
        try:
            ips.append(str(ipaddress.ip_address(n)))
            continue
        except ValueError:
            pass
        labels = n.rstrip(".").split(".")
        if not n or len(n) > 253 or not all(
                0 < len(lb) <= 63 and lb.replace("-", "").replace("_", "").isalnum()
                and lb.isascii() and not lb.startswith("-") for lb in labels):
            raise ConfigError("bad_host", f"{n!r} is neither a host name nor an IP address")
        dns.append(n.lower().rstrip("."))
    return sorted(set(dns)), sorted(set(ips), key=ipaddress.ip_address)


def _sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    dns = sorted({d.lower() for d in ext.get_values_for_type(x509.DNSName)})
    ips = sorted({str(i) for i in ext.get_values_for_type(x509.IPAddress)},
                 key=ipaddress.ip_address)
    return dns, ips


def _load_ca(d: BrokerCerts, now: dt.datetime) -> tuple[x509.Certificate,
                                                         ec.EllipticCurvePrivateKey]:
    fix = (f"move {d.dir} away to make a new CA -- and then give every node the new "
           f"{d.ca_cert.name} (enrol it again, or copy it to its mqtt.ca_file)")
    try:
        cert = x509.load_pem_x509_certificate(d.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(d.ca_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError("bad_ca", f"the broker CA in {d.dir} cannot be used ({err}); "
                          f"{fix}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey) and not hasattr(key, "sign"):
        raise ConfigError("bad_ca", f"{d.ca_key}: not a signing key; {fix}")
    if _pub(key) != _pub(cert):  # type: ignore[arg-type]
        raise ConfigError("bad_ca", f"{d.ca_key} is not the key of {d.ca_cert}; {fix}")
    if cert.not_valid_after_utc <= now:
        raise ConfigError("ca_expired", f"the broker CA {d.ca_cert} expired on "
                          f"{cert.not_valid_after_utc:%Y-%m-%d}; {fix}")
    left = cert.not_valid_after_utc - now
    if left < dt.timedelta(days=CA_WARN_DAYS):
        d.warnings.append(f"the broker CA {d.ca_cert} expires on "
                          f"{cert.not_valid_after_utc:%Y-%m-%d} ({left.days} days)")
    return cert, key  # type: ignore[return-value]


def _make_ca(d: BrokerCerts, now: dt.datetime, common_name: str) -> tuple[
        x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aidc"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    write_atomic(d.ca_key, _key_pem(key), mode=0o600)
    write_atomic(d.ca_cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    d.ca_created = True
    return cert, key


def _server_ok(d: BrokerCerts, ca: x509.Certificate, dns: list[str], ips: list[str],
               now: dt.datetime) -> str:
    """Why the server certificate must be made again ("" when it is fine)."""
    try:
        cert = x509.load_pem_x509_certificate(d.server_cert.read_bytes())
        key = serialization.load_pem_private_key(d.server_key.read_bytes(), password=None)
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, TypeError) as err:
        return f"unreadable ({err})"
    if _pub(key) != _pub(cert):  # type: ignore[arg-type]
        return "its key does not match"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "not signed by this CA"
    have = _sans(cert)
    if have != (dns, ips):
        return (f"names changed: {', '.join(have[0] + have[1]) or '(none)'} -> "
                f"{', '.join(dns + ips)}")
    if cert.not_valid_after_utc - now < dt.timedelta(days=RENEW_BEFORE_DAYS):
        return f"expires on {cert.not_valid_after_utc:%Y-%m-%d}"
    return ""


def _make_server(d: BrokerCerts, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                 dns: list[str], ips: list[str], now: dt.datetime,
                 group: str | None) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cn = (dns + ips)[0]
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aidc"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=SERVER_DAYS), ca.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True,
                                         key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    # the key first: a crash in between leaves a pair that does not match, which
    # the next run sees and mends
    write_atomic(d.server_key, _key_pem(key), mode=0o640 if group else 0o600, group=group)
    write_atomic(d.server_cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def ensure_broker_certs(directory: Path, names: list[str], *, group: str | None = None,
                        now: dt.datetime | None = None,
                        ca_name: str = "aidc broker CA") -> BrokerCerts:
    """Make (or keep) the CA and the broker's certificate for ``names`` (host
    names and IP addresses) in ``directory``. See the module's docstring."""
    if not names:
        raise ConfigError("bad_host", "say which names the broker is reached by "
                          "(--host NAME or --host IP, repeatable)")
    dns, ips = split_names(names)
    now = now or _now()
    directory = Path(os.path.abspath(directory))  # Mosquitto's config wants full paths
    if group is not None:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise ConfigError("bad_group", f"no such group {group!r}") from None
    d = BrokerCerts(dir=directory, names=dns + ips)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as err:
        raise ConfigError("bad_dir", f"cannot create {directory}: {err}") from err
    if d.ca_cert.exists() or d.ca_key.exists():
        ca, ca_key = _load_ca(d, now)
    else:
        ca, ca_key = _make_ca(d, now, ca_name)
    why = _server_ok(d, ca, dns, ips, now)
    if why:
        _make_server(d, ca, ca_key, dns, ips, now, group)
        d.server = "created" if why == "missing" else "renewed"
        d.reason = why
        logger.info("broker certificate %s (%s) for %s", d.server, why, ", ".join(d.names))
    elif group and os.stat(d.server_key).st_mode & 0o777 != 0o640:
        write_atomic(d.server_key, d.server_key.read_bytes(), mode=0o640, group=group)
    return d


def issue_client_cert(d: BrokerCerts, name: str, *, now: dt.datetime | None = None) -> tuple[
        Path, Path]:
    """A client certificate (CN ``name``, clientAuth) signed by the CA in ``d``, for a
    broker with ``require_certificate true``: ``clients/<name>.pem`` and
    ``clients/<name>.key`` (0600), made anew each time. Returns (cert, key)."""
    if not NAME_RE.match(name):
        raise ConfigError("bad_client", f"client name {name!r}: 1-64 of letters, digits, "
                          "'_', '-', '.'")
    now = now or _now()
    ca, ca_key = _load_ca(d, now)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aidc"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=SERVER_DAYS), ca.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = d.dir / "clients" / f"{name}.pem", d.dir / "clients" / f"{name}.key"
    write_atomic(key_path, _key_pem(key), mode=0o600)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert_path, key_path


def listener_lines(d: BrokerCerts, port: int = 8883, require_certificate: bool = False) -> str:
    """The Mosquitto listener that serves ``d`` (TLS 1.2 or later)."""
    lines = [f"listener {port}", f"cafile {d.ca_cert}", f"certfile {d.server_cert}",
             f"keyfile {d.server_key}", "tls_version tlsv1.2"]
    if require_certificate:
        lines += ["require_certificate true"]
    return "\n".join(lines) + "\n"


# -- the AppStore's side ---------------------------------------------------------------
def default_ca_file(cfg: AppStoreConfig) -> Path:
    return tls_dir(cfg) / "ca.pem"


def client_tls(cfg: AppStoreConfig) -> Tls | None:
    """The AppStore's own TLS to the broker (``mqtt_tls``), its files checked
    now: a :class:`ConfigError` names the one that cannot be used. The CA that
    enrolment hands to nodes is checked here too."""
    if cfg.enrolment is not None and node_tls(cfg):
        broker_ca_pem(cfg)
    if not cfg.mqtt_tls:
        return None
    tls = Tls(ca_file=cfg.mqtt_ca_file, cert_file=cfg.mqtt_cert_file,
              key_file=cfg.mqtt_key_file, check_hostname=cfg.mqtt_tls_check_hostname)
    try:
        tls.context()
    except TlsError as err:
        raise ConfigError("bad_tls", f"mqtt_tls: {err}"
                          + (" (make it with `aidc store broker-certs`)"
                             if cfg.mqtt_ca_file == default_ca_file(cfg) else "")) from err
    return tls


def node_tls(cfg: AppStoreConfig) -> bool:
    """Do enrolled nodes reach the broker over TLS (``enrolment.broker_url``
    is ``mqtts://``)?"""
    e = cfg.enrolment
    return bool(e and e.broker_url and e.broker_url.startswith("mqtts://"))


def broker_ca_pem(cfg: AppStoreConfig) -> str:
    """The CA certificate(s) enrolled nodes are told to trust (PEM)."""
    e = cfg.enrolment
    assert e is not None and e.broker_ca_file is not None
    path = e.broker_ca_file
    try:
        text = path.read_text()
        certs = x509.load_pem_x509_certificates(text.encode())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ConfigError("bad_tls", f"enrolment.broker_ca_file {path}: the CA handed to "
                          f"nodes cannot be used ({err}); make it with `aidc store "
                          "broker-certs` or point enrolment.broker_ca_file at yours") from err
    if not certs:
        raise ConfigError("bad_tls", f"enrolment.broker_ca_file {path}: no certificate")
    return text
