"""The run dashboard (``--dashboard``, ``edgehmoe-server dashboard``): JSON, access, and the page.

* ``/api/state`` of a synthetic run directory with 1,000 devices: values worked out from the
  rows written here, ETag/304, incremental ``metrics.jsonl`` reading.
* Access: an off-loopback bind (0.0.0.0, requested over 127.0.0.1 only) answers 401 without
  the token; the token never reaches the page; a loopback bind refuses a foreign Host header.
* :class:`~edgehmoe.server.dashboard.LiveStatus` against a fake server: what ``live.json`` says.
* In a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, selenium): the
  1,000-device page paginates, sorts and filters; a real ``simulate`` run (Mosquitto, client
  processes) shows the round advancing, the devices, a killed client going offline, and charts
  with points; the finished run is served again by ``edgehmoe-server dashboard``. Screenshots
  are saved under the test's tmp dir (and copied to docs/ with EDGEHMOE_DOCS_SCREENSHOTS=1).
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool, skip_or_fail
from tree9 import tree9

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
APT_HINT = "apt-get install -y chromium chromium-driver (Debian/Ubuntu), then pip install 'selenium>=4'"
N_DEVICES = 1000
N_ROUNDS = 40


# ---------------------------------------------------------------------- a synthetic run directory
def write_big_run(out: Path, n_devices: int = N_DEVICES, n_rounds: int = N_ROUNDS) -> dict:
    """A parallel-mode run directory on the 9-node tree (tests/tree9.py), files as the server writes them.

    Every round asks 100 devices; outcomes are mostly ok with refusals, timeouts and
    rejections mixed in. Device ``dev-0007`` has a hand-written history (see ``expect``).
    Returns what the dashboard must report.
    """
    from edgehmoe.core.checkpoint import ModelDir, NetworkEntry

    tree = tree9()
    internal = [int(n) for n in tree.internal_nodes]  # 0 root, 1 A, 2 B, 6 C
    names = {n: f"{n}:{tree.names[n]}" for n in internal}
    out.mkdir(parents=True)
    md = ModelDir(path=out, hierarchy=tree, input_size=16, mean=[0.5] * 3, std=[0.25] * 3, dataset="synthetic",
                  extra={"run": "big", "rounds_completed": n_rounds})
    for n in internal:
        md.experts[n] = NetworkEntry(arch={"kind": "cnn"}, file=f"experts/{n}.r1.safetensors", name=tree.names[n],
                                     params=1000 + n)
    md.save_json()
    (out / "config.toml").write_text('[run]\nname = "big"\n\n[broker]\nusername = "edgehmoe-server"\n'
                                     'password_file = "/secret/server.password"\n')
    rng = np.random.default_rng(0)
    ids = [f"dev-{i:04d}" for i in range(n_devices)]
    times: dict[int, list[float]] = {n: [] for n in internal}
    visits = dict.fromkeys(internal, 0)
    rows = []
    for r in range(n_rounds):
        asked = [ids[(r * 100 + k) % n_devices] for k in range(100)]
        asked = [d for d in asked if d != "dev-0007"]
        outcomes, reasons, tasks, per_device = {}, {}, {}, []
        for dev in asked:
            node = internal[int(rng.integers(len(internal)))]
            tasks[dev] = node
            u = rng.random()
            outcome = "ok" if u < 0.85 else "refused" if u < 0.9 else "timeout" if u < 0.95 else "invalid"
            outcomes[dev] = outcome
            if outcome == "ok":
                t = float(rng.uniform(50, 500))
                times[node].append(t)
                per_device.append({"device": dev, "node": node, "num_examples": 50, "round_time_ms": t,
                                   "round_mem_mb": t / 100, "peak_rss_mb": 300.0, "loss": 1.0})
            else:
                reasons[dev] = {"refused": "memory budget too small", "timeout": "no answer before the deadline",
                                "invalid": "non-finite weights"}[outcome]
        # dev-0007: refused in round 4, timed out in 11, rejected in 21, ok on C (node 6) in 31
        special = {3: ("refused", "memory budget 64 MB < 120 MB needed"),
                   10: ("timeout", "no answer before the deadline"),
                   20: ("invalid", "weights: conv1.weight has NaN"), 30: ("ok", "")}
        if r in special:
            outcome, reason = special[r]
            outcomes["dev-0007"], tasks["dev-0007"] = outcome, 6
            if reason:
                reasons["dev-0007"] = reason
            else:
                times[6].append(123.0)
                per_device.append({"device": "dev-0007", "node": 6, "num_examples": 50, "round_time_ms": 123.0,
                                   "round_mem_mb": 4.5, "peak_rss_mb": 310.0, "loss": 0.9})
        updated = sorted({d["node"] for d in per_device})
        for n in updated:
            visits[n] += 1
        row = {"round": r, "kind": "hmoe", "nodes": sorted(set(tasks.values())),
               "experts": sorted(names[n] for n in set(tasks.values())), "updated": updated,
               "devices_asked": len(outcomes), "devices_answered": len(per_device), "outcomes": outcomes,
               "rejected": {d: reasons[d] for d, o in outcomes.items() if o == "invalid"},
               "tasks": tasks, "reasons": reasons, "per_device": per_device, "aggregation_ms": 1.0,
               "round_wall_s": 2.0, "lr": 0.05, "time_unix": 1_700_000_000.0 + 10 * (r + 1)}
        if (r + 1) % 5 == 0:
            row["val_info_f1"] = 0.3 + 0.01 * r
        rows.append(row)
    with open(out / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    devices = [{"device_id": d, "class_counts": [10, 0, 5, 5, 0], "memory_budget_mb": 256.0 if i % 2 else 0.0,
                "ram_mb": 4096.0 + i, "cores": 4, "platform": "Linux-aarch64", "software_version": "0.1.0",
                "online": i % 10 != 3, "busy": False, "last_seen": 1_700_000_000.0 + i}
               for i, d in enumerate(ids)]
    state = {"state_version": 1, "run": "big", "kind": "hmoe", "round": n_rounds, "rounds": 100,
             "mean": [0.5] * 3, "std": [0.25] * 3, "files": {str(n): f"experts/{n}.r1.safetensors" for n in internal},
             "credits": {}, "visits": {str(k): v for k, v in visits.items()}, "devices": devices,
             "software_version": "0.1.0", "updated_unix": 1_700_000_000.0}
    (out / "state.json").write_text(json.dumps(state))
    problems = sum(1 for d in ids if any(r["outcomes"].get(d, "ok") != "ok" for r in rows))
    return {"rows": rows, "times": times, "visits": visits, "problem_devices": problems, "ids": ids}


def http_get(port: int, path: str, headers: dict | None = None, host: str = "127.0.0.1"):
    """``(status, headers, body)`` of one GET to the loopback address (redirects not followed)."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------- JSON and reading
def test_parse_listen_and_loopback():
    from edgehmoe.server.dashboard import is_loopback, parse_listen

    from edgehmoe.errors import UsageError

    assert parse_listen("8765") == ("127.0.0.1", 8765)
    assert parse_listen("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    assert parse_listen("localhost:0") == ("localhost", 0)
    for bad in ("http", "1.2.3.4:70000", "host:"):
        with pytest.raises(UsageError, match=r"\[HOST:\]PORT"):
            parse_listen(bad)
    assert [is_loopback(h) for h in ("127.0.0.1", "127.8.9.10", "::1", "localhost", "0.0.0.0", "10.0.0.5", "pi.lan")] \
        == [True, True, True, True, False, False, False]


def test_api_state_of_a_run_with_1000_devices(tmp_path):
    from edgehmoe.server.dashboard import DashboardServer

    # Prepare
    exp = write_big_run(tmp_path / "big")
    # Execute
    with DashboardServer(tmp_path / "big", "127.0.0.1:0") as dash:
        t0 = time.perf_counter()
        status, headers, body = http_get(dash.port, "/api/state")
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        status304, _, body304 = http_get(dash.port, "/api/state", {"If-None-Match": headers["etag"]})
        cached_s = time.perf_counter() - t0
        _, zheaders, zbody = http_get(dash.port, "/api/state", {"Accept-Encoding": "gzip"})
    st = json.loads(body)
    # Assert
    assert status == 200 and headers["content-type"] == "application/json"
    assert (status304, body304) == (304, b"")
    assert zheaders["content-encoding"] == "gzip" and json.loads(gzip.decompress(zbody)) == st
    assert len(zbody) < len(body) / 4
    assert first_s < 5.0 and cached_s < 1.0, (first_s, cached_s)
    assert (st["round"], st["rounds"], st["run"], st["layout"], st["status"]) == (40, 100, "big", "run", "stopped")
    assert len(st["devices"]) == 1000 and [d["id"] for d in st["devices"]] == exp["ids"]
    assert st["devices_online"] == 0  # no live.json: no server is running, nobody is shown online
    d7 = next(d for d in st["devices"] if d["id"] == "dev-0007")
    assert d7["counts"] == {"ok": 1, "refused": 1, "error": 0, "timeout": 1, "offline": 0, "rejected": 1}
    assert d7["last"] == {"phase": "hmoe", "round": 31, "expert": "6:C", "outcome": "ok", "reason": ""}
    assert (d7["last_time_ms"], d7["last_mem_mb"], d7["last_peak_mb"]) == (123.0, 4.5, 310.0)
    assert [(p["round"], p["outcome"], p["reason"]) for p in d7["problems"]] == [
        (4, "refused", "memory budget 64 MB < 120 MB needed"), (11, "timeout", "no answer before the deadline"),
        (21, "invalid", "weights: conv1.weight has NaN")]
    assert (d7["ram_mb"], d7["budget_mb"], d7["cores"], d7["samples"], d7["classes"]) == (4103.0, 256.0, 4, 20, 3)
    by_node = {e["node"]: e for e in st["experts"]}
    assert sorted(by_node) == [0, 1, 2, 6]
    for n, e in by_node.items():
        assert e["round_time_ms"] == pytest.approx(float(np.median(exp["times"][n])))
        assert e["device_rounds"] == len(exp["times"][n]) and e["visits"] == exp["visits"][n]
        assert e["params"] == 1000 + n
    assert (by_node[6]["name"], by_node[6]["depth"], by_node[6]["children"]) == ("C", 2, 2)
    assert st["val_info_f1"]["hmoe"] == [[r, pytest.approx(0.3 + 0.01 * (r - 1))] for r in range(5, 41, 5)]
    # the page never gets a credential: not the broker account, not the password file
    assert b"edgehmoe-server" not in body and b"password" not in body


def test_metrics_are_read_incrementally_and_again_after_a_rewrite(tmp_path):
    from edgehmoe.server.dashboard import RunReader

    # Prepare
    exp = write_big_run(tmp_path / "run", n_devices=200, n_rounds=6)
    reader = RunReader(tmp_path / "run")
    before = reader.state()
    d = next(d for d in before["devices"] if d["id"] == "dev-0001")
    row = {"round": 6, "kind": "hmoe", "nodes": [2], "experts": ["2:B"], "updated": [],
           "outcomes": {"dev-0001": "refused"}, "rejected": {}, "reasons": {"dev-0001": "busy with another run"},
           "per_device": [], "time_unix": 1_700_000_070.0}
    line = json.dumps(row) + "\n"
    # Execute: half a line, then the rest (a reader must not take half a row)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(line[:20])
    half = reader.state()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(line[20:])
    after = reader.state()
    # the resumed server rewrites metrics.jsonl without the uncommitted row (new file)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[:6]
    tmp = tmp_path / "run" / "metrics.tmp"
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, tmp_path / "run" / "metrics.jsonl")
    rewritten = reader.state()
    # Assert
    pick = lambda st: next(x for x in st["devices"] if x["id"] == "dev-0001")  # noqa: E731
    assert pick(half)["counts"] == d["counts"]
    assert pick(after)["counts"]["refused"] == d["counts"]["refused"] + 1
    assert pick(after)["last"] == {"phase": "hmoe", "round": 7, "expert": "2:B", "outcome": "refused",
                                   "reason": "busy with another run"}
    assert pick(rewritten)["counts"] == d["counts"] and pick(rewritten)["last"] == d["last"]
    assert len(exp["rows"]) == 6


def test_rows_without_tasks_and_reasons_still_name_expert_and_reason(tmp_path):
    """Rows written before ``tasks``/``reasons`` existed: the expert of a one-expert round, default reasons."""
    from edgehmoe.server.dashboard import RunReader

    write_big_run(tmp_path / "run", n_devices=10, n_rounds=1)
    row = {"round": 1, "kind": "hmoe", "nodes": [1], "experts": ["1:A"], "updated": [],
           "outcomes": {"dev-0002": "timeout", "dev-0003": "offline", "dev-0004": "late"},
           "rejected": {"dev-0004": "arrived 3.0 s after the deadline"}, "per_device": [], "time_unix": 1.0}
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    st = RunReader(tmp_path / "run").state()
    last = {d["id"]: d["last"] for d in st["devices"] if d["id"] in ("dev-0002", "dev-0003", "dev-0004")}
    assert last == {
        "dev-0002": {"phase": "hmoe", "round": 2, "expert": "1:A", "outcome": "timeout",
                     "reason": "no answer before the deadline"},
        "dev-0003": {"phase": "hmoe", "round": 2, "expert": "1:A", "outcome": "offline", "reason": "went offline"},
        "dev-0004": {"phase": "hmoe", "round": 2, "expert": "1:A", "outcome": "late",
                     "reason": "arrived 3.0 s after the deadline"},
    }


def test_server_rows_carry_the_task_and_reason_of_every_device(tmp_path):
    """``metrics_row`` records who was asked what and why each device's result was not used."""
    from types import SimpleNamespace

    from edgehmoe.server.dashboard import RunReader
    from edgehmoe.server.rounds import Pending, metrics_row

    # Prepare: round 2 asks four devices for expert 6 (C); one answers
    write_big_run(tmp_path / "run", n_devices=10, n_rounds=2)
    pending = [Pending(SimpleNamespace(node=6, task_id=f"t{i}", weights={}), f"dev-000{i}") for i in range(4)]
    pending[0].settle("ok", result=SimpleNamespace(num_examples=5, round_time_ms=80.0, round_mem_mb=2.0,
                                                   peak_rss_mb=300.0, loss=1.2))
    pending[1].settle("refused", "memory budget 64 MB < 120 MB needed")
    pending[2].settle("timeout", "no answer before the deadline")
    pending[3].settle("offline", "went offline")
    # Execute
    row = metrics_row(2, "hmoe", tree9(), pending, [6], lr=0.05, aggregation_ms=1.0, round_wall_s=2.0, time_unix=5.0)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    devices = {d["id"]: d for d in RunReader(tmp_path / "run").state()["devices"]}
    # Assert
    assert row["tasks"] == {"dev-0000": 6, "dev-0001": 6, "dev-0002": 6, "dev-0003": 6}
    assert row["reasons"] == {"dev-0001": "memory budget 64 MB < 120 MB needed",
                              "dev-0002": "no answer before the deadline", "dev-0003": "went offline"}
    assert devices["dev-0001"]["last"] == {"phase": "hmoe", "round": 3, "expert": "6:C", "outcome": "refused",
                                           "reason": "memory budget 64 MB < 120 MB needed"}
    assert devices["dev-0000"]["last_time_ms"] == 80.0


# ---------------------------------------------------------------------- access
def test_off_loopback_bind_needs_the_token(tmp_path):
    """``dashboard --dashboard 0.0.0.0:0``: 401 without the printed token, 200 with it; requests go to 127.0.0.1."""
    write_big_run(tmp_path / "run", n_devices=5, n_rounds=2)
    proc = subprocess.Popen([str(BIN / "edgehmoe-server"), "dashboard", "--run", str(tmp_path / "run"),
                             "--dashboard", "0.0.0.0:0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        for _ in range(50):
            line = proc.stdout.readline()
            if line.startswith("dashboard:"):
                break
        m = re.match(r"dashboard: http://[^:/]+:(\d+)/\?token=([\w-]+) \(token generated", line)
        assert m, line
        port, token = int(m.group(1)), m.group(2)
        assert len(token) >= 24
        no_token = http_get(port, "/api/state")
        wrong = http_get(port, "/api/state", {"Authorization": "Bearer " + "x" * len(token)})
        page_no_token = http_get(port, "/")
        bearer = http_get(port, "/api/state", {"Authorization": f"Bearer {token}"})
        redirect = http_get(port, f"/?token={token}")
        cookie = redirect[1]["set-cookie"].split(";")[0]
        page = http_get(port, "/", {"Cookie": cookie})
        script = http_get(port, "/static/dashboard.js", {"Cookie": cookie})
        state = http_get(port, "/api/state", {"Cookie": cookie})
        bad_cookie = http_get(port, "/api/state", {"Cookie": f"{cookie.split('=')[0]}=wrong-token"})
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert (no_token[0], wrong[0], page_no_token[0]) == (401, 401, 401)
    assert no_token[1]["www-authenticate"].startswith("Bearer") and b"token" in no_token[2]
    assert bearer[0] == 200 and json.loads(bearer[2])["round"] == 2
    assert redirect[0] == 303 and redirect[1]["location"] == "/"
    assert "HttpOnly" in redirect[1]["set-cookie"] and "SameSite=Strict" in redirect[1]["set-cookie"]
    assert (page[0], script[0], state[0], bad_cookie[0]) == (200, 200, 200, 401)
    for body in (page[2], script[2], state[2]):
        assert token.encode() not in body  # the page never shows the credential
    assert proc.returncode == 0 and "dashboard stopped" in out


def test_loopback_bind_refuses_foreign_host_header_and_writes(tmp_path):
    from edgehmoe.server.dashboard import DashboardServer

    write_big_run(tmp_path / "run", n_devices=3, n_rounds=1)
    with DashboardServer(tmp_path / "run", "127.0.0.1:0") as dash:
        ok = http_get(dash.port, "/api/state", {"Host": f"localhost:{dash.port}"})
        rebound = http_get(dash.port, "/api/state", {"Host": f"attacker.example:{dash.port}"})
        missing = http_get(dash.port, "/static/../dashboard.py")
        conn = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=10)
        conn.request("POST", "/api/state", body=b"{}")
        post = conn.getresponse().status
        conn.close()
    assert (ok[0], rebound[0], missing[0], post) == (200, 403, 404, 405)
    assert "default-src 'self'" in ok[1]["content-security-policy"]
    assert dash.token is None and not dash.token_required


def test_token_comes_from_the_flag_or_the_config_token_file(tmp_path):
    from edgehmoe.server.config import RunConfig, dump_config
    from edgehmoe.server.dashboard import DashboardError, read_token_file

    (tmp_path / "dash.token").write_text("  from-the-file-0123\n")
    (tmp_path / "empty.token").write_text("\n")
    assert read_token_file(tmp_path / "dash.token") == "from-the-file-0123"
    with pytest.raises(DashboardError, match="is empty"):
        read_token_file(tmp_path / "empty.token")
    with pytest.raises(DashboardError, match="secrets.token_urlsafe"):
        read_token_file(tmp_path / "missing.token")
    # --token without --dashboard (and no [dashboard] listen) is a usage error, before anything runs
    cfg = RunConfig()
    cfg.run.out = str(tmp_path / "never")
    (tmp_path / "run.toml").write_text(dump_config(cfg))
    p = subprocess.run([str(BIN / "edgehmoe-server"), "run", "--config", str(tmp_path / "run.toml"), "--token",
                        "abcdefgh12"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "give --dashboard [HOST:]PORT too" in p.stderr
    assert not (tmp_path / "never").exists()


def test_dashboard_command_rejects_a_missing_directory(tmp_path):
    p = subprocess.run([str(BIN / "edgehmoe-server"), "dashboard", "--run", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "is not a directory" in p.stderr


@pytest.mark.slow
def test_server_run_with_dashboard_answers_live_over_http(tmp_path):
    """``edgehmoe-server run --config --dashboard 127.0.0.1:0 --token T`` with a real broker and clients."""
    from test_federation import Federation

    from edgehmoe.server.config import dump_config

    # Prepare: Mosquitto, two client processes (tests/test_federation.py's harness)
    fed = Federation(tmp_path, 2)
    try:
        cfg = fed.config("dash-run", rounds=4)
        cfg.train.epochs = 40  # a round of one epoch (~60 ms) ends between two polls
        cfg_path = tmp_path / "run.toml"
        cfg_path.write_text(dump_config(cfg))
        fed.start_clients(cfg.run.name)
        token = "sekrit-token-123"
        # Execute
        proc = subprocess.Popen([str(BIN / "edgehmoe-server"), "run", "--config", str(cfg_path), "--dashboard",
                                 "127.0.0.1:0", "--token", token], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
        url = wait_for(lambda: next((ln.split()[1] for ln in lines if ln.startswith("dashboard: http")), None),
                       60, "the dashboard URL")
        port = int(re.match(r"http://127\.0\.0\.1:(\d+)/\?token=", url).group(1))
        unauthorised = http_get(port, "/api/state")[0]
        seen_rounds, seen_training, seen_online = [], [], 0
        while proc.poll() is None:
            try:
                status, _, body = http_get(port, "/api/state", {"Authorization": f"Bearer {token}"})
            except OSError:  # the run ended between poll() and the request
                break
            st = json.loads(body)
            if not seen_rounds or seen_rounds[-1] != st["round"]:
                seen_rounds.append(st["round"])
            if st["training"]:
                seen_training.append((st["training"]["round"], tuple(st["training"]["experts"])))
            seen_online = max(seen_online, st["devices_online"])
            time.sleep(0.1)
        assert proc.wait(timeout=300) == 0, "".join(lines[-30:])
    finally:
        fed.stop()
    # Assert
    live = json.loads((Path(cfg.run.out) / "live.json").read_text())
    assert url == f"http://127.0.0.1:{port}/?token={token}" and unauthorised == 401
    assert seen_rounds == sorted(seen_rounds) and len(seen_rounds) >= 3, seen_rounds
    assert seen_online == 2
    assert seen_training and all(1 <= r <= 4 and experts for r, experts in seen_training), seen_training
    assert (live["state"], live["closed"], live["round"], live["rounds"]) == ("finished", True, 4, 4)
    assert any(ln.startswith("dashboard stopped with the run") for ln in lines)


# ---------------------------------------------------------------------- live.json
class _Dev:
    def __init__(self, device_id, online, last_seen):
        self.device_id, self.online, self.busy, self.last_seen = device_id, online, False, last_seen
        self.class_counts = np.array([3, 0, 4])
        self.ram_mb, self.memory_budget_mb, self.cores = 1024.0, 200.0, 4
        self.platform, self.software_version = "Linux-aarch64", "0.1.0"


class _FakeServer:
    """What LiveStatus reads of an AggregationServer (see its docstring)."""

    def __init__(self, out: Path, rounds: int = 5):
        from types import SimpleNamespace

        self.out = out
        self.round = 0
        self.tree = tree9()
        self.cfg = SimpleNamespace(run=SimpleNamespace(name="live"), model=SimpleNamespace(kind="hmoe"),
                                   schedule=SimpleNamespace(rounds=rounds, round_timeout_s=60.0))
        self.registry = SimpleNamespace(devices={})
        self.runner = SimpleNamespace(open=False, round=-1, deadline=0.0, pending={})


def test_live_status_tracks_devices_and_the_open_round(tmp_path):
    from types import SimpleNamespace

    from edgehmoe.server.dashboard import LIVE_FILE, LiveStatus, RunReader

    # Prepare
    clock = [1000.0]
    live = LiveStatus(heartbeat_s=5.0, clock=lambda: clock[0])
    srv = _FakeServer(tmp_path / "run")
    srv.out.mkdir()
    live.attach(srv)
    read = lambda: json.loads((srv.out / LIVE_FILE).read_text())  # noqa: E731
    # Execute / Assert: nothing before the run directory exists
    live.tick()
    assert not (srv.out / LIVE_FILE).exists()
    (srv.out / "state.json").write_text(json.dumps({"run": "live", "kind": "hmoe", "round": 0, "rounds": 5}))
    srv.registry.devices = {"pi-1": _Dev("pi-1", True, 990.0), "pi-2": _Dev("pi-2", True, 995.0)}
    live.tick()
    first = read()
    assert (first["state"], first["round"], first["closed"], first["updated_unix"]) == ("waiting", 0, False, 1000.0)
    assert [(d["device_id"], d["online"], d["since_unix"], d["samples"], d["classes"]) for d in first["devices"]] == [
        ("pi-1", True, 990.0, 7, 2), ("pi-2", True, 995.0, 7, 2)]
    # a round opens; pi-2 answers, pi-1 goes offline (its status message arrives at 1003)
    srv.runner.open, srv.runner.round, srv.runner.deadline = True, 0, 1060.0
    srv.runner.pending = {
        "t1": SimpleNamespace(device_id="pi-1", node=6, answered=False, outcome="asked"),
        "t2": SimpleNamespace(device_id="pi-2", node=6, answered=True, outcome="ok"),
    }
    srv.registry.devices["pi-2"].last_seen = 1002.0  # idle -> busy -> idle: still online since 995
    srv.registry.devices["pi-1"].online, srv.registry.devices["pi-1"].last_seen = False, 1003.0
    clock[0] = 1004.0
    live.tick()
    second = read()
    assert second["state"] == "training"
    assert second["training"] == {"round": 0, "experts": ["6:C"], "tasks": {"pi-1": "6:C", "pi-2": "6:C"},
                                  "asked": 2, "answered": 1, "outcomes": {"pi-2": "ok"},
                                  "deadline_unix": 1060.0, "started_unix": 1000.0}
    assert [(d["online"], d["since_unix"]) for d in second["devices"]] == [(False, 1003.0), (True, 995.0)]
    # nothing changes: no write until the heartbeat
    clock[0] = 1006.0
    live.tick()
    assert read()["updated_unix"] == 1004.0
    clock[0] = 1009.5
    live.tick()
    assert read()["updated_unix"] == 1009.5
    # the reader shows it (its clock says the file is fresh)
    st = RunReader(srv.out, clock=lambda: clock[0]).state()
    assert st["status"] == "running" and st["training"]["experts"] == ["6:C"] and st["training"]["round"] == 1
    assert (st["training"]["asked"], st["training"]["outcomes"]) == (2, {"ok": 1})
    assert [(d["id"], d["online"], d["task"]) for d in st["devices"]] == [("pi-1", False, "6:C"), ("pi-2", True, "6:C")]
    # a stale file (server killed) is not shown as running
    assert RunReader(srv.out, clock=lambda: clock[0] + 60).state()["status"] == "stopped"
    # close: the final state
    live.close()
    assert (read()["state"], read()["closed"]) == ("stopped", True)


def test_live_status_hands_over_between_simulate_models(tmp_path):
    from edgehmoe.server.dashboard import LIVE_FILE, LiveStatus

    clock = [0.0]
    live = LiveStatus(heartbeat_s=1.0, clock=lambda: clock[0])
    a, b = _FakeServer(tmp_path / "hmoe"), _FakeServer(tmp_path / "flat")
    a.out.mkdir()
    (a.out / "state.json").write_text("{}")
    a.round = 5
    live.attach(a)
    live.tick()
    live.attach(b)  # b is still loading its data: a keeps its heartbeat
    clock[0] = 2.0
    live.tick()
    ahead = json.loads((a.out / LIVE_FILE).read_text())
    assert (ahead["state"], ahead["closed"], ahead["updated_unix"]) == ("finished", False, 2.0)
    b.out.mkdir()
    (b.out / "state.json").write_text("{}")
    clock[0] = 3.0
    live.tick()
    assert json.loads((a.out / LIVE_FILE).read_text())["closed"] is True
    assert json.loads((b.out / LIVE_FILE).read_text())["state"] == "waiting"
    live.close()


# ---------------------------------------------------------------------- the package
def test_vendored_chart_js_is_the_recorded_mit_build_and_the_page_uses_no_cdn():
    import hashlib

    from edgehmoe.server.dashboard import STATIC_DIR

    vendor = STATIC_DIR / "vendor"
    digest = hashlib.sha256((vendor / "chart.umd.min.js").read_bytes()).hexdigest()
    assert digest in (vendor / "README.md").read_text()
    assert "The MIT License" in (vendor / "chart.js.LICENSE.md").read_text()
    assert (vendor / "chart.umd.min.js").read_text()[:60].startswith("/*!\n * Chart.js v4.")
    for name in ("index.html", "dashboard.js", "dashboard.css"):
        text = (STATIC_DIR / name).read_text()
        assert not re.search(r"https?://", text), f"{name} loads something from the network"
    # every static file is shipped: its folder is a declared data package whose globs match it
    import fnmatch
    import tomllib

    st = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for f in STATIC_DIR.rglob("*"):
        if f.is_file():
            pkg = ".".join(["edgehmoe.server", *f.parent.relative_to(STATIC_DIR.parent).parts])
            assert pkg in st["packages"], f"{pkg} is not in pyproject's packages"
            assert any(fnmatch.fnmatch(f.name, g) for g in st["package-data"].get(pkg, [])), f"{f} is not shipped"


# ---------------------------------------------------------------------- in a real browser
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = require_tool("chromium", APT_HINT)
    driver_path = require_tool("chromedriver", APT_HINT)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_or_fail("selenium is not installed: pip install -e '.[dev]' (or pip install 'selenium>=4')")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1400,1700"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = predicate()
        except Exception as e:  # noqa: BLE001 - the DOM may be mid-update; try again
            last = e
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def dom(driver, script: str):
    return driver.execute_script(script)


def device_rows(driver) -> list[tuple[str, str]]:
    """``(device id, data-online)`` of the table rows on the current page, in page order."""
    return [tuple(r) for r in dom(driver, "return [...document.querySelectorAll('#devices tbody tr')]"
                                          ".map(r => [r.dataset.device, r.dataset.online])")]


def device_ids(driver) -> list[str]:
    return [r[0] for r in device_rows(driver)]


def severe_logs(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def save_screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 10_000
    if os.environ.get("EDGEHMOE_DOCS_SCREENSHOTS") == "1":  # refresh docs/dashboard.md's pictures
        shutil.copyfile(path, REPO / "docs" / name)
    return path


def test_page_with_1000_devices_paginates_sorts_and_filters(browser, tmp_path):
    from selenium.webdriver.common.by import By

    from edgehmoe.server.dashboard import DashboardServer

    exp = write_big_run(tmp_path / "big")
    with DashboardServer(tmp_path / "big", "127.0.0.1:0") as dash:
        browser.get(dash.url)
        wait_for(lambda: dom(browser, "return document.body.dataset.round") == "40", 30, "round 40")
        first_render_ms = float(dom(browser, "return document.body.dataset.renderMs"))
        rows = device_ids(browser)
        info = browser.find_element(By.ID, "page-info").text
        points = {c: int(browser.find_element(By.ID, c).get_attribute("data-points"))
                  for c in ("chart-f1", "chart-time", "chart-mem", "chart-visits")}
        # sort by device id, descending: the last device comes first
        header = browser.find_element(By.CSS_SELECTOR, "#devices th[data-key=id]")
        header.click()
        t0 = time.perf_counter()
        wait_for(lambda: device_ids(browser)[:2] == ["dev-0999", "dev-0998"], 5, "dev-0999 first")
        sort_s = time.perf_counter() - t0
        header.click()
        browser.find_element(By.ID, "page-next").click()
        wait_for(lambda: device_ids(browser)[0] == "dev-0050", 5, "page 2")
        browser.find_element(By.ID, "device-problems").click()
        problems_info = wait_for(lambda: (t := browser.find_element(By.ID, "page-info").text).startswith("1–50")
                                 and t, 5, "the problem filter")
        save_screenshot(browser, tmp_path, "dashboard-1000-devices.png")
        browser.find_element(By.ID, "device-problems").click()
        browser.find_element(By.ID, "device-filter").send_keys("dev-0007")
        wait_for(lambda: device_ids(browser) == ["dev-0007"], 5, "the filter")
        reason = browser.find_element(By.CSS_SELECTOR, "#devices tbody tr td[data-col=reason]").text
        logs = severe_logs(browser)
    assert len(rows) == 50 and rows[:2] == ["dev-0000", "dev-0001"]
    assert info == "1–50 of 1000 · page 1/20"
    assert problems_info == f"1–50 of {exp['problem_devices']} · page 1/{-(-exp['problem_devices'] // 50)}"
    assert reason == "invalid (r21): weights: conv1.weight has NaN"
    assert points == {"chart-f1": 8, "chart-time": 4, "chart-mem": 4, "chart-visits": 4}
    assert first_render_ms < 2000 and sort_s < 5, (first_render_ms, sort_s)
    assert logs == []  # no script error, no CSP violation, nothing fetched that is not there


@pytest.mark.slow
def test_live_simulate_run_in_the_browser(browser, tmp_path):
    """A real run: Mosquitto, two client processes, HMoE then flat; one client is killed mid-run."""
    psutil = pytest.importorskip("psutil")
    from selenium.webdriver.common.by import By

    require_tool("mosquitto")
    require_tool("mosquitto_passwd")
    out = tmp_path / "sim"
    hmoe_rounds, flat_rounds = 12, 3
    cmd = [str(BIN / "edgehmoe-server"), "simulate",
           "--dataset", "synthetic:coarse=2,fine=3,per_class=30,test_per_class=10,size=16",
           "--clients", "2", "--rounds", str(hmoe_rounds), "--flat-rounds", str(flat_rounds), "--eval-every", "1",
           "--round-timeout", "60", "--local-epochs", "80", "--no-export", "--out", str(out), "--dashboard", "127.0.0.1:0"]
    sim = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(sim.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        sim_url = wait_for(lambda: next((ln.split()[1] for ln in lines if ln.startswith("dashboard: http")), None),
                           60, "the dashboard URL")
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", sim_url)
        browser.get(sim_url)
        # Devices appear (the clients start, announce themselves) and rounds advance
        wait_for(lambda: dict(device_rows(browser)) == {"dev-000": "1", "dev-001": "1"}, 180, "two online devices")
        seen = []

        def hmoe_round():
            r = int(dom(browser, "return document.body.dataset.round"))
            phase = browser.find_element(By.ID, "phase").text
            if "hmoe" in phase and (not seen or seen[-1] != r):
                seen.append(r)
            return r if "hmoe" in phase else None

        wait_for(lambda: (hmoe_round() or 0) >= 2, 120, "hmoe round 2")
        # Kill one client (as if its Pi lost power): the broker publishes its last will
        victim = next(p for p in psutil.Process(sim.pid).children(recursive=True)
                      if "dev-001" in p.cmdline() and any("hmoe" in a for a in p.cmdline()))
        victim.kill()
        killed_at = seen[-1]
        wait_for(lambda: hmoe_round() is not None and dict(device_rows(browser)) == {"dev-000": "1", "dev-001": "0"},
                 60, "dev-001 offline while dev-000 trains on")
        status_text = dom(browser, "return document.querySelector('#devices tr[data-device=dev-001] td[data-col=status]')"
                                   ".textContent")
        wait_for(lambda: (hmoe_round() or 0) > killed_at, 60, "a round after the kill")
        mid = {c: int(browser.find_element(By.ID, c).get_attribute("data-points"))
               for c in ("chart-f1", "chart-time", "chart-visits")}
        training = browser.find_element(By.ID, "training").text
        save_screenshot(browser, tmp_path, "dashboard-mid-run.png")
        logs = severe_logs(browser)
        assert sim.wait(timeout=600) == 0, "".join(lines[-30:])
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait()
    # Assert (during the run)
    assert seen == sorted(seen) and len(set(seen)) >= 3, seen  # the round advanced, live
    assert status_text.startswith("offline since "), status_text
    assert mid["chart-f1"] >= 2 and mid["chart-time"] >= 1 and mid["chart-visits"] >= 1, mid
    assert training and training != "–"
    assert logs == []
    assert any("dashboard stopped with the run" in ln for ln in lines)

    # The finished run, served from disk alone by `edgehmoe-server dashboard`
    dash = subprocess.Popen([str(BIN / "edgehmoe-server"), "dashboard", "--run", str(out), "--dashboard",
                             "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = next(ln.split()[1] for ln in iter(dash.stdout.readline, "") if ln.startswith("dashboard: http"))
        browser.get(url)
        wait_for(lambda: dom(browser, "return document.body.dataset.status") == "finished", 30, "status finished")
        points = {c: int(browser.find_element(By.ID, c).get_attribute("data-points"))
                  for c in ("chart-f1", "chart-time", "chart-mem", "chart-visits")}
        heldout = browser.find_element(By.ID, "heldout").text
        experts = dom(browser, "return [...document.querySelectorAll('#experts tbody tr')].map(r => r.dataset.node)")
        dev1_last = dom(browser, "return document.querySelector('#devices tr[data-device=dev-001] td[data-col=last]')"
                                 ".textContent")
        save_screenshot(browser, tmp_path, "dashboard-finished.png")
        # (the earlier page's failed polls after the run ended are logged too: not this page's)
        final_logs = [e for e in severe_logs(browser) if sim_url not in e["message"]]
    finally:
        dash.send_signal(signal.SIGINT)
        dash.wait(timeout=30)
    state = json.loads((out / "hmoe" / "state.json").read_text())
    assert points == {"chart-f1": hmoe_rounds + flat_rounds, "chart-time": 3, "chart-mem": 3, "chart-visits": 3}
    assert re.fullmatch(r"hmoe 0\.\d{4} · flat 0\.\d{4} \(test\)", heldout), heldout
    assert experts == ["flat", "0", "1", "2"]
    assert sum(state["visits"].values()) == hmoe_rounds
    assert dev1_last == "flat r3 flat ok"  # its last task: the flat model's last round
    assert final_logs == []
