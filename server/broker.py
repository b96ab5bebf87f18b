"""Run a Mosquitto broker for local runs and tests; manage device credentials.

:class:`MosquittoBroker` starts a private ``mosquitto`` process on a free loopback port with a
generated configuration, password file and ACL (the same rules as ``server/mosquitto/acl``) in a
run directory, in the spirit of paho-mqtt's ``tests/testsupport/broker.py``.  For a production
broker use ``server/mosquitto/mosquitto.conf`` and the system service instead.

:func:`create_device_credentials` adds a device user to a Mosquitto password file and writes
the device's password file (mode 0600) to copy onto the Pi.
"""

from __future__ import annotations

import logging
import os
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
from typing import Any, Dict, List, Optional, Union

from edgehmoe.errors import RunError, UsageError
from edgehmoe.fl.wire import MAX_PAYLOAD_BYTES, WireError, check_id

__all__ = [
    "SERVER_USER",
    "INSTALL_HINT",
    "TEMPLATE_DIR",
    "find_mosquitto",
    "free_port",
    "render_acl",
    "add_password",
    "create_device_credentials",
    "MosquittoBroker",
    "start_local_broker",
]

logger = logging.getLogger(__name__)

#: Default user name of the aggregation server on the broker.
SERVER_USER = "edgehmoe-server"

INSTALL_HINT = (
    "Mosquitto is not installed: apt-get install -y mosquitto (Debian, Ubuntu, Raspberry Pi OS) "
    "or brew install mosquitto (macOS)"
)

#: Shipped configuration templates (mosquitto.conf, acl).
TEMPLATE_DIR = Path(__file__).resolve().parent / "mosquitto"

# Room for the topic and MQTT headers above the largest wire payload.
_MAX_PACKET_BYTES = MAX_PAYLOAD_BYTES + 64 * 1024
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


def render_acl(server_user: str = SERVER_USER) -> str:
    """The shipped ACL template (``server/mosquitto/acl``) for the given server user name."""
    _check_user(server_user)
    text = (TEMPLATE_DIR / "acl").read_text(encoding="utf-8")
    line = f"user {SERVER_USER}\n"
    if line not in text:  # pragma: no cover - template edited inconsistently
        raise BrokerError(f"ACL template {TEMPLATE_DIR / 'acl'} has no '{line.strip()}' line")
    return text.replace(line, f"user {server_user}\n")


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
    if device_id == server_user:
        raise UsageError(f"device id {device_id!r} is the server's user name; pick another id")
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
    :param server_user: user name that gets read/write on ``edgehmoe/#``.
    :param certfile, keyfile: serve TLS (``mqtts://``) with this certificate and key.
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
        self.verbose = verbose
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

    def reload(self, timeout: float = 5.0) -> None:
        """Make Mosquitto re-read its password and ACL files (SIGHUP) and wait until it has."""
        if not self.running:
            raise BrokerError("broker is not running")
        before = self._count_in_log("Reloading config")
        assert self._proc is not None
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        # Mosquitto logs the line, then reloads in the same loop iteration, before it reads any
        # new socket: a client connecting after we saw the line meets the new configuration.
        while self._count_in_log("Reloading config") <= before:
            if time.monotonic() > deadline:
                raise BrokerError(f"mosquitto did not log a reload within {timeout} s (see {self.log_path})")
            time.sleep(0.02)

    def _count_in_log(self, needle: str) -> int:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace").count(needle)
        except FileNotFoundError:
            return 0

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
        if self.certfile is not None:
            lines += [f"certfile {self.certfile}", f"keyfile {self.keyfile}"]
        if self.auth:
            lines += ["allow_anonymous false", f"password_file {self.password_file}", f"acl_file {self.acl_file}"]
        else:
            lines += ["allow_anonymous true"]
        if self.persistence is not None:
            lines += ["persistence true", f"persistence_location {self.persistence}/", "autosave_interval 30"]
        else:
            lines += ["persistence false"]
        lines += [
            f"max_packet_size {_MAX_PACKET_BYTES}",
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
            self.acl_file.write_text(render_acl(self.server_user), encoding="utf-8")
            os.chmod(self.acl_file, 0o600)
            if not self.password_file.exists():
                # An empty password file is valid: nobody can log in until add_user().
                self.password_file.touch(mode=0o600)
        self.config_path.write_text(self._config_text(), encoding="utf-8")

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
        logger.info("mosquitto running on %s (pid %s, auth=%s, log %s)", self.url, self._proc.pid, self.auth,
                    self.log_path)

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
