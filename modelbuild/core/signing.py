"""Builder keys and the signatures of cache entries (issue #24, items 1-3).

A key is an ECDSA P-256 key pair (``cryptography``): the curve and PEM files that OpenSSF
model-signing's ``key`` method reads, so the same key can sign a release later. ``generate``
writes ``modelbuild.key`` (PKCS#8 PEM, mode 0600, never overwritten) and ``modelbuild.pub``
(SubjectPublicKeyInfo PEM). A key's id is the first 16 hex digits of the sha256 of its raw
public key (the uncompressed X9.62 point): what messages, ``cache info`` and signatures name.

What a signature covers (``payload``): the canonical JSON (sorted keys, no spaces, ASCII) of
exactly the action key, the key components, the manifest and the signer's key id. It is stored
in the entry itself, as its ``signature`` field (``{"signer", "algorithm", "value"}``, value:
base64 DER ECDSA over sha256), so the entry and its signature go up in one PUT and can never
be separated or mismatched by a race. Objects are not signed: they are named by their content,
and the signed manifest names them.

The private key is read from its file when an entry is signed and held only in memory: it is
never an argument to a pass, never in a ``Settings`` object (which holds the path), a stamp,
a lock, a message, the cache or the bucket.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from .. import UserError

KEY_FILE, PUB_FILE = "modelbuild.key", "modelbuild.pub"
ALGORITHM = "ecdsa-p256-sha256"


def _ec():
    from cryptography.hazmat.primitives.asymmetric import ec  # imported only where keys are used

    return ec


def _raw_public(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def key_id(public_key) -> str:
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


class Signer:
    """The builder's private key, loaded from its file; ``repr`` shows the id only."""

    def __init__(self, private_key, path: Path):
        self._key = private_key
        self.path = path
        self.public = private_key.public_key()
        self.key_id = key_id(self.public)

    def __repr__(self) -> str:
        return f"Signer({self.key_id})"

    def __reduce__(self):  # never pickled (a Ray task, a cache): the key stays in this process
        raise TypeError("a signing key is not pickled")

    def sign(self, entry: dict) -> dict:
        from cryptography.hazmat.primitives import hashes

        value = self._key.sign(payload(entry, self.key_id), _ec().ECDSA(hashes.SHA256()))
        return {"signer": self.key_id, "algorithm": ALGORITHM, "value": base64.b64encode(value).decode()}


def payload(entry: dict, signer: str) -> bytes:
    """The bytes a signature covers: the action key, key components, manifest and signer id."""
    body = {"action_key": entry.get("action_key"), "components": entry.get("components"),
            "manifest": entry.get("manifest"), "signer": signer}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def signed(entry: dict, signer: Signer | None) -> dict:
    """The entry as it goes to the remote: any old signature removed, a new one added by ``signer``."""
    body = {k: v for k, v in entry.items() if k != "signature"}
    if signer is not None:
        body["signature"] = signer.sign(body)
    return body


def unsigned(entry: dict) -> dict:
    """An entry without its signature (what a stamp and the local tier keep)."""
    return {k: v for k, v in entry.items() if k != "signature"}


def signature_problem(entry: dict, trusted: dict) -> tuple[str | None, str | None]:
    """(problem, signer id): problem is None when ``entry`` carries a valid signature by a key in
    ``trusted`` (key id -> public key); else ``unsigned entry``, ``untrusted signer ID`` or
    ``bad signature (signer ID)``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes

    sig = entry.get("signature")
    if not isinstance(sig, dict) or not sig:
        return "unsigned entry", None
    signer = sig.get("signer")
    if not isinstance(signer, str) or not isinstance(sig.get("value"), str) or sig.get("algorithm") != ALGORITHM:
        return "malformed signature", None
    signer = signer[:16]
    if signer not in trusted:
        return f"untrusted signer {signer}", signer
    try:
        value = base64.b64decode(sig["value"], validate=True)
        trusted[signer].verify(value, payload(entry, signer), _ec().ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return f"bad signature (signer {signer})", signer
    return None, signer


# -- key files ----------------------------------------------------------------------------

def generate(folder: Path) -> str:
    """Write ``folder/modelbuild.key`` (0600, refused if it exists) and ``modelbuild.pub``; the id."""
    from cryptography.hazmat.primitives import serialization

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / KEY_FILE, folder / PUB_FILE
    for path in (private, public):
        if path.exists():
            raise UserError(f"{path}: already exists; a key is never overwritten (choose another folder)")
    key = _ec().generate_private_key(_ec().SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # private from its first byte
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    os.chmod(private, 0o600)  # whatever the umask
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_id(key.public_key())


def _read(path: Path, where: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{where}: {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{where}: {path}: a folder, not a key file") from None
    except OSError as error:
        raise UserError(f"{where}: {path}: cannot be read ({error.strerror})") from None


def load_signer(path: Path, where: str) -> Signer:
    """The private key at ``path`` (``where``: the variable or TOML key that named it); anything
    but an unencrypted PEM P-256 private key is one line (never quoting the file)."""
    from cryptography.hazmat.primitives import serialization

    data = _read(path, where)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except Exception:  # ValueError, TypeError, UnsupportedAlgorithm: never echo the bytes
        raise UserError(f"{where}: {path}: not an unencrypted PEM private key (make one with "
                        "`python -m modelbuild keys generate DIR`)") from None
    if not isinstance(key, _ec().EllipticCurvePrivateKey) or not isinstance(key.curve, _ec().SECP256R1):
        raise UserError(f"{where}: {path}: not an ECDSA P-256 key (make one with `python -m modelbuild keys generate DIR`)")
    return Signer(key, Path(path))


def load_public(path: Path, where: str):
    """The public key at ``path``: a PEM P-256 public key (a .pub file), else one line."""
    from cryptography.hazmat.primitives import serialization

    data = _read(path, where)
    try:
        key = serialization.load_pem_public_key(data)
    except Exception:  # as above
        raise UserError(f"{where}: {path}: not a PEM public key (give the .pub file of "
                        "`python -m modelbuild keys generate DIR`)") from None
    if not isinstance(key, _ec().EllipticCurvePublicKey) or not isinstance(key.curve, _ec().SECP256R1):
        raise UserError(f"{where}: {path}: not an ECDSA P-256 public key")
    return key
