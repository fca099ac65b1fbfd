"""The deny list that rebuild audits leave (issue #24, item 4): entries this machine rebuilt and
found to hold other bytes, never served here again.

``python -m modelbuild cache audit`` (cli/audit.py) rebuilds cached actions from their inputs and
compares the bytes. A signature says who pushed an entry, not that it was built honestly: an
entry that differs from the rebuild is recorded here, under the local cache folder::

    denied/<action key>.json   {"action_key", "manifest_digests": [...], "signers": {digest: id},
                                "files": {digest: [names]}, "remote": url, "audited_at"}

It names the entry by its manifest digest, not the action alone: an honest builder's later push
under the same key (another manifest) is served again. The remote tier's restore
(tiers.RemoteTier.restore) and ``plan``'s prediction of it refuse a denied entry whichever key
signed it and whichever keys are trusted; the audit replaces a denied local entry with the
rebuilt one, so the local tier serves the bytes built here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .store import write_json_atomic

DENIED = "denied"  # folder in the local cache


def _path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / DENIED / f"{key}.json"


def _read(cache_dir: Path, key: str) -> dict:
    try:
        record = json.loads(_path(cache_dir, key).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def denial(cache_dir: Path, key: str, entry: dict) -> dict | None:
    """The audit record that refuses ``entry`` (an entry under ``key``), or None when it may be served.
    One stat per restore when no audit ever differed (no file)."""
    path = _path(cache_dir, key)
    if not path.exists():
        return None
    record = _read(cache_dir, key)
    digest = entry.get("manifest_digest")
    return record if digest in record.get("manifest_digests", []) else None


def deny(cache_dir: Path, key: str, entry: dict, files: list[str], signer: str | None, remote: str | None) -> Path:
    """Record that ``entry`` differs from what this machine builds; the record's path."""
    record = _read(cache_dir, key)
    digest = entry["manifest_digest"]
    digests = [d for d in record.get("manifest_digests", []) if d != digest] + [digest]
    record = {"action_key": key, "target": entry.get("target"), "manifest_digests": digests,
              "signers": {**record.get("signers", {}), digest: signer},
              "files": {**record.get("files", {}), digest: files},
              "remote": remote or record.get("remote"), "audited_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = _path(cache_dir, key)
    write_json_atomic(path, record)
    return path


def refusal(record: dict, entry: dict) -> str:
    """Why a denied entry is not served, in words: who signed it and when the audit found it."""
    signer = record.get("signers", {}).get(entry.get("manifest_digest"))
    return (f"differed from a rebuild here (cache audit, {record.get('audited_at', '?')}; "
            f"{f'signer {signer}' if signer else 'unsigned'})")
