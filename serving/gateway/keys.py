"""Client API keys: stored hashed, checked in constant time, each with its own rate limit.

A key looks like ``sk-ts-<id>-<secret>``: an 8-hex-digit public id (used to find the record,
to label metrics and the inference log) and 43 URL-safe random characters (256 bits). The
``sk-`` prefix is deliberate: secret scanners, and the PII redaction of the inference log,
recognise a pasted key as a secret.

The keys file (default home/gateway/api_keys.json, mode 0600) holds only SHA-256 digests:

    {"schema_version": 1,
     "keys": {"3f9a0c1e": {"name": "demo", "sha256": "<hex>", "rpm": 600, "burst": null,
                           "created_at": "...", "disabled": false}}}

SHA-256 (not a slow password hash) is the right tool here: the secrets are 256-bit random,
so there is nothing to brute-force, and a per-request KDF would cost milliseconds. The
digest of the presented key is compared with `hmac.compare_digest`.

Writes take the same flock + temp file + os.replace path as the routes, so keys created or
revoked by the CLI take effect on every replica sharing the home on its next request (each
request stats the file; it is re-read only when it changed).

CLI (prints a new key exactly once; only the key goes to stdout):

    python -m serving.gateway.keys create --name alice --rpm 600
    python -m serving.gateway.keys ensure --name demo --save .tuneship/gateway/client_key
    python -m serving.gateway.keys list
    python -m serving.gateway.keys revoke 3f9a0c1e
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from serving.gateway.watched import WatchedFile

log = logging.getLogger("tuneship.gateway.keys")

PREFIX = "sk-ts-"
_KEY = re.compile(r"^sk-ts-([0-9a-f]{8})-([A-Za-z0-9_-]{43})$")
SCHEMA_VERSION = 1
DEFAULT_RPM = 600


def default_path() -> Path:
    from tuneship import config

    return config.home() / "gateway" / "api_keys.json"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ClientKey:
    """One stored key (never the key itself)."""

    id: str
    name: str
    sha256: str
    rpm: int = DEFAULT_RPM  # requests per minute; 0 = unlimited
    burst: int | None = None  # bucket size; None = rpm (a minute's allowance at once)
    created_at: str | None = None
    disabled: bool = False

    @classmethod
    def from_json(cls, key_id: str, d: dict[str, Any]) -> ClientKey:
        rpm, burst = int(d.get("rpm", DEFAULT_RPM)), d.get("burst")
        if rpm < 0 or (burst is not None and int(burst) < 1):
            raise ValueError(f"key {key_id}: rpm must be >= 0 and burst >= 1")
        if not re.fullmatch(r"[0-9a-f]{64}", str(d["sha256"])):
            raise ValueError(f"key {key_id}: sha256 must be 64 hex digits")
        return cls(id=key_id, name=str(d.get("name", "")), sha256=str(d["sha256"]), rpm=rpm,
                   burst=None if burst is None else int(burst), created_at=d.get("created_at"),
                   disabled=bool(d.get("disabled", False)))

    def public(self) -> dict[str, Any]:
        """What the admin API and listings show: everything but the digest."""
        return {"id": self.id, "name": self.name, "rpm": self.rpm, "burst": self.burst,
                "created_at": self.created_at, "disabled": self.disabled}

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "rpm": self.rpm, "burst": self.burst,
                "created_at": self.created_at, "disabled": self.disabled}


def _parse_keys(text: str) -> dict[str, ClientKey]:
    data = json.loads(text)
    return {k: ClientKey.from_json(k, v) for k, v in (data.get("keys") or {}).items()}


class KeyStore:
    """The keys file, cached by (inode, mtime, size); lookups are cheap and thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._file: WatchedFile[dict[str, ClientKey]] = WatchedFile(
            self.path, _parse_keys, {}, "keys file",
            errors=(OSError, ValueError, KeyError, TypeError, AttributeError),
        )

    def keys(self) -> dict[str, ClientKey]:
        return self._file.get()

    def issued(self) -> bool:
        """Whether any key was ever issued here (revoked ones count: revoking the last key must
        not open the gateway). Client auth in `auto` mode switches on with the first key."""
        return bool(self.keys())

    def verify(self, presented: str, keys: dict[str, ClientKey] | None = None) -> ClientKey | None:
        """The key record for a presented key, or None. Constant-time on the secret part.
        `keys`: a `keys()` result the caller already holds."""
        m = _KEY.match(presented)
        if not m:
            return None
        rec = (self.keys() if keys is None else keys).get(m.group(1))
        # Compare even when the id is unknown, so timing does not tell ids apart either.
        expected = rec.sha256 if rec is not None else "0" * 64
        ok = hmac.compare_digest(digest(presented), expected)
        return rec if ok and rec is not None and not rec.disabled else None

    # -- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, ClientKey]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            keys = _parse_keys(self.path.read_text()) if self.path.exists() else {}
            yield keys
            self._write(keys)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _write(self, keys: dict[str, ClientKey]) -> None:
        text = json.dumps({"schema_version": SCHEMA_VERSION,
                           "keys": {k: v.to_json() for k, v in sorted(keys.items())}}, indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=".api_keys.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:  # mkstemp creates it 0600
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._file.invalidate()

    def create(self, name: str, rpm: int = DEFAULT_RPM, burst: int | None = None) -> tuple[ClientKey, str]:
        """(stored record, the key). The key is not kept anywhere: show it once."""
        if rpm < 0 or (burst is not None and burst < 1):
            raise ValueError("rpm must be >= 0 and burst >= 1")
        with self._locked() as keys:
            key_id = secrets.token_hex(4)
            while key_id in keys:
                key_id = secrets.token_hex(4)
            key = f"{PREFIX}{key_id}-{secrets.token_urlsafe(32)}"
            rec = ClientKey(id=key_id, name=name, sha256=digest(key), rpm=rpm, burst=burst,
                            created_at=datetime.now(UTC).isoformat(timespec="seconds"))
            keys[key_id] = rec
        return rec, key

    def revoke(self, key_id: str) -> bool:
        with self._locked() as keys:
            rec = keys.get(key_id)
            if rec is None:
                return False
            keys[key_id] = dataclasses.replace(rec, disabled=True)
        return True


def _save_secret(path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".client_key.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.replace(tmp, path)


def ensure(store: KeyStore, save: Path, name: str, rpm: int, burst: int | None) -> tuple[ClientKey, bool]:
    """(record, created): reuse the key saved at `save` if the store still accepts it, else
    create one and save it there (0600). For the embedded default's local clients."""
    if save.exists():
        rec = store.verify(save.read_text().strip())
        if rec is not None:
            return rec, False
    rec, key = store.create(name, rpm, burst)
    _save_secret(save, key)
    return rec, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.gateway.keys", description="Manage gateway client API keys.")
    parser.add_argument("--file", type=Path, default=None, help="keys file (default: TUNESHIP_HOME/gateway/api_keys.json)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("create", "ensure"):
        p = sub.add_parser(name, help="create a key and print it once" if name == "create"
                           else "create a key saved to --save unless the saved one still works")
        p.add_argument("--name", required=True)
        p.add_argument("--rpm", type=int, default=DEFAULT_RPM, help="requests per minute (0 = unlimited)")
        p.add_argument("--burst", type=int, default=None, help="bucket size (default: rpm)")
        if name == "ensure":
            p.add_argument("--save", type=Path, required=True, help="file (0600) holding the key for local clients")
    sub.add_parser("list", help="key ids, names and limits (never the keys)")
    p = sub.add_parser("revoke", help="disable a key by id")
    p.add_argument("key_id")
    args = parser.parse_args(argv)
    store = KeyStore(args.file or default_path())
    try:
        if args.cmd == "create":
            rec, key = store.create(args.name, args.rpm, args.burst)
            print(f"created key {rec.id} ({rec.name}, {rec.rpm} rpm); it is shown only this once:", file=sys.stderr)
            print(key)
        elif args.cmd == "ensure":
            rec, created = ensure(store, args.save, args.name, args.rpm, args.burst)
            print(f"{'created' if created else 'kept'} key {rec.id} ({rec.name}, {rec.rpm} rpm) in {args.save}",
                  file=sys.stderr)
        elif args.cmd == "list":
            for rec in store.keys().values():
                print(f"{rec.id}\t{rec.name}\trpm={rec.rpm}\tburst={rec.burst or rec.rpm}\t"
                      f"{'disabled' if rec.disabled else 'active'}\t{rec.created_at}")
        elif args.cmd == "revoke":
            if not store.revoke(args.key_id):
                print(f"no key {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}", file=sys.stderr)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
