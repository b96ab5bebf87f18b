"""What one device credential cannot do to the broker, against a real Mosquitto (issue #10).

Each test plays the attacker with an ordinary device account (``dev-b``) and checks the victim
(the server or another device) with values: connection counts, delivered messages, the
broker's own log.  Rows refer to the issue's table:

* row 5: connecting with another client's id took over its session (the victim was
  disconnected; its persistent session and queued task were discarded);
* row 7: oversized messages and an unbounded queue for an offline server;
* row 8: the ACL's ``+`` let a device publish into any run.
"""

from __future__ import annotations

import re
import secrets
import socket
import time
from pathlib import Path

import pytest
from conftest import require_tool

from edgehmoe.fl.mqtt import MqttConnection, MqttError, PublishRefused, Topics

RUN = "run1"
USERS = ("edgehmoe-server", "dev-a", "dev-b")


def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def drain(conn: MqttConnection, wait: float = 1.0) -> list:
    got = []
    while True:
        try:
            got.append(conn.receive(timeout=wait))
        except TimeoutError:
            return got


@pytest.fixture
def broker(tmp_path: Path):
    """A broker built like simulate's: auth, ACL, persistence; users edgehmoe-server, dev-a, dev-b.

    ``make(**options)`` starts it with extra MosquittoBroker options (e.g. ``runs=[...]``).
    """
    require_tool("mosquitto")
    require_tool("mosquitto_passwd")
    from edgehmoe.server.broker import MosquittoBroker

    started = []
    passwords = {u: secrets.token_urlsafe(12) for u in USERS}

    def make(**options):
        b = MosquittoBroker(run_dir=tmp_path / f"broker{len(started)}", persistence=tmp_path / f"db{len(started)}",
                            **options)
        for user, password in passwords.items():
            b.add_user(user, password)
        b.start()
        b.passwords = passwords
        started.append(b)
        return b

    connections = []

    def connect(b, user: str, client_id: str | None = None, **kwargs) -> MqttConnection:
        kwargs.setdefault("reconnect_min_delay", 1)
        kwargs.setdefault("reconnect_max_delay", 1)
        conn = MqttConnection.from_url(b.url, client_id=client_id or user, username=user,
                                       password=passwords[user], **kwargs)
        connections.append(conn)
        conn.connect(timeout=10)
        return conn

    make.connect = connect
    try:
        yield make
    finally:
        for conn in connections:
            conn.close()
        for b in started:
            b.close()


# --------------------------------------------------------------------------------------------
# Row 5: session takeover
# --------------------------------------------------------------------------------------------


def test_issue10_row5_device_cannot_disconnect_the_server_or_another_device(broker) -> None:
    # Prepare: the server (persistent session) and dev-a are connected and talking
    b = broker()
    topics = Topics(RUN)
    server = broker.connect(b, "edgehmoe-server", f"edgehmoe-server-{RUN}", session_expiry_s=300)
    server.subscribe(topics.result_filter())
    victim = broker.connect(b, "dev-a", session_expiry_s=300)
    victim.subscribe(topics.task("dev-a"))

    # Execute: dev-b's credential connects with each victim's client id, as the issue did
    for stolen_id in (f"edgehmoe-server-{RUN}", "edgehmoe-server", "dev-a"):
        attacker = broker.connect(b, "dev-b", stolen_id)
        assert attacker.connected
        attacker.close()
    time.sleep(2.5)  # longer than the victims' 1 s reconnect delay: a kick-out would show

    # Assert: neither victim was ever disconnected, and both directions still work
    assert (server.connects, server.connected) == (1, True)
    assert (victim.connects, victim.connected) == (1, True)
    victim.publish(topics.result("dev-a"), b"result after the attack")
    assert server.receive(timeout=10) == (topics.result("dev-a"), b"result after the attack")
    server.publish(topics.task("dev-a"), b"task after the attack")
    assert victim.receive(timeout=10) == (topics.task("dev-a"), b"task after the attack")
    # The broker renamed the attacker's connections to its own user name
    ids = re.findall(r"New client connected from \S+ as (\S+) \(p5, c\d, k\d+, u'dev-b'\)", b.log_path.read_text())
    assert ids == ["dev-b"] * 3


def test_issue10_row5_device_cannot_destroy_another_devices_queued_task(broker) -> None:
    # Prepare: dev-a has a persistent session and is away; the server queues a task for it
    b = broker()
    topics = Topics(RUN)
    server = broker.connect(b, "edgehmoe-server")
    away = broker.connect(b, "dev-a", session_expiry_s=300)
    away.subscribe(topics.task("dev-a"))
    away.close()
    server.publish(topics.task("dev-a"), b"queued task")

    # Execute: dev-b connects with dev-a's client id and a clean start (which discards a session)
    attacker = broker.connect(b, "dev-b", "dev-a")
    attacker.close()

    # Assert: dev-a comes back to its session and still gets the task
    back = broker.connect(b, "dev-a", session_expiry_s=300)
    back.subscribe(topics.task("dev-a"))
    assert back.receive(timeout=10) == (topics.task("dev-a"), b"queued task")


def test_one_login_per_user_name(broker) -> None:
    # The price of binding client ids to user names: a second login with the same account takes
    # over the first one's session, which is why monitoring uses its own account.
    b = broker()
    first = broker.connect(b, "dev-a", "dev-a-first")
    broker.connect(b, "dev-a", "dev-a-second")
    wait_for(lambda: first.connects >= 2, 10, "the first login to be taken over and reconnect")


# --------------------------------------------------------------------------------------------
# Row 8: runs
# --------------------------------------------------------------------------------------------


def test_issue10_row8_device_cannot_publish_into_another_run(broker) -> None:
    # Prepare: the ACL admits run "run1" only
    b = broker(runs=[RUN])
    mine, other = Topics(RUN), Topics("other-run")
    server = broker.connect(b, "edgehmoe-server")
    server.subscribe(mine.result_filter())
    device = broker.connect(b, "dev-a")
    device.subscribe(other.task("dev-a"))

    # Execute / Assert: every kind of device topic of another run is refused (PUBACK 0x87)
    for kind in ("hello", "status", "result"):
        with pytest.raises(PublishRefused) as refused:
            device.publish(getattr(other, kind)("dev-a"), b"into another run", timeout=10)
        assert refused.value.reason_code == 0x87
    # its own run still works
    device.publish(mine.result("dev-a"), b"own run")
    assert server.receive(timeout=10) == (mine.result("dev-a"), b"own run")
    # and it cannot read another run's tasks either: even the server cannot write there
    with pytest.raises(PublishRefused):
        server.publish(other.task("dev-a"), b"task of another run", timeout=10)
    assert drain(device, 0.5) == []

    # A run admitted later (MosquittoBroker.add_run rewrites the ACL and reloads) is open to the device
    b.add_run("other-run")
    device.publish(other.result("dev-a"), b"now admitted", timeout=10)
    server.publish(other.task("dev-a"), b"task of the new run", timeout=10)
    assert device.receive(timeout=10) == (other.task("dev-a"), b"task of the new run")


# --------------------------------------------------------------------------------------------
# Row 7: sizes and queues
# --------------------------------------------------------------------------------------------


def test_issue10_row7_oversize_publish_is_refused(broker) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    # Prepare: payloads up to 16 KiB (packet limit 16 KiB + 64 KiB of headroom)
    b = broker(max_payload_bytes=16 * 1024)
    topics = Topics(RUN)
    server = broker.connect(b, "edgehmoe-server")
    server.subscribe(topics.result_filter())
    device = broker.connect(b, "dev-a")
    too_big = b"x" * (b.max_packet_bytes + 1)

    # Execute / Assert: our client knows the limit from the CONNACK and refuses to send
    assert device.broker_max_packet_size == b.max_packet_bytes == 16 * 1024 + 64 * 1024
    with pytest.raises(MqttError, match="above the broker's maximum packet size"):
        device.publish(topics.result("dev-a"), too_big)
    assert device.connected and device.connects == 1

    # A client that sends it anyway (plain paho) is disconnected, and nothing reaches the server
    reasons: list = []
    raw = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev-b", protocol=paho.MQTTv5)
    raw.username_pw_set("dev-b", b.passwords["dev-b"])
    raw.on_disconnect = lambda client, userdata, flags, reason, properties: reasons.append(str(reason))
    raw.connect(b.host, b.port)
    raw.loop_start()
    try:
        wait_for(raw.is_connected, 10, "the raw client to connect")
        raw.publish(topics.result("dev-b"), too_big, qos=1)
        wait_for(lambda: reasons, 10, "the broker to drop the oversize sender")
    finally:
        raw.loop_stop()
    assert reasons[0] == "Packet too large"
    assert drain(server, 1.0) == []
    # a message within the limit still goes through
    device.publish(topics.result("dev-a"), b"y" * (16 * 1024))
    assert server.receive(timeout=10) == (topics.result("dev-a"), b"y" * (16 * 1024))


def test_issue10_row7_queue_for_an_offline_server_is_bounded(broker) -> None:
    # Prepare: 1 MB may be queued per client; the server's persistent session is offline
    b = broker(max_queued_bytes=1_000_000)
    topics = Topics(RUN)
    server = broker.connect(b, "edgehmoe-server", session_expiry_s=300)
    server.subscribe(topics.result_filter())
    server.close()
    device = broker.connect(b, "dev-a")

    # Execute: the device publishes 10 x 300 kB (the broker acknowledges them all)
    for i in range(10):
        device.publish(topics.result("dev-a"), bytes([i]) * 300_000, timeout=10)

    # Assert: the server gets the first messages up to the byte limit, the rest was dropped
    back = broker.connect(b, "edgehmoe-server", session_expiry_s=300)
    back.subscribe(topics.result_filter())
    received = [payload[0] for _, payload in drain(back, 2.0)]
    assert received == [0, 1, 2, 3]  # 4 x 300 kB: Mosquitto stops once the limit is exceeded


def test_broker_without_runs_admits_each_run_when_added(broker) -> None:
    # How a local federation can pin its runs: start with none, admit each before its clients start
    b = broker(runs=[])
    device = broker.connect(b, "dev-a")
    with pytest.raises(PublishRefused):
        device.publish(Topics("phase-1").hello("dev-a"), b"too early", timeout=10)
    b.add_run("phase-1")
    assert "pattern write edgehmoe/phase-1/device/%u/hello" in b.acl_file.read_text()
    device.publish(Topics("phase-1").hello("dev-a"), b"admitted", timeout=10)
    with pytest.raises(PublishRefused):
        device.publish(Topics("phase-2").hello("dev-a"), b"not yet", timeout=10)


def test_generated_configs_bind_ids_and_limit_sizes(tmp_path: Path) -> None:
    require_tool("mosquitto")
    from edgehmoe.server.broker import MAX_PACKET_BYTES, MosquittoBroker

    # Prepare / Execute
    b = MosquittoBroker(run_dir=tmp_path / "b", runs=["cifar"])
    b.port = 1883  # not started: only the text is looked at
    b._write_files()
    conf = b.config_path.read_text().splitlines()
    acl = b.acl_file.read_text()
    # Assert
    assert "listener 1883 127.0.0.1" in conf and "use_username_as_clientid true" in conf
    assert f"max_packet_size {MAX_PACKET_BYTES}" in conf and MAX_PACKET_BYTES == 64 * 2**20 + 64 * 2**10
    assert f"max_queued_bytes {64 * 2**20 + 64 * 2**10}" in conf and "max_queued_messages 1000" in conf
    assert "pattern write edgehmoe/cifar/device/%u/result" in acl and "edgehmoe/+/" not in acl
    anonymous = MosquittoBroker(run_dir=tmp_path / "anon", auth=False)
    anonymous.port = 1883
    assert "use_username_as_clientid" not in anonymous._config_text()  # it would refuse anonymous clients


def test_plain_listener_is_loopback_only(broker) -> None:
    import ipaddress

    import psutil

    b = broker()
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback]
    if not others:
        pytest.skip("this host has no non-loopback IPv4 address to try")
    socket.create_connection(("127.0.0.1", b.port), timeout=2).close()
    for address in others:  # the same port on another interface of this host is closed
        with pytest.raises(OSError):
            socket.create_connection((address, b.port), timeout=2).close()
