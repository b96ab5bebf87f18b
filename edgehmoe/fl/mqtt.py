"""MQTT transport: broker URLs, the topic layout and a reconnecting connection.

This is the only module of edgehmoe that imports paho-mqtt (``pip install "edgehmoe[edge]"``).
It moves bytes; :mod:`edgehmoe.fl.wire` turns them into messages.

Topics (see ``docs/protocol.md``)::

    edgehmoe/<run>/device/<device id>/hello    device -> server   QoS 1
    edgehmoe/<run>/device/<device id>/status   device -> server   QoS 1, retained, last will
    edgehmoe/<run>/device/<device id>/task     server -> device   QoS 1
    edgehmoe/<run>/device/<device id>/result   device -> server   QoS 1

:class:`MqttConnection` speaks MQTT v5 by default.  Why v5 rather than 3.1.1: a broker that
refuses a QoS 1 PUBLISH (ACL) says so in the PUBACK reason code (0x87 Not authorized), which
v3.1.1 cannot express (Mosquitto acknowledges and silently drops it); CONNACK distinguishes bad
credentials from "not authorized"; a session expiry interval bounds how long the broker keeps a
disconnected client's queue; a message expiry interval lets a task die with its deadline.
Mosquitto >= 1.6, EMQX and HiveMQ support v5; ``protocol="3.1.1"`` remains for brokers that
do not.

TLS: ``mqtts://`` verifies the broker's certificate (``cafile`` for a private CA) and can
present a client certificate (``certfile``/``keyfile``) to a broker that requires one (mutual
TLS).  Plain ``mqtt://`` to a host that is not loopback logs a warning: the password and every
model update would cross the network readable (and alterable) by anyone on it; ``insecure=True``
(the client's ``--insecure``) silences it for a closed lab network.  See ``docs/security.md``.

Modelled on paho-mqtt's ``examples/client_sub.py`` and ``client_logger.py`` (callback API
version 2, five-argument ``on_connect``, ``enable_logger``).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import queue
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union
from urllib.parse import urlsplit

from edgehmoe.errors import EdgeHmoeError, MissingDependency, UsageError
from edgehmoe.fl.wire import WireError, check_id

try:
    import paho.mqtt.client as _paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
except ImportError as _err:  # pragma: no cover - exercised only without paho
    _paho = None
    _PAHO_IMPORT_ERROR: Optional[ImportError] = _err
else:
    _PAHO_IMPORT_ERROR = None

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_TLS_PORT",
    "TOPIC_ROOT",
    "parse_broker_url",
    "is_loopback_host",
    "Topics",
    "Will",
    "MqttError",
    "PublishRefused",
    "BrokerRefused",
    "MqttConnection",
]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
#: First topic level of everything edgehmoe publishes.
TOPIC_ROOT = "edgehmoe"

_URL_FORM = "mqtt://HOST[:PORT] (default port 1883), mqtts://HOST[:PORT] (TLS, default 8883) or HOST:PORT"

# Reason code values used in messages (MQTT v5 spec, section 2.4).
_RC_BAD_CREDENTIALS = 0x86
_RC_NOT_AUTHORIZED = 0x87


def _require_paho() -> None:
    if _paho is None:
        raise MissingDependency(
            'paho-mqtt is required for MQTT: pip install "paho-mqtt>=2,<3" (or "edgehmoe[edge]")'
        ) from _PAHO_IMPORT_ERROR


# --------------------------------------------------------------------------------------------
# URLs and topics
# --------------------------------------------------------------------------------------------


def parse_broker_url(url: str) -> Tuple[str, int, bool]:
    """Split a broker URL into ``(host, port, tls)``.

    Accepted: ``mqtt://host[:port]``, ``mqtts://host[:port]``, ``host:port`` (and bare ``host``);
    IPv6 hosts in brackets, e.g. ``mqtt://[::1]:1883``.  Credentials in the URL are refused: the
    password belongs in a file (``--password-file``), not in a command line or a config.

    :raises ValueError: saying the expected form.
    """
    if not isinstance(url, str) or not url.strip():
        raise UsageError(f"empty broker URL; expected {_URL_FORM}")
    text = url.strip()
    if "://" not in text:
        text = "mqtt://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as err:
        raise UsageError(f"bad broker URL {url!r} ({err}); expected {_URL_FORM}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts"):
        raise UsageError(f"bad broker URL {url!r}: scheme {parts.scheme!r} is not supported; expected {_URL_FORM}")
    if parts.username is not None or parts.password is not None:
        raise UsageError(
            f"bad broker URL {url!r}: do not put credentials in the URL; pass the user name "
            "separately and read the password from a file"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(f"bad broker URL {url!r}: unexpected path or query; expected {_URL_FORM}")
    host = parts.hostname
    if not host:
        raise UsageError(f"bad broker URL {url!r}: no host; expected {_URL_FORM}")
    tls = scheme == "mqtts"
    if port is None:
        port = DEFAULT_TLS_PORT if tls else DEFAULT_PORT
    if not 1 <= port <= 65535:
        raise UsageError(f"bad broker URL {url!r}: port {port} out of range 1-65535")
    return host, port, tls


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` (and ``*.localhost``) and loopback addresses (127.0.0.0/8, ::1).

    Names are not resolved: a name that happens to resolve to 127.0.0.1 counts as remote.
    """
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


_KINDS = ("hello", "status", "task", "result")


class Topics:
    """Topic names of one run: ``edgehmoe/<run>/device/<device id>/<kind>``.

    The broker ACL (``server/mosquitto/acl``) lets device ``<id>`` (its user name) write only its
    own ``hello``/``status``/``result`` and read only its own ``task``.
    """

    def __init__(self, run: str) -> None:
        try:
            self.run = check_id(run, "run name")
        except WireError as err:
            raise UsageError(str(err)) from None
        self._prefix = f"{TOPIC_ROOT}/{self.run}/device/"

    def __repr__(self) -> str:
        return f"Topics(run={self.run!r})"

    def _topic(self, device_id: str, kind: str) -> str:
        try:
            check_id(device_id, "device id")
        except WireError as err:
            raise UsageError(str(err)) from None
        return f"{self._prefix}{device_id}/{kind}"

    def hello(self, device_id: str) -> str:
        """Device -> server announcement."""
        return self._topic(device_id, "hello")

    def status(self, device_id: str) -> str:
        """Device -> server state (retained; also the last-will topic)."""
        return self._topic(device_id, "status")

    def task(self, device_id: str) -> str:
        """Server -> device training task."""
        return self._topic(device_id, "task")

    def result(self, device_id: str) -> str:
        """Device -> server training result."""
        return self._topic(device_id, "result")

    # Wildcard filters the server subscribes to.
    def hello_filter(self) -> str:
        """``edgehmoe/<run>/device/+/hello``."""
        return f"{self._prefix}+/hello"

    def status_filter(self) -> str:
        """``edgehmoe/<run>/device/+/status``."""
        return f"{self._prefix}+/status"

    def result_filter(self) -> str:
        """``edgehmoe/<run>/device/+/result``."""
        return f"{self._prefix}+/result"

    def server_filters(self) -> List[str]:
        """Everything the server listens to: hello, status and result of every device."""
        return [self.hello_filter(), self.status_filter(), self.result_filter()]

    def parse(self, topic: str) -> Tuple[str, str]:
        """``(device_id, kind)`` of a device topic of this run.

        :raises ValueError: if ``topic`` is not one of this run's device topics.
        """
        if isinstance(topic, str) and topic.startswith(self._prefix):
            rest = topic[len(self._prefix):].split("/")
            if len(rest) == 2 and rest[1] in _KINDS:
                try:
                    return check_id(rest[0], "device id"), rest[1]
                except WireError:
                    pass
        raise UsageError(f"{topic!r} is not a device topic of run {self.run!r} ({self._prefix}<id>/<kind>)")

    def device_from_topic(self, topic: str) -> str:
        """Device id in a device topic of this run (see :meth:`parse`)."""
        return self.parse(topic)[0]


# --------------------------------------------------------------------------------------------
# Connection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Will:
    """Last will: published by the broker when the connection drops without a DISCONNECT."""

    #: Topic, normally :meth:`Topics.status` of the device.
    topic: str
    #: Payload, normally ``wire.encode(Status(device_id, "offline", -1, ...))``.
    payload: bytes
    #: QoS of the will.
    qos: int = 1
    #: Retained, so a server that (re)subscribes later still sees the device as offline.
    retain: bool = True


class MqttError(EdgeHmoeError, RuntimeError):
    exit_code = 1

    """An MQTT operation failed (not connected in time, refused subscription, ...)."""


class BrokerRefused(ConnectionError):
    """The broker refused us for a reason retrying cannot fix: bad credentials, a client
    certificate it requires but we lack, or ours signed by another CA. (A certificate that
    is not valid *yet* is not one of them: a Pi without a clock is early until NTP runs.)"""


class PublishRefused(MqttError):
    """The broker answered a QoS 1 PUBLISH with a failure reason code (MQTT v5 only).

    ``reason_code`` is the numeric code, e.g. 0x87 = not authorized by the ACL.
    """

    def __init__(self, message: str, reason_code: int) -> None:
        super().__init__(message)
        self.reason_code = reason_code


def _reason_value(reason: Any) -> int:
    # paho's ReasonCode has .value (it does not support int()); v3 CONNACK codes may be ints.
    return int(getattr(reason, "value", reason))


def _reason_failed(reason: Any) -> bool:
    return _reason_value(reason) >= 0x80


OnMessage = Callable[[str, bytes], None]


def _publish_packet_size(topic: str, payload: Union[bytes, bytearray, str], properties: Any) -> int:
    """Bytes of the PUBLISH packet (upper bound): fixed header, topic, packet id, properties, payload."""
    body = len(payload.encode("utf-8") if isinstance(payload, str) else payload)
    props = len(properties.pack()) if properties is not None else 1
    remaining = 2 + len(topic.encode("utf-8")) + 2 + props + body
    return 1 + 4 + remaining  # 1 byte type/flags + up to 4 bytes remaining length


class _QuietDisconnectRace(logging.Filter):
    """paho's network loop logs "Client is not connected" at ERROR when it wakes up after a
    disconnect (ours on close, or a dropped link it is about to re-establish). It is benign
    and paho retries by itself; report it at DEBUG so it does not alarm users."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith("Client is not connected"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logger.isEnabledFor(logging.DEBUG)
        return True


_PAHO_LOGGER = logging.getLogger(__name__ + ".paho")
_PAHO_LOGGER.addFilter(_QuietDisconnectRace())


class MqttConnection:
    """A paho client that reconnects by itself and keeps its subscriptions.

    * Inbound messages go to the thread-safe queue :attr:`messages` as ``(topic, payload)``, or to
      ``on_message(topic, payload)`` if given (called in the network thread: do not block in it).
    * Subscriptions made with :meth:`subscribe` are renewed in ``on_connect`` after every
      (re)connect, so they survive a broker restart even without a persistent session.
    * QoS 1 messages published while disconnected stay in paho's queue and are sent on reconnect.
    * ``session_expiry_s > 0`` (MQTT v5) asks the broker to keep this client's session (its
      subscriptions and QoS 1 messages for it) that long while it is disconnected; with broker
      persistence this also survives a broker restart.  Needs a stable ``client_id``.

    Typical device use::

        conn = MqttConnection.from_url(url, client_id=dev, username=dev, password=pw,
                                       will=Will(topics.status(dev), encode(Status(dev, "offline", -1, ""))))
        conn.connect(timeout=10)
        conn.subscribe(topics.task(dev))
        topic, payload = conn.receive(timeout=60)
    """

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        client_id: str,
        username: Optional[str] = None,
        password: Optional[str] = None,
        tls: bool = False,
        cafile: Optional[str] = None,
        certfile: Optional[str] = None,
        keyfile: Optional[str] = None,
        insecure: bool = False,
        will: Optional[Will] = None,
        keepalive: int = 30,
        protocol: str = "5",
        session_expiry_s: int = 0,
        reconnect_min_delay: int = 1,
        reconnect_max_delay: int = 30,
        on_message: Optional[OnMessage] = None,
        max_queued_messages: int = 0,
    ) -> None:
        _require_paho()
        if protocol not in ("5", "3.1.1"):
            raise UsageError(f"protocol must be '5' or '3.1.1', got {protocol!r}")
        if not client_id:
            raise UsageError("client_id is required (use the broker user name: brokers configured by edgehmoe "
                             "replace the client id with it anyway)")
        if cafile is not None and not tls:
            raise UsageError("cafile given but tls is off; use an mqtts:// URL or tls=True")
        if (certfile is None) != (keyfile is None):
            raise UsageError("give both certfile and keyfile (client certificate and its key), or neither")
        if certfile is not None and not tls:
            raise UsageError("certfile/keyfile given but tls is off; use an mqtts:// URL or tls=True")
        if not tls and not insecure and not is_loopback_host(host):
            logger.warning(
                "plain MQTT to %s:%s: the password%s and every model update cross the network unencrypted, "
                "readable and alterable by anyone on it; use mqtts://%s (TLS: edgehmoe-server broker-config "
                "--tls, docs/security.md), or pass --insecure (insecure=True) on a closed lab network",
                host, port, f" of user {username!r}" if username else "", host)
        self.host = host
        self.port = int(port)
        self.client_id = client_id
        self.protocol = protocol
        self._v5 = protocol == "5"
        self._keepalive = int(keepalive)
        self._session_expiry_s = int(session_expiry_s)
        self._on_message_cb = on_message
        #: Inbound ``(topic, payload)`` pairs (unused when ``on_message`` is given).
        self.messages: "queue.Queue[Tuple[str, bytes]]" = queue.Queue()

        self._cond = threading.Condition()
        self._connected = False
        #: Number of accepted connections so far (1 after connect(), +1 per reconnect).
        self.connects = 0
        self._refusal: Optional[Any] = None  # reason code of a refused CONNECT
        self._closing = False
        self._ever_connected = False
        self._loop_thread: Optional[int] = None
        self._subscriptions: Dict[str, int] = {}
        self._resub_mid: Optional[int] = None  # SUBACK still awaited for the renewed subscriptions
        # mid -> (monotonic time of the ack, reason code or list of reason codes)
        self._acks: Dict[int, Tuple[float, Any]] = {}
        self._ack_count = 0  # acks recorded so far (pruning cadence)
        self._connect_callbacks: List[Callable[[], None]] = []
        self._tls_error: Optional[str] = None  # last TLS failure paho logged (e.g. certificate required)
        #: The broker's Maximum Packet Size from its last CONNACK (MQTT v5), ``None`` = not announced.
        self.broker_max_packet_size: Optional[int] = None

        if self._v5:
            client = _paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=_paho.MQTTv5)
        else:
            client = _paho.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=_paho.MQTTv311,
                clean_session=self._session_expiry_s <= 0,
            )
        client.enable_logger(_PAHO_LOGGER)
        client.reconnect_delay_set(min_delay=reconnect_min_delay, max_delay=reconnect_max_delay)
        client.max_queued_messages_set(max_queued_messages)
        self._username = username
        if username is not None:
            client.username_pw_set(username, password)
        if tls:
            # Default context: verifies the broker certificate and host name; cafile adds a private
            # CA; certfile/keyfile are our certificate for brokers that require one (mutual TLS).
            try:
                client.tls_set(ca_certs=cafile, certfile=certfile, keyfile=keyfile)
            except (ssl.SSLError, OSError) as err:
                raise UsageError(
                    f"cannot load the TLS files (cafile={cafile!r}, certfile={certfile!r}, keyfile={keyfile!r}): "
                    f"{err}; check the paths and that the key belongs to the certificate"
                ) from err
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.on_log = self._on_log
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        self._client = client

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "MqttConnection":
        """Like the constructor, with host, port and TLS taken from :func:`parse_broker_url`."""
        host, port, tls = parse_broker_url(url)
        return cls(host, port, tls=tls, **kwargs)

    def __repr__(self) -> str:
        return f"MqttConnection({self.client_id!r} -> {self.host}:{self.port}, v{self.protocol})"

    # ---- paho callbacks (network thread) -----------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._loop_thread = threading.get_ident()
        if _reason_failed(reason_code):
            logger.warning("%s: broker %s:%s refused the connection: %s", self.client_id, self.host,
                           self.port, reason_code)
            with self._cond:
                self._refusal = reason_code
                self._connected = False
                self._cond.notify_all()
            return
        max_packet = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        with self._cond:
            self.broker_max_packet_size = int(max_packet) if max_packet else None
            subscriptions = list(self._subscriptions.items())
            reconnect = self._ever_connected
            self._refusal = None
        resub_mid = None
        if subscriptions:
            # Renew after every (re)connect: a clean session (or a broker that lost its state)
            # has forgotten them.  Duplicates of a kept session are harmless.  The SUBACK is
            # handled by this same thread after we return, so recording its mid here is race-free.
            rc, mid = client.subscribe(subscriptions)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                resub_mid = mid
        logger.info("%s: %s to %s:%s (session present: %s, %d subscription(s) renewed)", self.client_id,
                    "reconnected" if reconnect else "connected", self.host, self.port,
                    getattr(flags, "session_present", None), len(subscriptions))
        with self._cond:
            self._connected = True
            self._ever_connected = True
            self.connects += 1
            self._resub_mid = resub_mid
            self._cond.notify_all()
        for callback in list(self._connect_callbacks):
            try:
                callback()
            except Exception:  # noqa: BLE001 - a hook must not kill the network thread
                logger.exception("%s: connect callback %r failed", self.client_id, callback)

    def _on_log(self, client: Any, userdata: Any, level: int, buf: str) -> None:
        # With TLS 1.3 a broker that refuses our (missing) client certificate says so only after
        # the handshake, as an alert paho meets while reading; keep it for connect()'s error.
        if level == _paho.MQTT_LOG_ERR and ("SSL" in buf or "certificate" in buf.lower()):
            with self._cond:
                self._tls_error = buf
                self._cond.notify_all()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._loop_thread = threading.get_ident()
        with self._cond:
            was_connected = self._connected
            self._connected = False
            closing = self._closing
            self._cond.notify_all()
        if closing:
            logger.debug("%s: disconnected (%s)", self.client_id, reason_code)
        elif was_connected:
            logger.warning("%s: lost connection to %s:%s (%s); reconnecting", self.client_id, self.host,
                           self.port, reason_code)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._loop_thread = threading.get_ident()
        topic, payload = message.topic, bytes(message.payload)
        if self._on_message_cb is None:
            self.messages.put((topic, payload))
            return
        try:
            self._on_message_cb(topic, payload)
        except Exception:  # noqa: BLE001 - keep the connection alive, report the handler bug
            logger.exception("%s: on_message handler failed for topic %s", self.client_id, topic)

    def _record_ack(self, mid: int, reason: Any) -> None:
        with self._cond:
            now = time.monotonic()
            self._acks[mid] = (now, reason)
            self._ack_count += 1
            if self._ack_count % 1024 == 0 and len(self._acks) > 4096:
                # acks of publishes nobody waits for (wait=False): a waiter takes its ack as soon as
                # it arrives, so one a minute old is nobody's
                for old in [m for m, (t, _) in self._acks.items() if t < now - 60.0]:
                    del self._acks[old]
            self._cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self._loop_thread = threading.get_ident()
        if _reason_failed(reason_code):
            logger.warning("%s: broker refused publish mid=%s: %s", self.client_id, mid, reason_code)
            self._record_ack(mid, reason_code)
        else:
            # 0, not paho's ReasonCode (~1 KB each, a copy of its names table): acks of publishes
            # nobody waits for (wait=False) stay here until their mid is reused or they are pruned
            self._record_ack(mid, 0)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        self._loop_thread = threading.get_ident()
        if any(_reason_failed(rc) for rc in reason_codes):
            logger.warning("%s: broker refused subscription mid=%s: %s", self.client_id, mid,
                           [str(rc) for rc in reason_codes])
        with self._cond:
            if mid == self._resub_mid:
                self._resub_mid = None
        self._record_ack(mid, list(reason_codes))

    def _on_unsubscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        self._record_ack(mid, list(reason_codes))

    # ---- public API ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a CONNACK-accepted connection is up."""
        with self._cond:
            return self._connected

    def _ready(self) -> bool:
        # Connected and the broker has acknowledged the renewed subscriptions.
        return self._connected and self._resub_mid is None

    def add_connect_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every successful (re)connect, in the network thread.

        Meant for e.g. re-publishing a retained "online" status; it must not block, so publish
        with ``wait=False`` inside it.
        """
        self._connect_callbacks.append(callback)

    def connect(self, timeout: float = 10.0, *, fresh_session: bool = False) -> None:
        """Connect, start the network thread and wait for the broker's CONNACK.

        After this returns, dropped connections are re-established automatically (exponential
        back-off between ``reconnect_min_delay`` and ``reconnect_max_delay``).
        ``fresh_session`` (with ``session_expiry_s``) discards a session the broker kept for
        this client id (its subscriptions and queued messages, e.g. of an earlier run) on this
        first connection; reconnects then resume the new session.

        :raises ConnectionError: broker unreachable, TLS failure, credentials refused, or no
            CONNACK within ``timeout``.
        """
        props = None
        clean_start: Any = _paho.MQTT_CLEAN_START_FIRST_ONLY
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            if self._session_expiry_s > 0:
                props.SessionExpiryInterval = self._session_expiry_s
                # resume the session the broker kept for us, unless asked to start a fresh one
                clean_start = _paho.MQTT_CLEAN_START_FIRST_ONLY if fresh_session else False
        with self._cond:
            self._closing = False
            self._refusal = None
            self._tls_error = None
        self._client.connect_timeout = timeout
        try:
            if self._v5:
                self._client.connect(self.host, self.port, self._keepalive, clean_start=clean_start,
                                     properties=props)
            else:
                self._client.connect(self.host, self.port, self._keepalive)
        except ssl.SSLError as err:
            raise ConnectionError(f"TLS handshake with MQTT broker {self.host}:{self.port} failed: {err}") from err
        except OSError as err:
            raise ConnectionError(
                f"cannot reach MQTT broker at {self.host}:{self.port}: {err} (is the broker running, "
                "and the host/port right?)"
            ) from err
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._ready() and self._refusal is None and self._tls_error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            connected, refusal, tls_error = self._ready(), self._refusal, self._tls_error
        if connected:
            return
        self._shutdown()
        if refusal is None and tls_error is not None:
            hint = "check --cafile, and the broker's certificate and host name"
            permanent = True
            if "certificate required" in tls_error.lower() or "CERTIFICATE_REQUIRED" in tls_error:
                hint = ("the broker requires a client certificate: give --certfile and --keyfile "
                        "(EDGEHMOE_CERTFILE/EDGEHMOE_KEYFILE; edgehmoe-server credentials add --client-cert)")
            elif "unknown ca" in tls_error.lower() or "bad certificate" in tls_error.lower():
                hint = "the broker rejected our client certificate: it must be signed by the broker's CA"
            else:
                permanent = False  # e.g. the broker's certificate is not valid yet on a clock not set
            raise (BrokerRefused if permanent else ConnectionError)(
                f"TLS connection of client {self.client_id!r} to MQTT broker {self.host}:{self.port} failed: "
                f"{tls_error}; {hint}")
        if refusal is not None:
            code = _reason_value(refusal)
            # Mosquitto 2 answers a wrong password with 0x87 "not authorized", not 0x86.
            # 4 and 5 are the MQTT 3.1.1 CONNACK codes for the same two cases.
            refused = code in (_RC_BAD_CREDENTIALS, _RC_NOT_AUTHORIZED, 4, 5)
            if refused:
                if self._username is None:
                    hint = ("not authorized: the broker does not accept anonymous clients; give a user "
                            "name and a password file")
                else:
                    hint = (f"bad credentials: user name {self._username!r} or its password was rejected "
                            f"({refusal}); check the user name and the password file")
            else:
                hint = str(refusal)
            raise (BrokerRefused if refused else ConnectionError)(
                f"MQTT broker {self.host}:{self.port} refused client {self.client_id!r}: {hint}")
        raise ConnectionError(f"no answer (CONNACK) from MQTT broker {self.host}:{self.port} within {timeout} s")

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        """Block until connected and the subscriptions are renewed (e.g. after a broker restart).

        Returns False on timeout.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._ready():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def _check_not_network_thread(self, what: str) -> None:
        if threading.get_ident() == self._loop_thread:
            raise MqttError(f"cannot wait for {what} inside an MQTT callback (it would deadlock); use wait=False")

    def _wait_ack(self, mid: int, since: float, timeout: Optional[float], what: str) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                ack = self._acks.get(mid)
                # An entry older than our request belongs to an earlier use of this mid.
                if ack is not None and ack[0] >= since:
                    del self._acks[mid]
                    return ack[1]
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{what} not acknowledged by the broker within {timeout} s")
                self._cond.wait(left)

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: Optional[float] = 10.0) -> None:
        """Subscribe now (waiting for SUBACK if connected) and again after every reconnect.

        Note: Mosquitto's ``acl_file`` never refuses a subscription; it filters delivery instead.

        :raises MqttError: if the broker refuses the subscription.
        :raises TimeoutError: no SUBACK within ``timeout`` (the subscription is still renewed on
            the next reconnect).
        """
        if qos not in (0, 1, 2):
            raise UsageError(f"qos must be 0, 1 or 2, got {qos}")
        with self._cond:
            self._subscriptions[topic_filter] = qos
            connected = self._connected
        if not connected:
            logger.debug("%s: not connected; %s will be subscribed on connect", self.client_id, topic_filter)
            return
        self._check_not_network_thread("SUBACK")
        since = time.monotonic()
        rc, mid = self._client.subscribe(topic_filter, qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            logger.info("%s: subscribe %s deferred to reconnect (%s)", self.client_id, topic_filter,
                        _paho.error_string(rc))
            return
        reasons = self._wait_ack(mid, since, timeout, f"subscription to {topic_filter}")
        failed = [r for r in reasons if _reason_failed(r)]
        if failed:
            with self._cond:
                self._subscriptions.pop(topic_filter, None)
            raise MqttError(f"broker refused subscription to {topic_filter}: {failed[0]}")

    def unsubscribe(self, topic_filter: str) -> None:
        """Forget a subscription (and unsubscribe now if connected)."""
        with self._cond:
            self._subscriptions.pop(topic_filter, None)
            connected = self._connected
        if connected:
            self._client.unsubscribe(topic_filter)

    def publish(
        self,
        topic: str,
        payload: Union[bytes, bytearray, str],
        qos: int = 1,
        retain: bool = False,
        wait: bool = True,
        timeout: Optional[float] = 30.0,
        expiry_s: Optional[float] = None,
    ) -> int:
        """Publish; with ``qos=1`` and ``wait`` block until the broker's PUBACK.

        A QoS 1 message published while disconnected is queued by paho and sent after the
        reconnect; ``wait`` then blocks until that PUBACK (or ``timeout``).

        :param expiry_s: MQTT v5 message expiry: the broker drops the message if it could not
            deliver it within this many seconds (e.g. a task past its deadline).
        :returns: the message id.
        :raises PublishRefused: the broker answered with a failure reason code (v5), e.g. 0x87 not
            authorized by the ACL.
        :raises TimeoutError: no PUBACK within ``timeout``; the message stays queued and is
            resent after a reconnect.
        :raises ConnectionError: a QoS 0 message could not be sent (not connected).
        """
        if not topic or "+" in topic or "#" in topic:
            raise UsageError(f"cannot publish to {topic!r}: empty or contains a wildcard")
        if qos not in (0, 1, 2):
            raise UsageError(f"qos must be 0, 1 or 2, got {qos}")
        properties = None
        if expiry_s is not None:
            if self._v5:
                properties = Properties(PacketTypes.PUBLISH)
                properties.MessageExpiryInterval = max(1, int(math.ceil(expiry_s)))
            else:
                logger.debug("%s: message expiry needs MQTT v5; ignored", self.client_id)
        limit = self.broker_max_packet_size
        if limit is not None:
            # Mosquitto answers an oversized PUBLISH by closing the connection, and paho would resend
            # the queued message after every reconnect: refuse it here instead, once, with the reason.
            size = _publish_packet_size(topic, payload, properties)
            if size > limit:
                raise MqttError(
                    f"message to {topic} is a {size}-byte packet, above the broker's maximum packet size of "
                    f"{limit} bytes (max_packet_size in mosquitto.conf; see docs/security.md); not sent")
        if wait and qos > 0:
            self._check_not_network_thread("PUBACK")
        since = time.monotonic()
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise MqttError(f"outgoing queue full; message to {topic} dropped")
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            if qos == 0:
                raise ConnectionError(f"not connected; QoS 0 message to {topic} dropped")
            logger.info("%s: not connected; message to %s queued until reconnect", self.client_id, topic)
        elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise MqttError(f"publish to {topic} failed: {_paho.error_string(info.rc)}")
        if not wait or qos == 0:
            return info.mid
        reason = self._wait_ack(info.mid, since, timeout, f"message to {topic}")
        if _reason_failed(reason):
            code = _reason_value(reason)
            text = "not authorized (broker ACL)" if code == _RC_NOT_AUTHORIZED else str(reason)
            raise PublishRefused(f"broker refused message to {topic}: {text}", code)
        return info.mid

    def receive(self, timeout: Optional[float] = None) -> Tuple[str, bytes]:
        """Next inbound ``(topic, payload)`` from :attr:`messages`.

        :raises TimeoutError: nothing arrived within ``timeout``.
        """
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no MQTT message within {timeout} s") from None

    def _shutdown(self) -> None:
        with self._cond:
            self._closing = True
        try:
            self._client.disconnect()
        except Exception:  # noqa: BLE001 - best effort while closing
            logger.debug("%s: disconnect failed", self.client_id, exc_info=True)
        self._client.loop_stop()
        with self._cond:
            self._connected = False
            self._cond.notify_all()

    def unacked(self) -> int:
        """QoS 1/2 messages published and not yet acknowledged by the broker (queued or in flight).

        Lets a publisher of many messages keep going without a round trip per message while it
        bounds what waits in memory (the server publishing a round's tasks, issue #12).
        """
        return len(self._client._out_messages)

    def drop_link(self) -> None:
        """Cut the TCP connection without a DISCONNECT, as a power cut or a Wi-Fi loss would.

        The broker publishes the last will; the connection then reconnects by itself (after
        ``reconnect_min_delay``). Fault injection for tests and the fleet emulator.
        """
        import socket as _socket

        sock = self._client.socket()
        if sock is not None:
            try:
                sock.shutdown(_socket.SHUT_RDWR)
            except OSError:  # already gone
                pass

    def close(self) -> None:
        """Disconnect cleanly (the broker does NOT publish the will) and stop the network thread.

        QoS 1 messages still queued are lost; publish with ``wait=True`` first if they matter.
        """
        self._shutdown()
        logger.debug("%s: closed", self.client_id)

    def __enter__(self) -> "MqttConnection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
