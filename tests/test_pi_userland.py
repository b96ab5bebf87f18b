"""The device side in an emulated Raspberry Pi userland (``tools/pi_userland.sh``, issue #15).

``tools/pi_userland.sh --edge-only`` builds (once, then from its cached tarball) a Debian
bookworm arm64 root filesystem, runs it through qemu-user (binfmt_misc, emulated Cortex-A72),
installs ``edgehmoe[edge]`` from aarch64 wheels in a venv there (no torch), and checks that
``edgehmoe predict --bundle --json`` gives the same predictions as on the x86_64 host.

It needs root and binfmt_misc; without them the script exits 77 with the reason and the test
is skipped, except under ``CI=true``, where the script itself fails (a skip must not pass CI).
The full check with torch, ``install_client.sh`` and a federated run is ``make pi-check``
(docs/pi.md, "A Raspberry Pi in a box").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_tool

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "pi_userland.sh"
INSTALL = REPO / "firmware_scripts" / "install_client.sh"
SKIPPED = 77  # the script's exit status for "cannot run here" (not root, no binfmt_misc, ...)


def run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, **kwargs)


def test_usage_errors_exit_2_and_help_lists_the_options():
    # Execute
    help_ = run([SCRIPT, "--help"])
    unknown = run([SCRIPT, "--frobnicate"])
    bad_cpu = run([SCRIPT, "--cpu", "pentium"])
    bad_rounds = run([SCRIPT, "--rounds", "0"])
    # Assert
    assert help_.returncode == 0
    for option in ("--edge-only", "--cpu", "--rounds", "--rebuild", "--keep"):
        assert option in help_.stdout
    assert unknown.returncode == 2 and "unknown argument '--frobnicate'" in unknown.stderr
    assert bad_cpu.returncode == 2 and "cortex-a72" in bad_cpu.stderr
    assert bad_rounds.returncode == 2


def test_shellcheck_passes_and_install_client_documents_no_enable():
    shellcheck = require_tool("shellcheck", "apt-get install -y shellcheck")
    res = subprocess.run([shellcheck, "--severity=style", "--shell=bash", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
    help_ = run([INSTALL, "--help"])
    assert help_.returncode == 0 and "--no-enable" in help_.stdout


@pytest.mark.slow
@pytest.mark.timeout(2700)  # cold: debootstrap of the arm64 rootfs under emulation (minutes)
def test_edge_only_userland_predicts_like_x86(tmp_path):
    # Prepare: the host side (fit, export, x86 predictions) uses this interpreter's venv.
    env = {**os.environ, "EDGEHMOE_HOST_VENV": sys.prefix}
    # Execute
    res = run([SCRIPT, "--edge-only"], env=env, cwd=tmp_path, timeout=2600)
    out = res.stdout + res.stderr
    if res.returncode == SKIPPED:
        pytest.skip(out.strip().splitlines()[-1])
    # Assert
    assert res.returncode == 0, out[-6000:]
    assert "edge venv: no torch" in out
    for flags in ("(greedy)", "--beam 2", "--model flat"):
        line = next(ln for ln in out.splitlines() if f"predict --json {flags}" in ln)
        assert "predictions equal" in line, line
    assert "all checks passed" in out
