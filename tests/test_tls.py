"""TLS end to end against a real Mosquitto TLS listener on loopback (issue #10).

Certificates come from ``edgehmoe.server.broker`` (``create_ca`` & co., the code behind
``edgehmoe-server broker-config --tls`` and ``credentials add --client-cert``), never from
fixtures checked into the repository:

* server-authenticated TLS: a client trusting the private CA connects by DNS name and by IP;
  one without the CA, or reaching the broker under a name the certificate does not carry, fails;
* mutual TLS: a client without a certificate, or with one from another CA, is refused in the
  handshake with an error that says what to do; one with a CA-signed certificate works;
* the production config written by ``broker-config --tls --client-certs`` runs in Mosquitto.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_tool

from edgehmoe.fl.mqtt import MqttConnection, Topics

RUN = "run1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a broker certificate for localhost/127.0.0.1, client certificates for dev-a and the
    server, and a second CA with its own dev-a certificate (the wrong issuer)."""
    require_tool("openssl")
    from edgehmoe.server.broker import create_ca, create_client_certificate, create_server_certificate

    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = create_ca(d / "ca", days=2)
    server_crt, server_key = create_server_certificate(ca, ca_key, d / "ca", ["localhost", "127.0.0.1"], days=2)
    dev_crt, dev_key = create_client_certificate(ca, ca_key, d / "clients", "dev-a", days=2)
    srv_crt, srv_key = create_client_certificate(ca, ca_key, d / "clients", "edgehmoe-server", days=2)
    other_ca, other_key = create_ca(d / "other", days=2)
    rogue_crt, rogue_key = create_client_certificate(other_ca, other_key, d / "other", "dev-a", days=2)
    return {
        "dir": d, "ca": ca, "ca_key": ca_key, "server": (server_crt, server_key), "dev-a": (dev_crt, dev_key),
        "edgehmoe-server": (srv_crt, srv_key), "rogue": (rogue_crt, rogue_key), "other_ca": other_ca,
    }


@pytest.fixture
def tls_broker(tmp_path: Path, pki):
    """``make(require_certificate=...)``: a Mosquitto with a TLS listener on 127.0.0.1."""
    require_tool("mosquitto")
    require_tool("mosquitto_passwd")
    from edgehmoe.server.broker import MosquittoBroker

    brokers = []
    passwords = {u: secrets.token_urlsafe(12) for u in ("edgehmoe-server", "dev-a")}

    def make(require_certificate: bool = False):
        crt, key = pki["server"]
        b = MosquittoBroker(run_dir=tmp_path / f"broker{len(brokers)}", certfile=crt, keyfile=key, cafile=pki["ca"],
                            require_certificate=require_certificate, runs=[RUN])
        for user, password in passwords.items():
            b.add_user(user, password)
        b.start()
        b.passwords = passwords
        brokers.append(b)
        return b

    yield make
    for b in brokers:
        b.close()


def connect(b, user: str, host: str = "localhost", cert=None, cafile=None, timeout: float = 10.0) -> MqttConnection:
    certfile, keyfile = (str(cert[0]), str(cert[1])) if cert else (None, None)
    conn = MqttConnection(host, b.port, tls=True, cafile=str(cafile) if cafile else None, certfile=certfile,
                          keyfile=keyfile, client_id=user, username=user, password=b.passwords[user],
                          reconnect_min_delay=1, reconnect_max_delay=1)
    conn.connect(timeout=timeout)
    return conn


def openssl(*args: str) -> str:
    return subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True, text=True,
                          timeout=60).stdout


# --------------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------------


def test_certificates_chain_to_the_ca_and_keys_are_private(pki) -> None:
    ca = str(pki["ca"])
    for crt, key in (pki["server"], pki["dev-a"], pki["edgehmoe-server"]):
        assert openssl("verify", "-CAfile", ca, str(crt)).strip() == f"{crt}: OK"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pki["ca_key"].stat().st_mode) == 0o600
    server = openssl("x509", "-in", str(pki["server"][0]), "-noout", "-ext", "subjectAltName,extendedKeyUsage")
    assert "DNS:localhost, IP Address:127.0.0.1" in server and "TLS Web Server Authentication" in server
    client = openssl("x509", "-in", str(pki["dev-a"][0]), "-noout", "-subject", "-ext", "extendedKeyUsage")
    assert "CN = dev-a" in client and "TLS Web Client Authentication" in client
    # the rogue certificate does not chain to our CA
    with pytest.raises(subprocess.CalledProcessError):
        openssl("verify", "-CAfile", ca, str(pki["rogue"][0]))


def test_certificates_are_not_overwritten_by_accident(pki) -> None:
    from edgehmoe.server.broker import create_ca, create_client_certificate

    with pytest.raises(FileExistsError, match="ca.crt.*--force"):
        create_ca(pki["dir"] / "ca")
    with pytest.raises(FileExistsError, match="dev-a.crt"):
        create_client_certificate(pki["ca"], pki["ca_key"], pki["dir"] / "clients", "dev-a")
    with pytest.raises(ValueError, match="invalid broker user name"):
        create_client_certificate(pki["ca"], pki["ca_key"], pki["dir"] / "clients", "a/b")


# --------------------------------------------------------------------------------------------
# Server-authenticated TLS
# --------------------------------------------------------------------------------------------


def test_tls_by_name_and_by_ip_with_the_private_ca(tls_broker, pki) -> None:
    # Prepare
    b = tls_broker()
    topics = Topics(RUN)
    assert b.url.startswith("mqtts://127.0.0.1:")
    # Execute: the server connects by IP, the device by host name; both verify the broker
    server = connect(b, "edgehmoe-server", "127.0.0.1", cafile=pki["ca"])
    device = connect(b, "dev-a", "localhost", cafile=pki["ca"])
    try:
        server.subscribe(topics.result_filter())
        device.publish(topics.result("dev-a"), b"over TLS")
        # Assert
        assert server.receive(timeout=10) == (topics.result("dev-a"), b"over TLS")
    finally:
        device.close()
        server.close()


def test_tls_refuses_an_untrusted_or_misnamed_broker(tls_broker, pki) -> None:
    b = tls_broker()
    # the system CAs do not know our private CA
    with pytest.raises(ConnectionError, match="TLS handshake .* failed: .*certificate verify failed"):
        connect(b, "dev-a", "localhost")
    # a CA that did not sign the broker certificate
    with pytest.raises(ConnectionError, match="certificate verify failed"):
        connect(b, "dev-a", "localhost", cafile=pki["other_ca"])



def test_tls_refuses_a_broker_certificate_for_another_name(tmp_path: Path, pki) -> None:
    require_tool("mosquitto")
    from edgehmoe.server.broker import MosquittoBroker, create_server_certificate

    # A certificate from our CA, but for a host name this broker is not reached under
    crt, key = create_server_certificate(pki["ca"], pki["ca_key"], tmp_path, ["elsewhere.example"], days=2)
    with MosquittoBroker(run_dir=tmp_path / "broker", certfile=crt, keyfile=key) as b:
        b.add_user("dev-a", "pw")
        b.passwords = {"dev-a": "pw"}
        with pytest.raises(ConnectionError, match="Hostname mismatch|doesn't match"):
            connect(b, "dev-a", "localhost", cafile=pki["ca"])


# --------------------------------------------------------------------------------------------
# Mutual TLS
# --------------------------------------------------------------------------------------------


def test_mutual_tls_refuses_a_client_without_a_certificate(tls_broker, pki) -> None:
    b = tls_broker(require_certificate=True)
    started = time.monotonic()
    from edgehmoe.fl.mqtt import BrokerRefused

    with pytest.raises(BrokerRefused, match="requires a client certificate: give --certfile and --keyfile"):
        connect(b, "dev-a", cafile=pki["ca"])
    assert time.monotonic() - started < 5  # the handshake failure ends connect() at once


def test_mutual_tls_refuses_a_certificate_from_another_ca(tls_broker, pki) -> None:
    from edgehmoe.fl.mqtt import BrokerRefused

    b = tls_broker(require_certificate=True)
    with pytest.raises(BrokerRefused, match="rejected our client certificate: it must be signed by the broker's CA"):
        connect(b, "dev-a", cafile=pki["ca"], cert=pki["rogue"])


def test_device_client_gives_up_at_once_when_the_broker_requires_a_certificate(tls_broker, pki, tmp_path) -> None:
    """Retrying cannot fix a missing client certificate: `edgehmoe-client` exits 2 with the
    hint instead of retrying forever (it does retry an unreachable broker)."""
    from edgehmoe.data.partition import make_partitioner, write_shards
    from edgehmoe.data import load_dataset

    b = tls_broker(require_certificate=True)
    shard = write_shards(load_dataset("synthetic:coarse=2,fine=2,per_class=4,size=8", "train"),
                         make_partitioner("iid", 1, 0), tmp_path / "shards")[0]
    (tmp_path / "pw").write_text(b.passwords["dev-a"])
    started = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "edgehmoe.cli.client", "--broker", f"mqtts://localhost:{b.port}",
                        "--device-id", "dev-a", "--data", str(shard), "--run", RUN, "--password-file",
                        str(tmp_path / "pw"), "--cafile", str(pki["ca"]), "--state-dir", str(tmp_path / "state")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "requires a client certificate: give --certfile and --keyfile" in p.stderr
    assert "retrying" not in p.stderr and "Traceback" not in p.stderr
    assert time.monotonic() - started < 60


def test_mutual_tls_round_trip_with_certificates(tls_broker, pki) -> None:
    # Prepare
    b = tls_broker(require_certificate=True)
    topics = Topics(RUN)
    server = connect(b, "edgehmoe-server", cafile=pki["ca"], cert=pki["edgehmoe-server"])
    device = connect(b, "dev-a", cafile=pki["ca"], cert=pki["dev-a"])
    try:
        device.subscribe(topics.task("dev-a"))
        server.subscribe(topics.result_filter())
        # Execute
        server.publish(topics.task("dev-a"), b"task")
        device.publish(topics.result("dev-a"), b"result")
        # Assert
        assert device.receive(timeout=10) == (topics.task("dev-a"), b"task")
        assert server.receive(timeout=10) == (topics.result("dev-a"), b"result")
    finally:
        device.close()
        server.close()
    # the password is still checked on top of the certificate
    wrong = MqttConnection("localhost", b.port, tls=True, cafile=str(pki["ca"]), certfile=str(pki["dev-a"][0]),
                           keyfile=str(pki["dev-a"][1]), client_id="dev-a", username="dev-a", password="wrong")
    with pytest.raises(ConnectionError, match="bad credentials"):
        wrong.connect(timeout=10)


def test_client_tls_files_are_checked_up_front(pki) -> None:
    crt, key = pki["dev-a"]
    with pytest.raises(ValueError, match="both certfile and keyfile"):
        MqttConnection("localhost", 8883, tls=True, client_id="x", certfile=str(crt))
    with pytest.raises(ValueError, match="tls is off"):
        MqttConnection("localhost", 1883, client_id="x", certfile=str(crt), keyfile=str(key))
    with pytest.raises(ValueError, match="key belongs to the certificate"):
        MqttConnection("localhost", 8883, tls=True, client_id="x", certfile=str(crt), keyfile=str(pki["rogue"][1]))


# --------------------------------------------------------------------------------------------
# The CLI: broker-config --tls --client-certs, credentials add --client-cert, edgehmoe-client
# --------------------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "edgehmoe.cli.server", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_generated_production_config_with_mutual_tls_runs(tmp_path: Path) -> None:
    exe = require_tool("mosquitto")
    require_tool("mosquitto_passwd")
    require_tool("openssl")
    from edgehmoe.server.broker import add_password, free_port

    # Prepare: the operator's commands, with the config's paths pointing into tmp_path
    conf_dir = tmp_path / "broker"
    _cli("broker-config", "--out-dir", str(conf_dir), "--conf-dir", str(conf_dir), "--run", RUN, "--tls",
         "--client-certs", "--tls-host", "localhost", "--tls-listen", "127.0.0.1", cwd=tmp_path)
    (conf_dir / "edgehmoe.acl").write_text((conf_dir / "acl").read_text())
    out = _cli("credentials", "add", "--password-file", str(conf_dir / "edgehmoe.passwd"), "--device-id", "dev-a",
               "--out-dir", str(tmp_path / "creds"), "--client-cert", "--ca-dir", str(conf_dir / "certs"), cwd=tmp_path)
    assert "dev-a.crt" in out
    password = (tmp_path / "creds" / "dev-a.password").read_text().strip()
    add_password(conf_dir / "edgehmoe.passwd", "edgehmoe-server", "server-pw")
    plain, tls = free_port(), free_port()
    text = (conf_dir / "mosquitto.conf").read_text()
    for old, new in [("listener 1883 127.0.0.1\n", f"listener {plain} 127.0.0.1\n"),
                     ("listener 8883 127.0.0.1\n", f"listener {tls} 127.0.0.1\n"),
                     ("/var/lib/mosquitto/", f"{tmp_path}/db/"),
                     ("/var/log/mosquitto/mosquitto.log", str(tmp_path / "mosquitto.log"))]:
        assert old in text
        text = text.replace(old, new)
    assert "require_certificate true" in text and f"cafile {conf_dir}/certs/ca.crt" in text
    import pwd

    (conf_dir / "mosquitto.conf").write_text(f"user {pwd.getpwuid(os.geteuid()).pw_name}\n" + text)
    (tmp_path / "db").mkdir()
    proc = subprocess.Popen([exe, "-c", str(conf_dir / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, (tmp_path / "mosquitto.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", tls), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the generated config did not come up"
                time.sleep(0.05)
        ca = conf_dir / "certs" / "ca.crt"
        creds = tmp_path / "creds"

        def device(**kwargs) -> MqttConnection:
            return MqttConnection("localhost", tls, tls=True, cafile=str(ca), client_id="dev-a", username="dev-a",
                                  password=password, **kwargs)

        # Execute / Assert: the server on the loopback listener, the device over mutual TLS
        with MqttConnection("127.0.0.1", plain, client_id="edgehmoe-server", username="edgehmoe-server",
                            password="server-pw") as server:
            server.connect(timeout=10)
            server.subscribe(Topics(RUN).result_filter())
            with pytest.raises(ConnectionError, match="requires a client certificate"):
                device().connect(timeout=10)
            with device(certfile=str(creds / "dev-a.crt"), keyfile=str(creds / "dev-a.key")) as dev:
                dev.connect(timeout=10)
                dev.publish(Topics(RUN).result("dev-a"), b"via the generated config")
                assert server.receive(timeout=10) == (Topics(RUN).result("dev-a"), b"via the generated config")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_client_cli_tls_flags_and_environment(monkeypatch) -> None:
    from edgehmoe.cli.client import get_args_parser

    args = get_args_parser().parse_args(["--certfile", "a.crt", "--keyfile", "a.key", "--insecure"])
    assert (args.certfile, args.keyfile, args.insecure) == ("a.crt", "a.key", True)
    monkeypatch.setenv("EDGEHMOE_CERTFILE", "/etc/edgehmoe/pi-07.crt")
    monkeypatch.setenv("EDGEHMOE_KEYFILE", "/etc/edgehmoe/pi-07.key")
    args = get_args_parser().parse_args([])
    assert (args.certfile, args.keyfile, args.insecure) == ("/etc/edgehmoe/pi-07.crt", "/etc/edgehmoe/pi-07.key",
                                                             False)
    monkeypatch.setenv("EDGEHMOE_INSECURE", "1")
    assert get_args_parser().parse_args([]).insecure is True
