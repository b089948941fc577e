"""Certificate tooling for mptun: a private CA plus server and client certificates.

mptun authenticates both ends of every DTLS session with X.509 certificates
issued by one private CA; the client certificate's CN is the client's identity.
This module makes those files with the ``cryptography`` library (no openssl
binary needed), writes keys so they are never readable by others, and checks a
certificate/key pair up front so a bad path or mismatched key gives one clear
error line instead of an OpenSSL traceback at handshake time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertError",
    "create_ca",
    "issue_server",
    "issue_client",
    "load_identity",
    "load_crl",
    "revoke",
    "key_mode_warning",
    "register",
]

StrPath = Union[str, "os.PathLike[str]"]
PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_CRL = "ca.crl"
KEY_TYPES = ("ec", "rsa")
RSA_SIZES = (2048, 3072)
CLOCK_SKEW = dt.timedelta(minutes=5)
# Names become file names (<name>.crt/.key) and the CN: keep them boring.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


class CertError(Exception):
    """A certificate problem, described in one human-readable line."""


# --------------------------------------------------------------------------
# file helpers


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertError(f"{what} {path} not found") from None
    except PermissionError:
        raise CertError(f"{what} {path} is not readable (permission denied)") from None
    except IsADirectoryError:
        raise CertError(f"{what} {path} is a directory, not a file") from None
    except OSError as e:
        raise CertError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _load_cert(path: Path, what: str = "certificate") -> x509.Certificate:
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertError(f"{what} {path} is not a valid PEM certificate") from None


def _load_key(path: Path, what: str = "key") -> PrivateKey:
    data = _read(path, what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted key and no password
        raise CertError(f"{what} {path} is encrypted; mptun needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertError(f"{what} {path} is not a valid PEM private key") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise CertError(f"{what} {path} is not an EC or RSA key")
    return key


def _spki(key: x509.Certificate | PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _prepare_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise CertError(f"{path} exists and is not a directory") from None
    except OSError as e:
        raise CertError(f"cannot create directory {path}: {e.strerror or e}") from None


def _refuse_overwrite(paths: Iterable[Path], force: bool) -> None:
    if force:
        return
    for p in paths:
        if os.path.lexists(p):
            raise CertError(f"{p} exists; use --force to overwrite")


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically via a temp file created with `mode`, so a key is never world-readable."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask may have cleared bits we want (0644 certs)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CertError(f"cannot write {path}: {e.strerror or e}") from None


def _save(directory: Path, stem: str, cert: x509.Certificate, key: PrivateKey) -> tuple[Path, Path]:
    crt_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_path, key_pem, 0o600)
    _write(crt_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return crt_path, key_path


# --------------------------------------------------------------------------
# certificate building


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise CertError(
            f"invalid name {name!r}: use 1-64 characters from letters, digits and ._@+- "
            "starting with a letter or digit (it becomes the file name and CN)"
        )
    if name == "ca":
        raise CertError("the name 'ca' is reserved for the CA's own ca.crt/ca.key")
    return name


def _new_key(key_type: str, rsa_bits: int) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        if rsa_bits not in RSA_SIZES:
            raise CertError(f"unsupported RSA key size {rsa_bits}; use one of {RSA_SIZES}")
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    raise CertError(f"unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}")


def _utc(t: dt.datetime) -> dt.datetime:
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)


def _validity(
    days: int, not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    """Default: valid from now minus clock skew for `days` days; explicit bounds win."""
    if days < 1:
        raise CertError(f"--days must be at least 1, not {days}")
    now = dt.datetime.now(dt.timezone.utc)
    lifetime = dt.timedelta(days=days)
    nb = _utc(not_before) if not_before is not None else None
    na = _utc(not_after) if not_after is not None else None
    if nb is None:
        nb = now - CLOCK_SKEW
        if na is not None and na <= nb:  # asked for an already-expired certificate
            nb = na - lifetime
    if na is None:
        na = max(nb, now) + lifetime
    if na <= nb:
        raise CertError(f"not_after ({na:%Y-%m-%d %H:%M}) must be after not_before ({nb:%Y-%m-%d %H:%M})")
    return nb, na


def _cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _key_usage(key: PrivateKey, *, ca: bool) -> x509.KeyUsage:
    is_ec = isinstance(key, ec.EllipticCurvePrivateKey)
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=not ca and not is_ec,  # RSA key exchange needs it
        data_encipherment=False,
        key_agreement=not ca and is_ec,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _san_entry(value: str) -> x509.GeneralName:
    value = value.strip()
    if not value:
        raise CertError("empty subject alternative name")
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    try:
        return x509.DNSName(value)
    except ValueError:
        raise CertError(f"invalid DNS name {value!r} in subject alternative names") from None


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, PrivateKey]:
    crt_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    for p in (crt_path, key_path):
        if not p.exists():
            raise CertError(f"CA file {p} not found; create a CA first with `mptun certs ca --dir {ca_dir}`")
    cert = _load_cert(crt_path, "CA certificate")
    key = _load_key(key_path, "CA key")
    if _spki(cert) != _spki(key):
        raise CertError(f"CA key {key_path} does not match CA certificate {crt_path}")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertError(f"{crt_path} is not a CA certificate")
    return cert, key


def create_ca(
    directory: StrPath,
    name: str = "mptun CA",
    days: int = 3650,
    force: bool = False,
    *,
    key_type: str = "ec",
    rsa_bits: int = 3072,
) -> tuple[Path, Path]:
    """Create a self-signed CA as directory/ca.crt and directory/ca.key."""
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 64:
        raise CertError(f"invalid CA name {name!r}: it must be 1-64 characters")
    not_before, not_after = _validity(days, None, None)
    out = Path(directory)
    _refuse_overwrite((out / CA_CERT, out / CA_KEY), force)
    key = _new_key(key_type, rsa_bits)
    _prepare_dir(out)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_cn(name))
        .issuer_name(_cn(name))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key, ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _save(out, "ca", cert, key)


def _issue(
    directory: StrPath,
    name: str,
    sans: list[x509.GeneralName],
    eku: x509.ObjectIdentifier,
    days: int,
    force: bool,
    *,
    ca_dir: StrPath | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key_type: str = "ec",
    rsa_bits: int = 3072,
) -> tuple[Path, Path]:
    """Issue directory/<name>.crt/.key signed by the CA in ``ca_dir`` (default: ``directory``),
    valid for ``days`` unless ``not_before``/``not_after`` say otherwise, with a new
    ``key_type`` ("ec" or "rsa" of ``rsa_bits``) key.  These keywords are the options of
    issue_server and issue_client too."""
    not_before, not_after = _validity(days, not_before, not_after)
    out = Path(directory)
    _refuse_overwrite((out / f"{name}.crt", out / f"{name}.key"), force)
    ca_cert, ca_key = _load_ca(Path(ca_dir) if ca_dir is not None else out)
    key = _new_key(key_type, rsa_bits)
    _prepare_dir(out)
    public = key.public_key()
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_cn(name))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(key, ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _save(out, name, cert, key)


def issue_server(
    directory: StrPath, name: str, sans: Iterable[str] = (), days: int = 825, force: bool = False, **options,
) -> tuple[Path, Path]:
    """Issue directory/<name>.crt/.key for a server (serverAuth); ``options`` as for _issue
    (ca_dir, not_before, not_after, key_type, rsa_bits).

    Each SAN is an IP address if it parses as one, else a DNS name; with no SANs
    the name itself is used. Clients check their `server_name` against these.
    """
    _check_name(name)
    entries = [_san_entry(s) for s in (list(sans) or [name])]
    return _issue(directory, name, entries, ExtendedKeyUsageOID.SERVER_AUTH, days, force, **options)


def issue_client(
    directory: StrPath, name: str, days: int = 825, force: bool = False, **options,
) -> tuple[Path, Path]:
    """Issue directory/<name>.crt/.key for a client (clientAuth); CN=name is its identity.
    ``options`` as for _issue (ca_dir, not_before, not_after, key_type, rsa_bits)."""
    _check_name(name)
    return _issue(directory, name, [x509.DNSName(name)], ExtendedKeyUsageOID.CLIENT_AUTH, days, force, **options)


def load_identity(cert_path: StrPath, key_path: StrPath) -> None:
    """Check that a certificate and its key exist, parse, and belong together."""
    cert_path, key_path = Path(cert_path), Path(key_path)
    cert = _load_cert(cert_path)
    key = _load_key(key_path)
    if _spki(cert) != _spki(key):
        raise CertError(f"key {key_path} does not match certificate {cert_path}")


# --------------------------------------------------------------------------
# revocation


def key_mode_warning(path: StrPath, own_groups: Iterable[int] = ()) -> str | None:
    """A warning line if the key file is readable (or writable) by group or others, else None.

    Group access is fine when the file's group is in ``own_groups``: the daemon's own
    unprivileged group (packaging/README.md: keys 0640 root:mptun).  Group root never is."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # loading the key reports that
    mode = st.st_mode & 0o7777
    if st.st_gid != 0 and st.st_gid in set(own_groups):
        mode &= ~0o070
    if not mode & 0o077:
        return None
    who = " and ".join(w for w, bits in (("group", 0o070), ("others", 0o007)) if mode & bits)
    return (f"key file {path} has mode {st.st_mode & 0o7777:04o}: accessible by {who}; "
            f"it should be 0600 (chmod 600 {path})")


def load_crl(path: StrPath, ca_path: StrPath) -> frozenset[int]:
    """The serial numbers a CRL revokes, after checking that the CA signed it.

    The CRL may be PEM or DER; its issuer must be the CA's subject and its
    signature must verify with the CA's key.  Raises CertError naming the file.
    """
    path, ca_path = Path(path), Path(ca_path)
    data = _read(path, "CRL")
    try:
        crl = x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
    except ValueError:
        raise CertError(f"CRL {path} is not a valid PEM or DER certificate revocation list") from None
    ca = _load_cert(ca_path, "CA certificate")
    if crl.issuer != ca.subject:
        raise CertError(
            f"CRL {path} is issued by '{crl.issuer.rfc4514_string()}', not by the CA "
            f"'{ca.subject.rfc4514_string()}' of {ca_path}"
        )
    try:
        valid = crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise CertError(f"CRL {path}: signature does not verify with the CA key of {ca_path}")
    return frozenset(r.serial_number for r in crl)


def crl_next_update(path: StrPath) -> dt.datetime | None:
    """When a (loadable) CRL says it will be replaced; None if it does not say."""
    data = Path(path).read_bytes()
    crl = x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
    return crl.next_update_utc


def revoke(
    directory: StrPath,
    certificates: Iterable[StrPath] = (),
    days: int = 30,
    *,
    crl_path: StrPath | None = None,
) -> tuple[Path, list[int]]:
    """Add the serials of ``certificates`` to the CA's CRL (directory/ca.crl), signed by the CA.

    An existing CRL is read (and checked) first, so revocations accumulate; with no
    certificates the CRL is only re-signed (a fresh next_update).  Returns the CRL
    path and the serials newly revoked.
    """
    if days < 1:
        raise CertError(f"--days must be at least 1, not {days}")
    ca_dir = Path(directory)
    ca_cert, ca_key = _load_ca(ca_dir)
    out = Path(crl_path) if crl_path is not None else ca_dir / CA_CRL
    now = dt.datetime.now(dt.timezone.utc)
    entries: dict[int, dt.datetime] = {}
    if out.exists():
        load_crl(out, ca_dir / CA_CERT)  # refuse to extend a CRL the CA did not sign
        data = out.read_bytes()
        old = x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
        entries = {r.serial_number: r.revocation_date_utc for r in old}
    added = []
    for c in certificates:
        cert = _load_cert(Path(c))
        if cert.issuer != ca_cert.subject:
            raise CertError(f"certificate {c} was not issued by the CA in {ca_dir}")
        if cert.serial_number not in entries:
            entries[cert.serial_number] = now
            added.append(cert.serial_number)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=days))
    )
    for serial, when in sorted(entries.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    _prepare_dir(out.parent)
    _write(out, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return out, added


# --------------------------------------------------------------------------
# CLI


_EKU_NAMES = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}


def _describe(path: Path) -> list[str]:
    cert = _load_cert(path)
    lines = [
        f"file:      {path}",
        f"subject:   {cert.subject.rfc4514_string()}",
        f"issuer:    {cert.issuer.rfc4514_string()}",
        f"serial:    {cert.serial_number:x}",
        f"valid:     {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
        f" .. {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
    ]
    now = dt.datetime.now(dt.timezone.utc)
    if now > cert.not_valid_after_utc:
        lines[-1] += "  (EXPIRED)"
    elif now < cert.not_valid_before_utc:
        lines[-1] += "  (NOT YET VALID)"
    public = cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        lines.append(f"key:       EC {public.curve.name}")
    elif isinstance(public, rsa.RSAPublicKey):
        lines.append(f"key:       RSA {public.key_size}")
    ext = cert.extensions
    for cls, label, fmt in (
        (x509.BasicConstraints, "ca", lambda v: "yes" if v.ca else "no"),
        (x509.SubjectAlternativeName, "sans", lambda v: ", ".join(str(n.value) for n in v)),
        (x509.ExtendedKeyUsage, "eku", lambda v: ", ".join(_EKU_NAMES.get(o, o.dotted_string) for o in v)),
    ):
        try:
            lines.append(f"{label + ':':<10} {fmt(ext.get_extension_for_class(cls).value)}")
        except x509.ExtensionNotFound:
            pass
    lines.append(f"sha256:    {cert.fingerprint(hashes.SHA256()).hex(':')}")
    return lines


def _cmd_ca(args: argparse.Namespace) -> list[str]:
    paths = create_ca(args.dir, args.name, args.days, args.force,
                      key_type=args.key_type, rsa_bits=args.rsa_bits)
    return [f"wrote {p}" for p in paths]


def _cmd_server(args: argparse.Namespace) -> list[str]:
    paths = issue_server(args.dir, args.name, args.san or (), args.days, args.force,
                         key_type=args.key_type, rsa_bits=args.rsa_bits)
    return [f"wrote {p}" for p in paths]


def _cmd_client(args: argparse.Namespace) -> list[str]:
    paths = issue_client(args.dir, args.name, args.days, args.force,
                         key_type=args.key_type, rsa_bits=args.rsa_bits)
    return [f"wrote {p}" for p in paths]


def _cmd_revoke(args: argparse.Namespace) -> list[str]:
    files = [Path(args.dir) / f"{n}.crt" for n in (args.name or [])] + [Path(f) for f in (args.cert or [])]
    path, added = revoke(args.dir, files, args.days, crl_path=args.crl)
    lines = [f"revoked serial {s:x}" for s in added]
    if files and not added:
        lines.append("already revoked")
    return lines + [f"wrote {path}"]


def _cmd_show(args: argparse.Namespace) -> list[str]:
    lines: list[str] = []
    for i, f in enumerate(args.file):
        lines += ([""] if i else []) + _describe(Path(f))
    return lines


def _runner(cmd: Callable[[argparse.Namespace], list[str]]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            lines = cmd(args)
        except CertError as e:
            print(f"mptun certs: error: {e}", file=sys.stderr)
            return 2
        for line in lines:
            print(line)
        return 0

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `certs` sub-command (ca, server, client, show) to an argparse parser."""
    certs = subparsers.add_parser(
        "certs",
        help="create a CA and server/client certificates",
        description="Create the private CA and the certificates mptun peers authenticate with.",
    )
    sub = certs.add_subparsers(dest="certs_command", metavar="COMMAND", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", required=True, metavar="DIR",
                        help="directory holding ca.crt/ca.key and the issued files")
    common.add_argument("--force", action="store_true", help="overwrite existing files")
    common.add_argument("--key-type", choices=KEY_TYPES, default="ec",
                        help="key algorithm (default: ec, P-256)")
    common.add_argument("--rsa-bits", type=int, choices=RSA_SIZES, default=3072,
                        help="RSA key size with --key-type rsa (default: 3072)")

    p = sub.add_parser("ca", parents=[common], help="create the CA (DIR/ca.crt, DIR/ca.key)")
    p.add_argument("--name", default="mptun CA", help="CA common name (default: %(default)s)")
    p.add_argument("--days", type=int, default=3650, help="validity in days (default: %(default)s)")
    p.set_defaults(func=_runner(_cmd_ca))

    p = sub.add_parser("server", parents=[common], help="issue a server certificate")
    p.add_argument("--name", required=True, help="server name: CN and file name DIR/NAME.crt/.key")
    p.add_argument("--san", action="append", metavar="S",
                   help="DNS name or IP clients use as server_name (repeatable; default: NAME)")
    p.add_argument("--days", type=int, default=825, help="validity in days (default: %(default)s)")
    p.set_defaults(func=_runner(_cmd_server))

    p = sub.add_parser("client", parents=[common], help="issue a client certificate")
    p.add_argument("--name", required=True,
                   help="client name: CN (matches [clients.NAME] on the server) and file name")
    p.add_argument("--days", type=int, default=825, help="validity in days (default: %(default)s)")
    p.set_defaults(func=_runner(_cmd_client))

    p = sub.add_parser("revoke", help="revoke certificates: add them to the CA's CRL (DIR/ca.crl)")
    p.add_argument("--dir", required=True, metavar="DIR", help="directory holding ca.crt/ca.key (and ca.crl)")
    p.add_argument("--name", action="append", metavar="NAME", help="revoke DIR/NAME.crt (repeatable)")
    p.add_argument("--cert", action="append", metavar="FILE", help="revoke this certificate file (repeatable)")
    p.add_argument("--crl", metavar="FILE", help="the CRL to create or extend (default: DIR/ca.crl)")
    p.add_argument("--days", type=int, default=30,
                   help="days until the CRL's nextUpdate (default: %(default)s); re-run to refresh")
    p.set_defaults(func=_runner(_cmd_revoke))

    p = sub.add_parser("show", help="print a certificate's subject, issuer, SANs, EKU and validity")
    p.add_argument("file", nargs="+", metavar="FILE", help="PEM certificate file")
    p.set_defaults(func=_runner(_cmd_show))
