"""Tests of edgehmoe.fl.mqtt and server.broker against a real Mosquitto (never a mock).

Broker users (see conftest.py): ``edgehmoe-server`` (read/write edgehmoe/#), ``dev-a`` and
``dev-b`` (each may only write its own hello/status/result and read its own task).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest
from conftest import require_tool

from edgehmoe.fl.mqtt import (
    MqttConnection,
    PublishRefused,
    Topics,
    Will,
    parse_broker_url,
)
from edgehmoe.fl.wire import Status, decode, encode

REPO = Path(__file__).resolve().parents[1]
RUN = "run1"


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def assert_nothing_received(conn: MqttConnection, wait: float = 0.5) -> None:
    with pytest.raises(TimeoutError):
        topic, payload = conn.receive(timeout=wait)
        pytest.fail(f"unexpected message on {topic}: {payload[:60]!r}")


# --------------------------------------------------------------------------------------------
# URLs and topics (no broker)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        ("mqtt://broker.lan:1884", ("broker.lan", 1884, False)),
        ("mqtt://broker.lan", ("broker.lan", 1883, False)),
        ("mqtts://broker.lan", ("broker.lan", 8883, True)),
        ("mqtts://10.0.0.2:9000", ("10.0.0.2", 9000, True)),
        ("localhost:1883", ("localhost", 1883, False)),
        ("pi-server", ("pi-server", 1883, False)),
        ("mqtt://[::1]:1883", ("::1", 1883, False)),
        ("  MQTT://Host:1/ ", ("host", 1, False)),
    ],
)
def test_parse_broker_url(url: str, expected: tuple) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    "url, message",
    [
        ("", "empty broker URL"),
        ("http://broker:1883", "scheme 'http' is not supported"),
        ("ws://broker:1883", "scheme 'ws' is not supported"),
        ("mqtt://broker:notaport", "expected mqtt://HOST"),
        ("mqtt://broker:70000", "expected mqtt://HOST"),
        ("mqtt://:1883", "no host"),
        ("mqtt://user:secret@broker:1883", "credentials"),
        ("mqtt://broker:1883/topic", "unexpected path"),
    ],
)
def test_parse_broker_url_errors(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_broker_url(url)


def test_bad_url_in_connection() -> None:
    with pytest.raises(ValueError, match="expected mqtt://HOST"):
        MqttConnection.from_url("mqtt://host:port", client_id="x")


@pytest.mark.parametrize("host, loopback", [
    ("localhost", True), ("LOCALHOST.", True), ("pi.localhost", True), ("127.0.0.1", True), ("127.8.9.10", True),
    ("::1", True), ("[::1]", True), ("broker.lan", False), ("10.0.0.2", False), ("localhost.example.com", False),
    ("::ffff:10.0.0.1", False), ("0.0.0.0", False),
])
def test_is_loopback_host(host: str, loopback: bool) -> None:
    from edgehmoe.fl.mqtt import is_loopback_host

    assert is_loopback_host(host) is loopback


def test_plain_mqtt_to_a_remote_broker_warns(caplog) -> None:
    # Issue #10: mqtt:// was the default with no warning although the password crosses the network.
    def warnings_for(url: str, **kwargs) -> list:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edgehmoe.fl.mqtt"):
            MqttConnection.from_url(url, client_id="dev-a", username="dev-a", password="pw", **kwargs)
        return [r.getMessage() for r in caplog.records if r.name == "edgehmoe.fl.mqtt"]

    [message] = warnings_for("mqtt://broker.lan:1883")
    assert message.startswith("plain MQTT to broker.lan:1883: the password of user 'dev-a' and every model update "
                              "cross the network unencrypted")
    assert "use mqtts://broker.lan" in message and "--insecure" in message
    assert warnings_for("mqtt://broker.lan:1883", insecure=True) == []
    assert warnings_for("mqtt://127.0.0.1:1883") == []
    assert warnings_for("mqtt://localhost") == []
    assert warnings_for("mqtt://[::1]:1883") == []
    assert warnings_for("mqtts://broker.lan") == []


def test_topics() -> None:
    topics = Topics(RUN)
    assert topics.hello("dev-a") == "edgehmoe/run1/device/dev-a/hello"
    assert topics.status("dev-a") == "edgehmoe/run1/device/dev-a/status"
    assert topics.task("dev-a") == "edgehmoe/run1/device/dev-a/task"
    assert topics.result("dev.7_b") == "edgehmoe/run1/device/dev.7_b/result"
    assert topics.server_filters() == [
        "edgehmoe/run1/device/+/hello",
        "edgehmoe/run1/device/+/status",
        "edgehmoe/run1/device/+/result",
    ]
    assert topics.device_from_topic("edgehmoe/run1/device/dev-b/result") == "dev-b"
    assert topics.parse("edgehmoe/run1/device/dev-b/hello") == ("dev-b", "hello")
    for bad in ("edgehmoe/run2/device/dev-b/result", "edgehmoe/run1/device/dev-b/other",
                "edgehmoe/run1/device/a/b/result", "edgehmoe/run1/device//result"):
        with pytest.raises(ValueError, match="not a device topic"):
            topics.parse(bad)
    for bad_id in ("a/b", "+", "#", "dev a", "", "x" * 129):
        with pytest.raises(ValueError, match="invalid device id"):
            topics.task(bad_id)
    with pytest.raises(ValueError, match="invalid run name"):
        Topics("run/1")


# --------------------------------------------------------------------------------------------
# Real broker
# --------------------------------------------------------------------------------------------


def test_round_trip_server_and_device(mosquitto) -> None:
    # Prepare
    topics = Topics(RUN)
    server = mosquitto.client("edgehmoe-server")
    for topic_filter in topics.server_filters():
        server.subscribe(topic_filter)
    device = mosquitto.client("dev-a")
    device.subscribe(topics.task("dev-a"))
    status = encode(Status(device_id="dev-a", state="idle", round=-1, detail=""))

    # Execute
    device.publish(topics.status("dev-a"), status, retain=True)
    server.publish(topics.task("dev-a"), b"task-bytes", expiry_s=60)

    # Assert
    topic, payload = server.receive(timeout=10)
    assert topics.parse(topic) == ("dev-a", "status")
    assert decode(payload, expect=Status).state == "idle"
    assert device.receive(timeout=10) == (topics.task("dev-a"), b"task-bytes")


def test_acl_confines_devices_to_their_own_topics(mosquitto) -> None:
    # Prepare
    topics = Topics(RUN)
    server = mosquitto.client("edgehmoe-server")
    server.subscribe(topics.result_filter())
    dev_a = mosquitto.client("dev-a")
    dev_b = mosquitto.client("dev-b")
    # dev-a tries to listen to dev-b's tasks too; the ACL filters delivery.
    dev_a.subscribe("edgehmoe/+/device/+/task")

    # Execute / Assert: writing another device's result is refused (PUBACK 0x87, MQTT v5) ...
    with pytest.raises(PublishRefused, match="not authorized") as info:
        dev_a.publish(topics.result("dev-b"), b"forged result")
    assert info.value.reason_code == 0x87
    # ... and so is writing its own task topic (devices only read it).
    with pytest.raises(PublishRefused):
        dev_a.publish(topics.task("dev-a"), b"self-assigned task")
    # ... while its own result topic is delivered.
    dev_a.publish(topics.result("dev-a"), b"genuine result")
    assert server.receive(timeout=10) == (topics.result("dev-a"), b"genuine result")
    assert_nothing_received(server)

    # dev-a receives its own task but not dev-b's.
    server.publish(topics.task("dev-b"), b"task for b")
    server.publish(topics.task("dev-a"), b"task for a")
    assert dev_a.receive(timeout=10) == (topics.task("dev-a"), b"task for a")
    assert_nothing_received(dev_a)
    del dev_b


def test_acl_with_mqtt311_drops_silently(mosquitto) -> None:
    """Why MQTT v5 is the default: under 3.1.1 a refused publish looks like a success."""
    topics = Topics(RUN)
    server = mosquitto.client("edgehmoe-server")
    server.subscribe(topics.result_filter())
    dev_a = mosquitto.client("dev-a", protocol="3.1.1")

    dev_a.publish(topics.result("dev-b"), b"forged result")  # no error ...
    dev_a.publish(topics.result("dev-a"), b"genuine result")

    assert server.receive(timeout=10) == (topics.result("dev-a"), b"genuine result")
    assert_nothing_received(server)  # ... but the forged one was dropped


_DEVICE_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from edgehmoe.fl.mqtt import MqttConnection, Topics, Will
    from edgehmoe.fl.wire import Status, encode

    url, dev = sys.argv[1], sys.argv[2]
    topics = Topics("run1")
    will = Will(topics.status(dev), encode(Status(device_id=dev, state="offline", round=-1,
                                                  detail="connection lost")))
    conn = MqttConnection.from_url(url, client_id=dev, username=dev,
                                   password=os.environ["EDGEHMOE_TEST_PASSWORD"], will=will, keepalive=5)
    conn.connect(timeout=10)
    conn.publish(topics.status(dev), encode(Status(device_id=dev, state="online", round=-1, detail="")),
                 retain=True)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_last_will_marks_killed_device_offline(mosquitto) -> None:
    # Prepare: the server listens to statuses; a device runs in a subprocess.
    topics = Topics(RUN)
    server = mosquitto.client("edgehmoe-server")
    server.subscribe(topics.status_filter())
    env = dict(os.environ, EDGEHMOE_TEST_PASSWORD=mosquitto.passwords["dev-a"],
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _DEVICE_SCRIPT, mosquitto.url, "dev-a"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"device subprocess failed: {line}{proc.stderr.read()}"
        topic, payload = server.receive(timeout=10)
        assert decode(payload, expect=Status).state == "online"

        # Execute: kill the device without a DISCONNECT (as a power cut would)
        proc.kill()
        proc.wait(timeout=10)

        # Assert
        topic, payload = server.receive(timeout=10)
        assert topic == topics.status("dev-a")
        status = decode(payload, expect=Status)
        assert (status.device_id, status.state) == ("dev-a", "offline")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()

    # The will was retained: a server that subscribes later still sees the device offline.
    # (One login per user name: client ids are user names, so the first server leaves first.)
    server.close()
    late = mosquitto.client("edgehmoe-server", "late-server")
    late.subscribe(topics.status_filter())
    assert decode(late.receive(timeout=10)[1], expect=Status).state == "offline"


def test_clean_close_does_not_publish_will(mosquitto) -> None:
    topics = Topics(RUN)
    server = mosquitto.client("edgehmoe-server")
    server.subscribe(topics.status_filter())
    will = Will(topics.status("dev-b"), encode(Status(device_id="dev-b", state="offline", round=-1, detail="")))
    device = mosquitto.client("dev-b", will=will)

    device.close()

    assert_nothing_received(server)


def test_bad_password_is_a_clear_connection_error(mosquitto) -> None:
    with pytest.raises(ConnectionError, match="bad credentials: user name 'dev-a'"):
        mosquitto.client("dev-a", password="wrong")
    with pytest.raises(ConnectionError, match="anonymous"):
        mosquitto.client(None)


def test_unreachable_broker_is_a_clear_connection_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conn = MqttConnection("127.0.0.1", port, client_id="x")
    with pytest.raises(ConnectionError, match=f"cannot reach MQTT broker at 127.0.0.1:{port}"):
        conn.connect(timeout=5)


def test_reconnect_after_broker_restart_restores_subscriptions(mosquitto) -> None:
    # Prepare: clean sessions, so only our on_connect renewal can restore the subscriptions
    topics = Topics(RUN)
    server = mosquitto.client("edgehmoe-server")
    server.subscribe(topics.result_filter())
    device = mosquitto.client("dev-a")
    device.subscribe(topics.task("dev-a"))
    server_connects, device_connects = server.connects, device.connects

    # Execute
    mosquitto.broker.restart()
    wait_for(lambda: server.connects > server_connects and device.connects > device_connects, 20,
             "both clients to reconnect")
    assert server.wait_connected(10) and device.wait_connected(10)

    # Assert: both directions work again
    device.publish(topics.result("dev-a"), b"after restart")
    assert server.receive(timeout=10) == (topics.result("dev-a"), b"after restart")
    server.publish(topics.task("dev-a"), b"next task")
    assert device.receive(timeout=10) == (topics.task("dev-a"), b"next task")


def test_messages_published_while_broker_is_down_are_delivered(mosquitto) -> None:
    # Prepare: the server keeps a persistent session (MQTT v5 session expiry) and the broker
    # persists it, so results published while the server is offline wait for it.
    topics = Topics(RUN)
    server = mosquitto.client("edgehmoe-server", "edgehmoe-server-run1", session_expiry_s=300)
    server.subscribe(topics.result_filter())
    device = mosquitto.client("dev-a")
    mosquitto.broker.stop()
    wait_for(lambda: not device.connected and not server.connected, 10, "clients to notice the broker is down")

    # Execute: publish while disconnected; paho keeps QoS 1 messages queued
    device.publish(topics.result("dev-a"), b"queued 1", wait=False)
    with pytest.raises(TimeoutError, match="not acknowledged"):
        device.publish(topics.result("dev-a"), b"queued 2", timeout=0.5)
    mosquitto.broker.start()

    # Assert
    received = {server.receive(timeout=20), server.receive(timeout=20)}
    assert received == {(topics.result("dev-a"), b"queued 1"), (topics.result("dev-a"), b"queued 2")}
    assert device.connects == 2 and server.connects == 2


def test_add_user_while_running_reloads_broker(mosquitto) -> None:
    with pytest.raises(ConnectionError):
        mosquitto.client("dev-c", password="pw-c")
    mosquitto.broker.add_user("dev-c", "pw-c")
    conn = mosquitto.client("dev-c", password="pw-c")
    assert conn.connected


def test_create_device_credentials(mosquitto, tmp_path: Path) -> None:
    from edgehmoe.server.broker import create_device_credentials

    # Execute
    path = create_device_credentials(mosquitto.broker.password_file, "pi-07", tmp_path / "creds")
    mosquitto.broker.reload()

    # Assert: a 0600 file holding a password the broker accepts for that device only
    assert path == tmp_path / "creds" / "pi-07.password"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    password = path.read_text().strip()
    assert len(password) >= 24
    device = mosquitto.client("pi-07", password=password)
    with pytest.raises(PublishRefused):
        device.publish(Topics(RUN).result("dev-a"), b"x")
    device.publish(Topics(RUN).result("pi-07"), b"x")
    with pytest.raises(ValueError, match="server's user name"):
        create_device_credentials(mosquitto.broker.password_file, "edgehmoe-server", tmp_path)
    with pytest.raises(ValueError, match="invalid device id"):
        create_device_credentials(mosquitto.broker.password_file, "a/#", tmp_path)


def test_create_device_credentials_creates_password_file(tmp_path: Path) -> None:
    require_tool("mosquitto_passwd")
    from edgehmoe.server.broker import (
        _users_from_password_file,
        create_device_credentials,
    )

    passwd = tmp_path / "etc" / "edgehmoe.passwd"
    create_device_credentials(passwd, "pi-01", tmp_path / "out")
    create_device_credentials(passwd, "pi-02", tmp_path / "out")
    assert sorted(_users_from_password_file(passwd)) == ["pi-01", "pi-02"]
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o600


def test_anonymous_local_broker() -> None:
    require_tool("mosquitto")
    from edgehmoe.server.broker import start_local_broker

    with start_local_broker() as broker:
        assert broker.url.startswith("mqtt://127.0.0.1:")
        with MqttConnection.from_url(broker.url, client_id="a") as sub, \
                MqttConnection.from_url(broker.url, client_id="b") as pub:
            sub.connect(timeout=10)
            pub.connect(timeout=10)
            sub.subscribe("edgehmoe/demo/#")
            pub.publish("edgehmoe/demo/x", b"hi")
            assert sub.receive(timeout=10) == ("edgehmoe/demo/x", b"hi")
        with pytest.raises(ValueError, match="without authentication"):
            broker.add_user("x", "y")
    assert not broker.running and not broker.run_dir.exists()


def test_on_message_callback_instead_of_queue(mosquitto) -> None:
    received: "queue.Queue" = queue.Queue()
    server = mosquitto.client("edgehmoe-server", on_message=lambda t, p: received.put((t, p)))
    server.subscribe(Topics(RUN).hello_filter())
    mosquitto.client("dev-b").publish(Topics(RUN).hello("dev-b"), b"hello")
    assert received.get(timeout=10) == (Topics(RUN).hello("dev-b"), b"hello")
    assert server.messages.empty()


# --------------------------------------------------------------------------------------------
# Templates and TLS
# --------------------------------------------------------------------------------------------


def test_shipped_acl_template_is_what_the_broker_uses() -> None:
    from edgehmoe.server.broker import TEMPLATE_DIR, render_acl

    assert render_acl() == (TEMPLATE_DIR / "acl").read_text()
    custom = render_acl("fl-server", runs=["cifar", "tiny"])
    assert "user fl-server\ntopic readwrite edgehmoe/cifar/#\ntopic readwrite edgehmoe/tiny/#\n" in custom
    assert "pattern read edgehmoe/cifar/device/%u/task\npattern read edgehmoe/tiny/device/%u/task\n" in custom
    rules = [line for line in custom.splitlines() if line and not line.startswith("#")]
    assert len(rules) == 2 + 2 * 2 + 2 * 4  # 2 user lines, 2 runs x (server + monitor + 4 device rules)
    assert "edgehmoe/edgehmoe/" not in custom and "edgehmoe/+/" not in custom
    assert "pattern write edgehmoe/+/device/%u/result" in render_acl(runs=None)
    from edgehmoe.fl.mqtt import TOPIC_ROOT
    from edgehmoe.server import broker

    assert broker.TOPIC_ROOT == TOPIC_ROOT  # spelled out there to keep paho out of the broker tools


def test_shipped_broker_config_template_is_the_default_rendering() -> None:
    from edgehmoe.server.broker import TEMPLATE_DIR, render_broker_config

    assert render_broker_config() == (TEMPLATE_DIR / "mosquitto.conf").read_text()


def test_production_config_template_starts(tmp_path: Path) -> None:
    """server/mosquitto/mosquitto.conf is valid for the installed Mosquitto (paths redirected)."""
    exe = require_tool("mosquitto")
    from edgehmoe.server.broker import TEMPLATE_DIR, add_password, free_port, render_acl

    port = free_port()
    text = (TEMPLATE_DIR / "mosquitto.conf").read_text()
    for old, new in [
        ("listener 1883 127.0.0.1\n", f"listener {port} 127.0.0.1\n"),
        ("/etc/mosquitto/edgehmoe.passwd", str(tmp_path / "passwd")),
        ("/etc/mosquitto/edgehmoe.acl", str(tmp_path / "acl")),
        ("/var/lib/mosquitto/", f"{tmp_path}/db/"),
        ("/var/log/mosquitto/mosquitto.log", str(tmp_path / "mosquitto.log")),
    ]:
        assert old in text
        text = text.replace(old, new)
    import pwd

    (tmp_path / "mosquitto.conf").write_text(f"user {pwd.getpwuid(os.geteuid()).pw_name}\n" + text)
    (tmp_path / "acl").write_text(render_acl())
    (tmp_path / "db").mkdir()
    add_password(tmp_path / "passwd", "edgehmoe-server", "pw")
    proc = subprocess.Popen([exe, "-c", str(tmp_path / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def port_open() -> bool:
            assert proc.poll() is None, (tmp_path / "mosquitto.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_for(port_open, 10, "the production config to come up")
        with MqttConnection("127.0.0.1", port, client_id="s", username="edgehmoe-server", password="pw") as conn:
            conn.connect(timeout=10)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _make_certificates(directory: Path) -> tuple:
    """A throw-away CA and a server certificate for 127.0.0.1 (valid for one day)."""
    openssl = require_tool("openssl")
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt, ext = directory / "server.key", directory / "server.csr", directory / "server.crt", directory / "ext"

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca_crt),
        "-days", "1", "-subj", "/CN=edgehmoe test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext.write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(crt), "-days", "1", "-extfile", str(ext))
    return ca_crt, crt, key


def test_tls_with_private_ca(tmp_path: Path) -> None:
    require_tool("mosquitto")
    from edgehmoe.server.broker import MosquittoBroker

    ca, crt, key = _make_certificates(tmp_path)
    with MosquittoBroker(certfile=crt, keyfile=key, run_dir=tmp_path / "broker") as broker:
        broker.add_user("edgehmoe-server", "pw")
        assert broker.url.startswith("mqtts://127.0.0.1:")
        conn = MqttConnection.from_url(broker.url, client_id="s", username="edgehmoe-server", password="pw",
                                       cafile=str(ca))
        with conn:
            conn.connect(timeout=10)
            conn.subscribe("edgehmoe/t/#")
            conn.publish("edgehmoe/t/x", b"secret")
            assert conn.receive(timeout=10) == ("edgehmoe/t/x", b"secret")
        # Without the private CA the broker's certificate is not trusted.
        untrusted = MqttConnection.from_url(broker.url, client_id="u", username="edgehmoe-server", password="pw")
        with pytest.raises(ConnectionError, match="TLS"):
            untrusted.connect(timeout=10)


SLOW_STARTER = textwrap.dedent('''\
    """Start-up order of Mosquitto 2 (src/mosquitto.c), slowed down: log "starting", open the
    port, and only a second later install the SIGHUP handler and log "running"."""
    import signal, socket, sys, time

    conf = dict(line.split(" ", 1) for line in open(sys.argv[2]).read().splitlines()
                if line and not line.startswith("#"))
    port, host = conf["listener"].split()
    log = open(conf["log_dest"].split(" ", 1)[1], "a", buffering=1)
    log.write("t: mosquitto version 2.0.11 starting\\n")
    s = socket.create_server((host, int(port)))
    time.sleep(1.0)  # a SIGHUP now takes the default action: the process dies
    signal.signal(signal.SIGHUP, lambda *a: log.write("t: Reloading config.\\n"))
    log.write("t: mosquitto version 2.0.11 running\\n")
    while True:
        s.accept()[0].close()
''')


def test_start_waits_until_the_broker_can_take_a_reload(tmp_path: Path) -> None:
    from edgehmoe.server.broker import MosquittoBroker

    # Prepare: an executable that opens its port a second before it could survive a SIGHUP
    # (Mosquitto does the same, in less time; at load 25 a reload right after start killed it)
    exe = tmp_path / "slow-mosquitto"
    exe.write_text(f"#!{sys.executable}\n" + SLOW_STARTER)
    exe.chmod(0o755)
    broker = MosquittoBroker(auth=False, run_dir=tmp_path / "b", executable=str(exe))
    try:
        # Execute
        broker.start()
        broker.reload()
        # Assert: the reload was taken, the broker still runs
        assert broker.running
        assert broker.log_path.read_text().count("Reloading config") == 1
    finally:
        broker.stop()
