"""CurveZMQ on every socket (``--auth``): encryption, and only known keys get in.

Three roles each hold a key pair, made by ``pagedserve keygen``: the ``scheduler`` (the
server of every socket), the ``executor`` and the ``client`` (clients and the admin
commands). The scheduler lets in, through ZeroMQ's authentication protocol (ZAP), only the
client key on the client and admin sockets and only the executor key on the executor link;
a peer without it never gets a message through.

Each key comes from ``PAGEDSERVE_<ROLE>_PUBLIC_KEY`` / ``PAGEDSERVE_<ROLE>_SECRET_KEY``
(Z85 text, 40 characters) if set, else from the keys directory: ``--keys``,
``$PAGEDSERVE_KEYS``, or ``~/.config/pagedserve/keys``, holding ``<role>.key`` (public)
and ``<role>.key_secret`` (both halves), as ``zmq.auth`` writes them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

ROLES = ("scheduler", "executor", "client")
# ZAP domain of each scheduler socket -> the role whose key it lets in
DOMAINS = {"client": "client", "admin": "client", "executor": "executor"}


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes


@dataclass(frozen=True)
class PeerKeys:
    """What a connecting process (executor, client, admin command) needs."""

    own: KeyPair
    server_public: bytes

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (not yet connected) a CURVE client of the scheduler."""
        sock.curve_publickey, sock.curve_secretkey = self.own.public, self.own.secret
        sock.curve_serverkey = self.server_public


def keys_dir(directory: str | Path | None = None) -> Path:
    if directory is not None:
        return Path(directory)
    if os.environ.get("PAGEDSERVE_KEYS"):
        return Path(os.environ["PAGEDSERVE_KEYS"])
    return Path.home() / ".config" / "pagedserve" / "keys"


def keygen(directory: str | Path | None = None, force: bool = False) -> list[Path]:
    """Write a key pair for each role into the keys directory; existing keys are kept
    unless ``force``. Returns the files written."""
    path = keys_dir(directory)
    existing = [path / f"{role}.key{suffix}" for role in ROLES for suffix in ("", "_secret")]
    if not force and any(f.exists() for f in existing):
        raise FileExistsError(f"keys already exist in {path}; --force replaces them (every "
                              f"service and client must then get the new ones)")
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    written = []
    for role in ROLES:
        public, secret = zmq.auth.create_certificates(str(path), role)
        Path(secret).chmod(0o600)
        written += [Path(public), Path(secret)]
    return written


def public_key(role: str, directory: str | Path | None = None) -> bytes:
    from_env = os.environ.get(f"PAGEDSERVE_{role.upper()}_PUBLIC_KEY")
    if from_env:
        return _z85(from_env, f"PAGEDSERVE_{role.upper()}_PUBLIC_KEY")
    return _load(keys_dir(directory) / f"{role}.key", role, "PUBLIC")[0]


def key_pair(role: str, directory: str | Path | None = None) -> KeyPair:
    public = os.environ.get(f"PAGEDSERVE_{role.upper()}_PUBLIC_KEY")
    secret = os.environ.get(f"PAGEDSERVE_{role.upper()}_SECRET_KEY")
    if public and secret:
        return KeyPair(_z85(public, f"PAGEDSERVE_{role.upper()}_PUBLIC_KEY"),
                       _z85(secret, f"PAGEDSERVE_{role.upper()}_SECRET_KEY"))
    public, secret = _load(keys_dir(directory) / f"{role}.key_secret", role, "SECRET")
    if secret is None:
        raise ValueError(f"{keys_dir(directory) / f'{role}.key_secret'} holds no secret key")
    return KeyPair(public, secret)


def peer_keys(role: str, directory: str | Path | None = None) -> PeerKeys:
    """The keys of an ``executor`` or a ``client`` connecting to the scheduler."""
    return PeerKeys(key_pair(role, directory), public_key("scheduler", directory))


class SchedulerAuth:
    """The scheduler's side: its key pair on every socket it binds, and a ZAP handler that
    lets in each socket's role alone."""

    def __init__(self, ctx: zmq.Context, directory: str | Path | None = None):
        self.own = key_pair("scheduler", directory)
        self.allowed = {role: {public_key(role, directory)} for role in set(DOMAINS.values())}
        self.authenticator = ThreadAuthenticator(ctx)
        self.authenticator.start()
        for domain in DOMAINS:
            self.authenticator.configure_curve_callback(domain, credentials_provider=self)

    def callback(self, domain: str, client_key: bytes) -> bool:
        """ZAP: may a peer with (Z85) ``client_key`` connect to the socket of ``domain``?"""
        return client_key in self.allowed[DOMAINS[domain]]

    def secure(self, sock: zmq.Socket, domain: str) -> None:
        """Make ``sock`` (not yet bound) a CURVE server in ``domain``."""
        sock.zap_domain = domain.encode()
        sock.curve_publickey, sock.curve_secretkey = self.own.public, self.own.secret
        sock.curve_server = True

    def stop(self) -> None:
        self.authenticator.stop()


def _load(path: Path, role: str, kind: str) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise ValueError(f"--auth needs the {role} {kind.lower()} key: no {path} (run "
                         f"pagedserve keygen, or set PAGEDSERVE_{role.upper()}_{kind}_KEY)")
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the {role} key from {path}: {exc}") from None


def _z85(text: str, name: str) -> bytes:
    key = text.strip().encode()
    if len(key) != 40:
        raise ValueError(f"{name} must be a 40-character Z85 key (pagedserve keygen writes "
                         f"them), got {len(key)} characters")
    return key
