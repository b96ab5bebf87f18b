"""Shared pytest fixtures and helpers.

* :func:`require_tool` - path of an external tool; skips the test when it is missing, except on
  CI (``CI=true``) where a missing tool is a failure, so CI cannot go green by skipping.
  Use it from any test module: ``from conftest import require_tool``.
* ``mosquitto`` fixture - a real Mosquitto broker on a free loopback port with authentication
  and the edgehmoe ACL, users ``edgehmoe-server``, ``dev-a`` and ``dev-b`` (never a mock).
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

_EXTRA_PATHS = ("/usr/sbin", "/usr/local/sbin")

# How to install the tools tests may need (Debian/Ubuntu/Raspberry Pi OS, then macOS).
INSTALL_HINTS = {
    "mosquitto": "apt-get install -y mosquitto (Debian/Ubuntu/Raspberry Pi OS) or brew install mosquitto (macOS)",
    "mosquitto_passwd": "apt-get install -y mosquitto (Debian/Ubuntu/Raspberry Pi OS) or brew install mosquitto (macOS)",
    "openssl": "apt-get install -y openssl or brew install openssl",
}


def on_ci() -> bool:
    """True when running under CI (``CI=true``), where missing tools must fail, not skip."""
    return os.environ.get("CI", "").lower() == "true"


def skip_or_fail(reason: str) -> None:
    """``pytest.skip(reason)`` locally, ``pytest.fail(reason)`` on CI."""
    if on_ci():
        pytest.fail(f"{reason} (CI=true: missing prerequisites fail instead of skipping)")
    pytest.skip(reason)


def require_tool(name: str, hint: Optional[str] = None) -> str:
    """Path of executable ``name`` (also looked up in /usr/sbin); skip, or fail on CI, if missing."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATHS])
    path = shutil.which(name, path=search)
    if path is None:
        hint = hint or INSTALL_HINTS.get(name, f"install {name}")
        skip_or_fail(f"{name} not found: {hint}")
    return path  # type: ignore[return-value]


@dataclass
class BrokerFixture:
    """What the ``mosquitto`` fixture yields."""

    #: The running broker (``server.broker.MosquittoBroker``): ``stop()``, ``restart()``, ...
    broker: Any
    #: User name -> password for ``edgehmoe-server``, ``dev-a``, ``dev-b``.
    passwords: Dict[str, str]
    server_user: str = "edgehmoe-server"
    _connections: List[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.broker.url

    def client(self, user: Optional[str], client_id: Optional[str] = None, *, connect: bool = True,
               timeout: float = 10.0, **kwargs: Any) -> Any:
        """An ``edgehmoe.fl.mqtt.MqttConnection`` as ``user`` (closed at teardown).

        ``user=None`` connects anonymously.  Reconnect delays default to 1-2 s for fast tests.
        """
        from edgehmoe.fl.mqtt import MqttConnection

        kwargs.setdefault("reconnect_min_delay", 1)
        kwargs.setdefault("reconnect_max_delay", 2)
        if user is not None:
            kwargs.setdefault("username", user)
            kwargs.setdefault("password", self.passwords.get(user))
        conn = MqttConnection.from_url(self.url, client_id=client_id or user or "anonymous", **kwargs)
        self._connections.append(conn)
        if connect:
            conn.connect(timeout=timeout)
        return conn

    def close_all(self) -> None:
        for conn in self._connections:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - teardown must go on
                pass


@pytest.fixture
def mosquitto(tmp_path: Path):
    """A real Mosquitto with auth + ACL + persistence on a free loopback port.

    Function-scoped: start-up takes a few tens of milliseconds, and tests restart or stop the
    broker, so sharing one would couple tests.
    """
    require_tool("mosquitto")
    require_tool("mosquitto_passwd")
    from edgehmoe.server.broker import MosquittoBroker

    passwords = {user: secrets.token_urlsafe(12) for user in ("edgehmoe-server", "dev-a", "dev-b")}
    broker = MosquittoBroker(run_dir=tmp_path / "broker", persistence=tmp_path / "broker-db", verbose=True)
    for user, password in passwords.items():
        broker.add_user(user, password)
    broker.start()
    fixture = BrokerFixture(broker=broker, passwords=passwords)
    try:
        yield fixture
    finally:
        fixture.close_all()
        broker.close()
