"""Run a Mosquitto broker for local runs and tests; manage device credentials and certificates.

:class:`MosquittoBroker` starts a private ``mosquitto`` process on a free loopback port with a
generated configuration, password file and ACL (the same rules as ``server/mosquitto/acl``) in a
run directory, in the spirit of paho-mqtt's ``tests/testsupport/broker.py``.  For a production
broker use ``server/mosquitto/mosquitto.conf`` (or ``edgehmoe-server broker-config``, which
renders it: :func:`render_broker_config`) and the system service instead.

What one device credential must not be able to do (issue #10, ``docs/security.md``), and how
the generated configurations prevent it:

* take over another client's session by connecting with its client id: every listener has
  ``use_username_as_clientid true``, so a client's id IS its user name;
* publish into another run or as another device: the ACL names the run(s) and pins each device
  to ``edgehmoe/<run>/device/<its user name>/...`` (:func:`render_acl`);
* flood the broker: ``max_packet_size`` (largest wire payload + headroom), ``max_queued_bytes``
  and ``max_queued_messages`` bound one packet and what is queued for an offline client;
* listen on every interface by accident: listeners bind to 127.0.0.1 unless told otherwise.

:func:`create_device_credentials` adds a device user to a Mosquitto password file and writes
the device's password file (mode 0600) to copy onto the Pi.  :func:`create_ca`,
:func:`create_server_certificate` and :func:`create_client_certificate` make a private CA and
certificates for TLS and mutual TLS with the ``openssl`` command-line tool.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from edgehmoe.errors import RunError, UsageError
from edgehmoe.fl.wire import MAX_PAYLOAD_BYTES, WireError, check_id

# The topic root, spelled out: importing edgehmoe.fl.mqtt would pull in paho, which the broker
# tools (credentials, broker-config) do not need.
TOPIC_ROOT = "edgehmoe"

__all__ = [
    "SERVER_USER",
    "MONITOR_USER",
    "TEMPLATE_RUN",
    "INSTALL_HINT",
    "OPENSSL_HINT",
    "TEMPLATE_DIR",
    "MAX_PACKET_BYTES",
    "DEFAULT_MAX_QUEUED_BYTES",
    "DEFAULT_MAX_QUEUED_MESSAGES",
    "BrokerError",
    "default_max_queued_bytes",
    "find_mosquitto",
    "find_openssl",
    "free_port",
    "max_packet_bytes",
    "render_acl",
    "render_broker_config",
    "add_password",
    "create_device_credentials",
    "create_ca",
    "create_server_certificate",
    "create_client_certificate",
    "MosquittoBroker",
    "start_local_broker",
]

logger = logging.getLogger(__name__)

#: Default user name of the aggregation server on the broker.
SERVER_USER = "edgehmoe-server"
#: Read-only account for dashboards and ``mosquitto_sub`` (never log in as the server for that:
#: client ids are bound to user names, so a second login as the server takes over its session).
MONITOR_USER = "edgehmoe-monitor"
#: Run name the shipped ACL template is written for (the default ``[run] name``).
TEMPLATE_RUN = "edgehmoe"

INSTALL_HINT = (
    "Mosquitto is not installed: apt-get install -y mosquitto (Debian, Ubuntu, Raspberry Pi OS) "
    "or brew install mosquitto (macOS)"
)

OPENSSL_HINT = (
    "openssl is not installed: apt-get install -y openssl (Debian, Ubuntu, Raspberry Pi OS) "
    "or brew install openssl (macOS)"
)

#: Shipped configuration templates (mosquitto.conf, acl).
TEMPLATE_DIR = Path(__file__).resolve().parent / "mosquitto"

# Room for the topic, properties and MQTT fixed/variable headers above the largest wire payload.
_PACKET_OVERHEAD = 64 * 1024


def max_packet_bytes(max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> int:
    """Broker ``max_packet_size`` for wire payloads of at most ``max_payload_bytes``.

    The default follows :data:`edgehmoe.fl.wire.MAX_PAYLOAD_BYTES`, the largest payload the
    server would decode anyway; a run whose largest expert message is known can pass a smaller
    bound (a TrainTask/TrainResult is its weights plus about 2 KiB of header).
    """
    if not isinstance(max_payload_bytes, int) or max_payload_bytes < 1024:
        raise UsageError(f"max_payload_bytes must be an integer >= 1024, got {max_payload_bytes!r}")
    return max_payload_bytes + _PACKET_OVERHEAD


#: ``max_packet_size`` for the default payload limit (64 MiB + 64 KiB).
MAX_PACKET_BYTES = max_packet_bytes()
_MAX_PACKET_BYTES = MAX_PACKET_BYTES  # old private name


def default_max_queued_bytes(packet_bytes: int = MAX_PACKET_BYTES) -> int:
    """Bytes of QoS 1 messages the broker queues for one disconnected client (e.g. the server
    while it restarts): 64 MiB, and at least one maximal packet.

    That holds a round of results from a hundred or more devices at today's model sizes (well
    under 1 MiB each) but no longer an unbounded pile from one device (issue #10 row 7: 5 x 50 MB
    for an offline server grew the broker from 9.5 to 317 MB).  Mosquitto drops what is beyond
    it (the publisher still gets its PUBACK).
    """
    return max(64 * 1024 * 1024, packet_bytes)


#: ``max_queued_bytes`` for the default packet limit.
DEFAULT_MAX_QUEUED_BYTES = default_max_queued_bytes()
#: QoS 1 messages queued per client while it is away (Mosquitto's own default).
DEFAULT_MAX_QUEUED_MESSAGES = 1000
# Debian installs the broker in /usr/sbin, which is not on a normal user's PATH.
_EXTRA_PATHS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin", "/usr/local/opt/mosquitto/sbin")


class BrokerError(RunError):
    """Mosquitto could not be started, reloaded or configured (see its log file)."""


def find_mosquitto(name: str = "mosquitto") -> str:
    """Path of the ``mosquitto`` (or ``mosquitto_passwd``) executable.

    :raises FileNotFoundError: with the install hint.
    """
    search = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATHS])
    found = shutil.which(name, path=search)
    if found is None:
        raise FileNotFoundError(f"{name} not found on PATH or in {', '.join(_EXTRA_PATHS)}. {INSTALL_HINT}")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def find_openssl() -> str:
    """Path of the ``openssl`` command-line tool.

    :raises FileNotFoundError: with the install hint.
    """
    found = shutil.which("openssl")
    if found is None:
        raise FileNotFoundError(f"openssl not found on PATH. {OPENSSL_HINT}")
    return found


_RUN_IN_TEMPLATE = f"{TOPIC_ROOT}/{TEMPLATE_RUN}/"


def render_acl(
    server_user: str = SERVER_USER,
    runs: Optional[Sequence[str]] = (TEMPLATE_RUN,),
    monitor_user: str = MONITOR_USER,
) -> str:
    """The shipped ACL template (``server/mosquitto/acl``) for a server user name and run names.

    Every rule of the template names the run ``edgehmoe`` (:data:`TEMPLATE_RUN`); each such rule
    is written once per name in ``runs``, so a device can publish only under a run it was
    admitted to (``[]``: no run yet, nobody may publish anything).  ``runs=None`` writes ``+``
    (any run): only for throw-away local brokers.
    """
    _check_user(server_user)
    _check_user(monitor_user)
    if runs is not None:
        if isinstance(runs, str):
            raise UsageError("runs must be a list of run names (or None for any run), not a string")
        runs = [_check_run(r) for r in runs]
    text = (TEMPLATE_DIR / "acl").read_text(encoding="utf-8")
    for default, name in ((SERVER_USER, server_user), (MONITOR_USER, monitor_user)):
        line = f"user {default}\n"
        if line not in text:  # pragma: no cover - template edited inconsistently
            raise BrokerError(f"ACL template {TEMPLATE_DIR / 'acl'} has no '{line.strip()}' line")
        text = text.replace(line, f"user {name}\n")
    out: List[str] = []
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("#") or _RUN_IN_TEMPLATE not in line:
            out.append(line)
        elif runs is None:
            out.append(line.replace(_RUN_IN_TEMPLATE, f"{TOPIC_ROOT}/+/"))
        else:
            out += [line.replace(_RUN_IN_TEMPLATE, f"{TOPIC_ROOT}/{run}/") for run in runs]
    return "".join(out)


def _check_run(name: str) -> str:
    try:
        return check_id(name, "run name")
    except WireError as err:
        raise UsageError(str(err)) from None


def _check_user(name: str) -> str:
    try:
        return check_id(name, "broker user name")
    except WireError as err:
        raise UsageError(str(err)) from None


def add_password(password_file: Union[str, Path], user: str, password: str) -> None:
    """Add or replace ``user`` in a Mosquitto password file (created, mode 0600, if missing).

    Uses ``mosquitto_passwd -b``, which hashes the password (PBKDF2-SHA512 in Mosquitto 2).
    Note: ``-b`` passes the password on the command line, visible to other local users in
    ``ps`` for the instant the tool runs; run this on a machine you trust.
    """
    _check_user(user)
    if not password or "\n" in password:
        raise UsageError("password must be non-empty and single-line")
    path = Path(password_file)
    tool = find_mosquitto("mosquitto_passwd")
    args = [tool, "-b", str(path), user, password]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        args.insert(1, "-c")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise BrokerError(
            f"mosquitto_passwd failed for user {user!r} in {path}: {(proc.stderr or proc.stdout).strip()}"
        )
    os.chmod(path, 0o600)


def create_device_credentials(
    password_file: Union[str, Path],
    device_id: str,
    out_dir: Union[str, Path],
    *,
    server_user: str = SERVER_USER,
    nbytes: int = 24,
) -> Path:
    """Create a random password for ``device_id``, add it to the broker's password file and
    write it to ``<out_dir>/<device_id>.password`` (mode 0600) for provisioning the device.

    The running broker picks the new user up after a reload (``systemctl reload mosquitto`` or
    SIGHUP).  Returns the path of the written password file.
    """
    try:
        check_id(device_id, "device id")
    except WireError as err:
        raise UsageError(str(err)) from None
    if device_id in (server_user, MONITOR_USER):
        raise UsageError(f"device id {device_id!r} is the server's user name (or the monitor's); pick another id")
    password = secrets.token_urlsafe(nbytes)
    add_password(password_file, device_id, password)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{device_id}.password"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to an existing file
        os.write(fd, (password + "\n").encode("ascii"))
    finally:
        os.close(fd)
    logger.info("added broker user %s to %s; password written to %s", device_id, password_file, target)
    return target


# --------------------------------------------------------------------------------------------
# Certificates (openssl command-line tool: present on Debian, Raspberry Pi OS and macOS)
# --------------------------------------------------------------------------------------------

# EC P-256: small keys, fast handshakes on a Pi, supported by every OpenSSL/LibreSSL in use.
_KEY_ARGS = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: str) -> None:
    proc = subprocess.run([find_openssl(), *args], capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise BrokerError(f"openssl {args[0]} failed: {(proc.stderr or proc.stdout).strip()}")


def _private(path: Path) -> None:
    os.chmod(path, 0o600)


def _serial() -> str:
    return "0x" + secrets.token_hex(16)


def create_ca(out_dir: Union[str, Path], *, name: str = "edgehmoe broker CA", days: int = 3650,
              force: bool = False) -> Tuple[Path, Path]:
    """Create a private certificate authority: ``<out_dir>/ca.crt`` and ``ca.key`` (mode 0600).

    ``ca.crt`` goes to every device (``--cafile``); ``ca.key`` signs the broker's and the
    devices' certificates and should stay off the broker if you can (it can mint identities).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    crt, key = out / "ca.crt", out / "ca.key"
    _refuse_overwrite([crt, key], force)
    _openssl("req", "-x509", *_KEY_ARGS, "-keyout", str(key), "-out", str(crt), "-days", str(int(days)),
             "-subj", f"/CN={name}", "-set_serial", _serial(),
             "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _private(key)
    logger.info("created CA %s (key %s)", crt, key)
    return crt, key


def _refuse_overwrite(paths: Sequence[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} exist(s); pass --force (force=True) to replace")


def _san(hosts: Sequence[str]) -> str:
    import ipaddress

    entries = []
    for host in hosts:
        try:
            entries.append(f"IP:{ipaddress.ip_address(host)}")
        except ValueError:
            if not host or any(c in host for c in ",/ \n"):
                raise UsageError(f"bad host name for a certificate: {host!r}") from None
            entries.append(f"DNS:{host}")
    return ",".join(entries)


def _signed_certificate(ca_cert: Path, ca_key: Path, out_dir: Path, stem: str, common_name: str,
                        extensions: str, days: int, force: bool) -> Tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    crt, key = out / f"{stem}.crt", out / f"{stem}.key"
    _refuse_overwrite([crt, key], force)
    for path in (ca_cert, ca_key):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} not found; create the CA first (edgehmoe-server broker-config --tls)")
    with tempfile.TemporaryDirectory(prefix="edgehmoe-cert-") as tmp:
        csr, ext = Path(tmp) / "req.csr", Path(tmp) / "ext.cnf"
        ext.write_text(extensions, encoding="ascii")
        _openssl("req", "-new", *_KEY_ARGS, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={common_name}")
        _private(key)
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                 "-set_serial", _serial(), "-out", str(crt), "-days", str(int(days)), "-extfile", str(ext))
    return crt, key


def create_server_certificate(ca_cert: Union[str, Path], ca_key: Union[str, Path], out_dir: Union[str, Path],
                              hosts: Sequence[str], *, days: int = 825, force: bool = False) -> Tuple[Path, Path]:
    """Broker certificate ``<out_dir>/server.crt`` + ``server.key`` (0600), signed by the CA.

    ``hosts``: every name and IP address devices use in ``mqtts://HOST`` (they are checked
    against the certificate's subjectAltName).
    """
    hosts = list(dict.fromkeys(hosts))
    if not hosts:
        raise UsageError("give at least one host name or IP address for the broker certificate")
    ext = (f"subjectAltName={_san(hosts)}\nbasicConstraints=critical,CA:FALSE\n"
           "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    crt, key = _signed_certificate(Path(ca_cert), Path(ca_key), Path(out_dir), "server", hosts[0], ext, days, force)
    logger.info("created broker certificate %s for %s", crt, ", ".join(hosts))
    return crt, key


def create_client_certificate(ca_cert: Union[str, Path], ca_key: Union[str, Path], out_dir: Union[str, Path],
                              name: str, *, days: int = 825, force: bool = False) -> Tuple[Path, Path]:
    """Client certificate ``<out_dir>/<name>.crt`` + ``<name>.key`` (0600) for mutual TLS.

    ``name`` (a device id or the server's user name) becomes the certificate's common name.
    """
    _check_user(name)
    ext = ("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
           "extendedKeyUsage=clientAuth\n")
    crt, key = _signed_certificate(Path(ca_cert), Path(ca_key), Path(out_dir), name, name, ext, days, force)
    logger.info("created client certificate %s", crt)
    return crt, key


# --------------------------------------------------------------------------------------------
# Production configuration (edgehmoe-server broker-config)
# --------------------------------------------------------------------------------------------


def render_broker_config(
    *,
    conf_dir: str = "/etc/mosquitto",
    listen: str = "127.0.0.1",
    tls: bool = False,
    tls_listen: str = "",
    client_certs: bool = False,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    max_queued_bytes: Optional[int] = None,
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
) -> str:
    """``server/mosquitto/mosquitto.conf`` with the given options filled in.

    The shipped template is the default rendering (a test keeps them equal).  ``conf_dir`` is
    where the password file, ACL and ``certs/`` live on the broker host; ``listen`` is the
    address of the plain listener (loopback: the server and tools on the broker host);
    ``tls=True`` enables the TLS listener on port 8883 (``tls_listen``: its address, default
    all interfaces) and ``client_certs=True`` makes it require a client certificate signed by
    the CA (mutual TLS).
    """
    if client_certs and not tls:
        raise UsageError("client certificates need the TLS listener: add --tls")
    conf = conf_dir.rstrip("/") or "/"
    packet = max_packet_bytes(max_payload_bytes)
    queued = default_max_queued_bytes(packet) if max_queued_bytes is None else int(max_queued_bytes)
    text = (TEMPLATE_DIR / "mosquitto.conf").read_text(encoding="utf-8")
    replacements = [
        ("listener 1883 127.0.0.1\n", f"listener 1883 {listen}\n" if listen else "listener 1883\n"),
        (f"max_packet_size {MAX_PACKET_BYTES}\n", f"max_packet_size {packet}\n"),
        (f"max_inflight_bytes {MAX_PACKET_BYTES}\n", f"max_inflight_bytes {packet}\n"),
        (f"max_queued_bytes {DEFAULT_MAX_QUEUED_BYTES}\n", f"max_queued_bytes {queued}\n"),
        (f"max_queued_messages {DEFAULT_MAX_QUEUED_MESSAGES}\n", f"max_queued_messages {int(max_queued_messages)}\n"),
    ]
    for old, new in replacements:
        if old not in text:  # pragma: no cover - template edited inconsistently
            raise BrokerError(f"{TEMPLATE_DIR / 'mosquitto.conf'} has no {old.strip()!r}")
        text = text.replace(old, new)
    lines = []
    in_tls_block = False
    for line in text.splitlines(keepends=True):
        if line.startswith("# >>> tls"):
            in_tls_block = True
        elif line.startswith("# <<< tls"):
            in_tls_block = False
        elif tls and in_tls_block and line.startswith("#") and not line.startswith("# "):
            line = line[1:]  # a commented-out directive of the TLS block
            if line.startswith("listener 8883"):
                line = f"listener 8883 {tls_listen}\n" if tls_listen else "listener 8883\n"
            elif line.startswith("require_certificate"):
                line = f"require_certificate {'true' if client_certs else 'false'}\n"
        if not line.startswith("#"):
            line = line.replace("/etc/mosquitto/", f"{conf}/")
        lines.append(line)
    return "".join(lines)


def _terminate(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()  # SIGTERM: mosquitto saves its persistence file and exits
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


class MosquittoBroker:
    """A private Mosquitto process (context manager).

    ::

        with MosquittoBroker() as broker:          # auth + ACL, free loopback port
            broker.add_user("edgehmoe-server", "s3cret")
            broker.add_user("dev-a", "pw-a")
            ... MqttConnection.from_url(broker.url, ...)

    :param auth: require user/password and apply the edgehmoe ACL; ``False`` allows anonymous
        clients without ACL (quick local demos only).
    :param host: interface to listen on (loopback by default).
    :param port: fixed port; ``None`` picks a free one (kept across :meth:`restart`).
    :param run_dir: where config, password file, ACL and log go; ``None`` = a temporary
        directory, removed by :meth:`close`.
    :param persistence: directory for Mosquitto's persistence file (retained messages and
        persistent sessions survive :meth:`restart`); ``None`` = no persistence.
    :param server_user: user name that gets read/write on the runs' topics.
    :param runs: run names written into the ACL (devices can publish and read only under
        these); ``[]`` = none yet (admit each with :meth:`add_run` before its clients start);
        ``None`` = any run (``+``), for throw-away brokers.
    :param bind_client_ids: ``use_username_as_clientid true`` (with ``auth``): a client's id is
        its user name, so no credential can take over another client's session.
    :param max_payload_bytes: largest wire payload; ``max_packet_size`` is this plus 64 KiB.
    :param max_queued_bytes: bytes queued per disconnected client (default
        :func:`default_max_queued_bytes`; 0 = no limit); ``max_queued_messages``: messages queued
        per disconnected client.  In-flight bytes per client are limited to one maximal packet.
    :param certfile, keyfile: serve TLS (``mqtts://``) with this certificate and key.
    :param cafile: CA that signs client certificates; with ``require_certificate=True`` a client
        without a certificate signed by it is refused in the TLS handshake (mutual TLS).
    :param verbose: log every packet (``log_type all``) to the broker log.
    """

    def __init__(
        self,
        *,
        auth: bool = True,
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        run_dir: Union[str, Path, None] = None,
        persistence: Union[str, Path, None] = None,
        server_user: str = SERVER_USER,
        executable: Optional[str] = None,
        certfile: Union[str, Path, None] = None,
        keyfile: Union[str, Path, None] = None,
        verbose: bool = False,
        runs: Optional[Sequence[str]] = None,
        bind_client_ids: bool = True,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        max_queued_bytes: Optional[int] = None,
        max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
        cafile: Union[str, Path, None] = None,
        require_certificate: bool = False,
    ) -> None:
        self.executable = executable or find_mosquitto()
        self.auth = auth
        self.host = host
        self._fixed_port = port
        self.port: Optional[int] = port
        self.server_user = _check_user(server_user)
        if (certfile is None) != (keyfile is None):
            raise UsageError("give both certfile and keyfile for TLS, or neither")
        self.certfile = Path(certfile) if certfile else None
        self.keyfile = Path(keyfile) if keyfile else None
        if (cafile is not None or require_certificate) and self.certfile is None:
            raise UsageError("cafile/require_certificate need TLS: give certfile and keyfile too")
        if require_certificate and cafile is None:
            raise UsageError("require_certificate needs the cafile that signs the client certificates")
        self.cafile = Path(cafile) if cafile else None
        self.require_certificate = bool(require_certificate)
        self.verbose = verbose
        self.runs: Optional[List[str]] = None if runs is None else [_check_run(r) for r in runs]
        self.bind_client_ids = bool(bind_client_ids)
        self.max_packet_bytes = max_packet_bytes(max_payload_bytes)
        self.max_queued_bytes = (default_max_queued_bytes(self.max_packet_bytes) if max_queued_bytes is None
                                 else int(max_queued_bytes))
        self.max_queued_messages = int(max_queued_messages)
        if self.max_queued_bytes < 0 or self.max_queued_messages < 0:
            raise UsageError("max_queued_bytes and max_queued_messages must be >= 0 (0 = no limit)")
        self._own_run_dir = run_dir is None
        self.run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="edgehmoe-mosquitto-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.persistence = Path(persistence) if persistence is not None else None
        self.config_path = self.run_dir / "mosquitto.conf"
        self.password_file = self.run_dir / "passwd"
        self.acl_file = self.run_dir / "acl"
        #: The broker's own log file.
        self.log_path = self.run_dir / "mosquitto.log"
        self._stdout_path = self.run_dir / "mosquitto.stdout"
        self._proc: Optional[subprocess.Popen] = None
        self._finalizer: Optional[weakref.finalize] = None
        self._lock = threading.Lock()

    # ---- properties ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``mqtt://host:port`` (``mqtts://`` with TLS) of the running broker."""
        if self.port is None:
            raise BrokerError("broker not started yet")
        return f"{'mqtts' if self.certfile else 'mqtt'}://{self.host}:{self.port}"

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        state = f"running on {self.url}" if self.running else "stopped"
        return f"MosquittoBroker({state}, auth={self.auth}, run_dir={str(self.run_dir)!r})"

    # ---- users -----------------------------------------------------------------------------------

    def add_user(self, name: str, password: str) -> None:
        """Add or update a broker user; if the broker runs, reload it (SIGHUP) and wait for that."""
        if not self.auth:
            raise UsageError("this broker runs without authentication (auth=False); users have no effect")
        with self._lock:
            add_password(self.password_file, name, password)
        if self.running:
            self.reload()

    def add_run(self, run: str) -> None:
        """Admit run ``run`` in the ACL (no-op when the ACL allows any run); reload if running."""
        run = _check_run(run)
        if self.runs is None or run in self.runs:
            return
        self.runs.append(run)
        if self.auth:
            self._write_acl()
            if self.running:
                self.reload()

    def reload(self, timeout: float = 30.0) -> None:
        """Make Mosquitto re-read its password and ACL files (SIGHUP) and wait until it has.

        The wait ends as soon as the broker logs the reload (milliseconds on an idle machine), or
        with :class:`BrokerError` at once if the broker died; the timeout only bounds a broker
        that never answers.
        """
        if not self.running:
            raise BrokerError("broker is not running")
        log_start = self._log_size()
        assert self._proc is not None
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        # Mosquitto logs the line, then reloads in the same loop iteration, before it reads any
        # new socket: a client connecting after we saw the line meets the new configuration.
        while "Reloading config" not in self._log_since(log_start):
            if self._proc.poll() is not None:
                raise BrokerError(f"mosquitto exited (code {self._proc.returncode}) when told to reload:\n{self._tail()}")
            if time.monotonic() > deadline:
                raise BrokerError(f"mosquitto did not log a reload within {timeout} s (see {self.log_path})")
            time.sleep(0.02)

    # ---- config ----------------------------------------------------------------------------------

    def _config_text(self) -> str:
        # The effective user, not $USER/$LOGNAME (which sudo or CI may leave pointing elsewhere).
        try:
            import pwd  # Unix only, like the 'user' option itself

            user = pwd.getpwuid(os.geteuid()).pw_name
        except (ImportError, KeyError):  # no passwd entry (some containers)
            user = "root" if os.geteuid() == 0 else "mosquitto"
        lines = [
            "# Generated by edgehmoe server/broker.py; see server/mosquitto/mosquitto.conf for a",
            "# documented production configuration.",
            # Run as the invoking user: started as root, mosquitto would otherwise switch to the
            # 'mosquitto' user, which cannot read our private run directory.
            f"user {user}",
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
        ]
        if self.auth and self.bind_client_ids:
            # Listener option: the client id becomes the user name (no session takeover).
            lines += ["use_username_as_clientid true"]
        if self.certfile is not None:
            lines += [f"certfile {self.certfile}", f"keyfile {self.keyfile}"]
            if self.cafile is not None:
                lines += [f"cafile {self.cafile}"]
            lines += [f"require_certificate {'true' if self.require_certificate else 'false'}"]
        if self.auth:
            lines += ["allow_anonymous false", f"password_file {self.password_file}", f"acl_file {self.acl_file}"]
        else:
            lines += ["allow_anonymous true"]
        if self.persistence is not None:
            lines += ["persistence true", f"persistence_location {self.persistence}/", "autosave_interval 30"]
        else:
            lines += ["persistence false"]
        lines += [
            f"max_packet_size {self.max_packet_bytes}",
            f"max_queued_bytes {self.max_queued_bytes}",
            f"max_queued_messages {self.max_queued_messages}",
            f"max_inflight_bytes {self.max_packet_bytes}",
            f"log_dest file {self.log_path}",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
        ]
        lines += ["log_type all"] if self.verbose else [
            "log_type error", "log_type warning", "log_type notice", "log_type information",
        ]
        return "\n".join(lines) + "\n"

    def _write_files(self) -> None:
        if self.persistence is not None:
            self.persistence.mkdir(parents=True, exist_ok=True)
        if self.auth:
            self._write_acl()
            if not self.password_file.exists():
                # An empty password file is valid: nobody can log in until add_user().
                self.password_file.touch(mode=0o600)
        self.config_path.write_text(self._config_text(), encoding="utf-8")

    def _write_acl(self) -> None:
        self.acl_file.write_text(render_acl(self.server_user, self.runs), encoding="utf-8")
        os.chmod(self.acl_file, 0o600)

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> "MosquittoBroker":
        """Start the broker and wait until its port accepts connections."""
        if self.running:
            raise BrokerError(f"broker already running on {self.url}")
        attempts = 3 if self._fixed_port is None and self.port is None else 1
        for attempt in range(attempts):
            if self.port is None or (attempt > 0 and self._fixed_port is None):
                self.port = free_port(self.host)
            try:
                self._spawn(timeout)
                return self
            except _AddressInUse:
                if attempt + 1 == attempts:
                    raise BrokerError(f"port {self.port} stayed in use (see {self.log_path})") from None
                logger.debug("port %s was taken before mosquitto bound it; retrying", self.port)
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn(self, timeout: float) -> None:
        self._write_files()
        log_start = self._log_size()
        with open(self._stdout_path, "ab") as out:
            self._proc = subprocess.Popen(
                [self.executable, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop it
            )
        # Never leave an orphan broker behind, even if the caller forgets stop().
        self._finalizer = weakref.finalize(self, _terminate, self._proc)
        deadline = time.monotonic() + timeout
        self._await_port(deadline, timeout)
        self._await_running(deadline, timeout, log_start)
        logger.info("mosquitto running on %s (pid %s, auth=%s, log %s)", self.url, self._proc.pid, self.auth,
                    self.log_path)

    def _await_port(self, deadline: float, timeout: float) -> None:
        assert self._proc is not None
        while True:
            if self._proc.poll() is not None:
                text = self._tail()
                self._proc = None
                if "Address already in use" in text:
                    raise _AddressInUse()
                raise BrokerError(f"mosquitto exited at start-up:\n{text}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise BrokerError(f"mosquitto did not open port {self.port} within {timeout} s:\n{self._tail()}")
                time.sleep(0.02)

    def _await_running(self, deadline: float, timeout: float, log_start: int) -> None:
        """Wait for Mosquitto 2's "running" log line: it opens its port *before* it installs its
        signal handlers, so a SIGHUP (:meth:`reload`) in between would kill it (seen at load 25).
        Mosquitto 1.x logs no such line; its start-up is taken as done once the port is open."""
        assert self._proc is not None
        if not _MOSQUITTO_2.search(self._log_since(log_start)):
            return
        while _RUNNING not in self._log_since(log_start):
            if self._proc.poll() is not None:
                text, self._proc = self._tail(), None
                raise BrokerError(f"mosquitto exited at start-up:\n{text}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"mosquitto opened port {self.port} but did not log that it runs within "
                                  f"{timeout} s:\n{self._tail()}")
            time.sleep(0.02)

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_since(self, offset: int) -> str:
        """The broker log from byte ``offset`` on (what it wrote since a start or a reload began)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _tail(self, lines: int = 20) -> str:
        chunks: List[str] = []
        for path in (self._stdout_path, self.log_path):
            if path.exists():
                chunks += path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        return "\n".join(chunks) or "(no output)"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout``); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        _terminate(proc, timeout)
        logger.info("mosquitto on port %s stopped", self.port)

    def restart(self, timeout: float = 10.0, downtime: float = 0.0) -> None:
        """Stop and start again on the same port (clients see a broker restart)."""
        self.stop(timeout)
        if downtime > 0:
            time.sleep(downtime)
        try:
            self._spawn(timeout)
        except _AddressInUse:
            raise BrokerError(f"port {self.port} was taken by another process; cannot restart on it") from None

    def close(self) -> None:
        """Stop, and remove the run directory if it was a temporary one."""
        self.stop()
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> "MosquittoBroker":
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _AddressInUse(Exception):
    pass


#: What Mosquitto 2 logs once its signal handlers are installed and it serves clients.
_RUNNING = " running\n"
#: Its start-up line, from which on it logs ``_RUNNING`` (Mosquitto 1.x does not).
_MOSQUITTO_2 = re.compile(r"mosquitto version [2-9]\.\S* starting")


def start_local_broker(**kwargs: Any) -> MosquittoBroker:
    """Start an anonymous broker for a quick local run (``auth=False``), or explain how to get one.

    There is no embedded Python fallback: see ``docs/protocol.md`` ("Brokers") for why.

    :raises FileNotFoundError: with the install hint if Mosquitto is missing.
    """
    kwargs.setdefault("auth", False)
    broker = MosquittoBroker(**kwargs)
    return broker.start()


def _users_from_password_file(path: Union[str, Path]) -> Dict[str, str]:
    """User name -> hash lines of a Mosquitto password file (for diagnostics and tests)."""
    users: Dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#") and ":" in line:
            name, _, hashed = line.partition(":")
            users[name] = hashed
    return users
