"""Tests for firmware_scripts/: flash_sd.sh and install_client.sh.

Each test builds a tiny "Raspberry Pi OS" image in tmp_path, small enough to read by hand:

    sector 0          MBR (dos label)
    sectors 2048+     partition 1, type c (FAT32 LBA), 16 MiB, FAT16 "BOOTFS":
                      config.txt, cmdline.txt (+ user-data, meta-data for a cloud-init image)
    sectors 34816+    partition 2, type 83, 7 MiB of seeded random bytes ("rootfs")

flashes it to an image file or to a fake block device (a regular file plus a fake /sys/block and
/proc/mounts, see the test hooks in flash_sd.sh), and reads the provisioning back with mtools.
install_client.sh is run into a fake root with --root/--no-install.

Tools: shellcheck, mtools, dosfstools (mkfs.vfat), fdisk (sfdisk), xz-utils, systemd
(systemd-analyze). A missing tool skips the test, except under CI=true where it fails.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import require_tool

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "firmware_scripts"
FLASH = SCRIPTS / "flash_sd.sh"
INSTALL = SCRIPTS / "install_client.sh"

MIB = 1024 * 1024
BOOT_OFFSET = 2048 * 512            # partition 1 starts at sector 2048
BOOT_SECTORS = 32768                # 16 MiB
ROOTFS_OFFSET = 34816 * 512         # partition 2
IMAGE_SIZE = 24 * MIB
CMDLINE = ("console=serial0,115200 console=tty1 root=PARTUUID=abcd1234-02 rootfstype=ext4 "
           "fsck.repair=yes rootwait quiet init=/usr/lib/raspberrypi-sys-mods/firstboot")
WIFI_SSID = 'Lab "Net" 5'
WIFI_PASSPHRASE = "correct horse battery"
BUDGET = 900
OVERHEAD_MB = 384                   # install_client.sh's MEMORY_OVERHEAD_MB


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
# sfdisk and mkfs.vfat live in /usr/sbin, which is not on a normal user's PATH on Debian.
TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
PACKAGE_OF = {"sfdisk": "fdisk", "mkfs.vfat": "dosfstools", "mcopy": "mtools", "mtype": "mtools",
              "mdir": "mtools", "xz": "xz-utils", "systemd-analyze": "systemd", "shellcheck": "shellcheck",
              "setpriv": "util-linux"}


def require(*tools: str) -> None:
    """Skip when a tool is missing, or fail under CI=true (conftest.require_tool)."""
    for tool in tools:
        require_tool(tool, f"apt-get install -y {PACKAGE_OF.get(tool, tool)}")


FLASH_TOOLS = ("sfdisk", "mkfs.vfat", "mcopy", "mtype", "mdir", "xz")


def run(cmd, env=None, **kw) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PATH": TOOL_PATH, "MTOOLS_SKIP_CHECK": "1", **(env or {})}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=full_env, **kw)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mtype(image: Path, name: str, offset: int = BOOT_OFFSET) -> bytes:
    res = subprocess.run(["mtype", "-i", f"{image}@@{offset}", f"::/{name}"], capture_output=True,
                         env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    assert res.returncode == 0, f"cannot read {name} from {image}: {res.stderr.decode()}"
    return res.stdout


def mls(image: Path, offset: int = BOOT_OFFSET) -> set[str]:
    res = run(["mdir", "-b", "-i", f"{image}@@{offset}", "::/"])
    assert res.returncode == 0, res.stderr
    return {line.removeprefix("::/").rstrip("/") for line in res.stdout.split()}


def build_os_image(path: Path, *, cloud_init: bool = False) -> Path:
    """The tiny Raspberry Pi OS look-alike described in the module docstring."""
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    layout = "label: dos\nstart=2048, size=32768, type=c, bootable\nstart=34816, type=83\n"
    res = run(["sfdisk", "-q", path], input=layout)
    assert res.returncode == 0, res.stderr
    res = run(["mkfs.vfat", "-F", "16", "-n", "BOOTFS", "--offset", "2048", path, str(BOOT_SECTORS // 2)])
    assert res.returncode == 0, res.stderr
    files = path.parent / f"{path.name}.files"
    files.mkdir()
    (files / "cmdline.txt").write_text(CMDLINE + "\n")
    (files / "config.txt").write_text("arm_64bit=1\ndtparam=audio=on\n")
    if cloud_init:  # what pi-gen's stage2/04-cloud-init puts on Trixie images
        (files / "user-data").write_text("#cloud-config\nssh_pwauth: false\n")
        (files / "meta-data").write_text("dsmode: local\ninstance_id: rpios-image\n")
        (files / "network-config").write_text("network:\n  version: 2\n  ethernets:\n    eth0:\n      dhcp4: true\n")
    res = run(["mcopy", "-i", f"{path}@@{BOOT_OFFSET}", *sorted(files.iterdir()), "::/"])
    assert res.returncode == 0, res.stderr
    with open(path, "r+b") as f:
        f.seek(ROOTFS_OFFSET)
        f.write(random.Random(0).randbytes(IMAGE_SIZE - ROOTFS_OFFSET))
    return path


def make_shard(path: Path) -> Path:
    """A 4-sample shard: x (4, 3, 8, 8) uint8, y = [0, 1, 2, 3]."""
    np = pytest.importorskip("numpy")
    np.savez(path, x=np.zeros((4, 3, 8, 8), np.uint8), y=np.arange(4))
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """Device files a user would pass: shard, credentials, CA, Wi-Fi passphrase, SSH key."""
    d = tmp_path / "inputs"
    d.mkdir()
    (d / "credentials").write_text("pi-07:s3cret:with-colon\n")
    (d / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n")
    (d / "client.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIBclient\n-----END CERTIFICATE-----\n")
    (d / "client.key").write_text("-----BEGIN PRIVATE KEY-----\nMIIEkey\n-----END PRIVATE KEY-----\n")
    (d / "wifi.pw").write_text(WIFI_PASSPHRASE + "\n")
    (d / "id_ed25519.pub").write_text(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBZkVYiG4QP1vGdGm1yqsKaVLaCiYdLMPM0sXl0cKLBm admin@laptop\n")
    (d / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----\n")
    make_shard(d / "shard.npz")
    return {p.name: p for p in d.iterdir()}


def flash(image: Path, target: Path, *extra, env=None) -> subprocess.CompletedProcess:
    return run([FLASH, image, target, *extra], env=env)


def full_args(inputs: dict[str, Path]) -> list:
    return ["--device-id", "pi-07", "--broker", "mqtt://10.0.0.2:1883", "--data", inputs["shard.npz"],
            "--credentials", inputs["credentials"], "--ssh-key", inputs["id_ed25519.pub"],
            "--wifi-ssid", WIFI_SSID, "--wifi-password-file", inputs["wifi.pw"], "--wifi-country", "de",
            "--memory-budget-mb", str(BUDGET)]


def wpa_psk(passphrase: str, ssid: str) -> str:
    return hashlib.pbkdf2_hmac("sha1", passphrase.encode(), ssid.encode(), 4096, 32).hex()


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under root -> (mode, sha256 or '' for directories)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), "" if p.is_dir() else sha256(p))
    return out


def install(root: Path, *args, env=None) -> subprocess.CompletedProcess:
    return run(["bash", INSTALL, "--root", root, "--no-install", *args], env={"EDGEHMOE_ARCH": "arm64", **(env or {})})


# --------------------------------------------------------------------------------------------
# static checks
# --------------------------------------------------------------------------------------------
def test_shellcheck_passes_on_every_script():
    require("shellcheck")
    scripts = sorted(SCRIPTS.glob("*.sh"))
    assert {s.name for s in scripts} >= {"flash_sd.sh", "install_client.sh"}
    res = run(["shellcheck", "--severity=style", "--shell=bash", *scripts])
    assert res.returncode == 0, res.stdout + res.stderr
    for s in scripts:
        text = s.read_text()
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text, s.name
        assert os.access(s, os.X_OK), f"{s.name} is not executable"
        help_ = run([s, "--help"])
        assert help_.returncode == 0 and "Usage:" in help_.stdout, s.name


# --------------------------------------------------------------------------------------------
# flash_sd.sh on image files
# --------------------------------------------------------------------------------------------
def test_flash_bookworm_image_writes_firstrun_provisioning(tmp_path, inputs):
    require(*FLASH_TOOLS, "shellcheck")
    image = build_os_image(tmp_path / "bookworm.img")
    (tmp_path / "bookworm.img.sha256").write_text(f"{sha256(image)}  bookworm.img\n")
    card = tmp_path / "card.img"

    res = flash(image, card, *full_args(inputs))

    assert res.returncode == 0, res.stderr
    assert "verifying sha256" in res.stderr and "firstrun (detected)" in res.stderr
    raw, written = image.read_bytes(), card.read_bytes()
    assert len(written) == len(raw)
    assert written[:BOOT_OFFSET] == raw[:BOOT_OFFSET], "partition table changed"
    assert written[ROOTFS_OFFSET:] == raw[ROOTFS_OFFSET:], "rootfs partition changed"

    files = mls(card)
    assert {"config.txt", "cmdline.txt", "firstrun.sh", "edgehmoe"} <= files
    assert "user-data" not in files  # a Bookworm image gets no cloud-init seed
    assert mtype(card, "config.txt") == mtype(image, "config.txt")

    cmdline = mtype(card, "cmdline.txt").decode()
    assert cmdline.count("\n") == 1 and cmdline.endswith("\n"), "cmdline.txt must stay one line"
    assert cmdline.startswith(CMDLINE + " ")
    tokens = cmdline.split()
    assert "cgroup_enable=memory" in tokens and "cfg80211.ieee80211_regdom=DE" in tokens
    assert tokens[-3:] == ["systemd.run=/boot/firmware/firstrun.sh", "systemd.run_success_action=reboot",
                           "systemd.unit=kernel-command-line.target"]

    firstrun = mtype(card, "firstrun.sh").decode()
    psk = wpa_psk(WIFI_PASSPHRASE, WIFI_SSID)
    assert firstrun.startswith("#!/bin/bash\n")
    assert "NEW_HOSTNAME='edgehmoe-pi-07'" in firstrun
    assert "WIFI_SSID='Lab \"Net\" 5'" in firstrun and f"WIFI_PSK='{psk}'" in firstrun
    assert "WIFI_COUNTRY='DE'" in firstrun
    assert inputs["id_ed25519.pub"].read_text().strip() in firstrun
    assert "sh /boot/firmware/edgehmoe/firstboot.sh" in firstrun
    assert "rm -f /boot/firmware/firstrun.sh" in firstrun
    assert WIFI_PASSPHRASE.encode() not in written, "the Wi-Fi passphrase itself must not reach the card"
    (tmp_path / "firstrun.sh").write_text(firstrun)
    (tmp_path / "firstboot.sh").write_bytes(mtype(card, "edgehmoe/firstboot.sh"))
    sc = run(["shellcheck", tmp_path / "firstrun.sh", tmp_path / "firstboot.sh"])
    assert sc.returncode == 0, sc.stdout

    env = mtype(card, "edgehmoe/client.env").decode().splitlines()
    settings = dict(line.split("=", 1) for line in env if line and not line.startswith("#"))
    assert settings == {
        "EDGEHMOE_BROKER": "mqtt://10.0.0.2:1883",
        "EDGEHMOE_DEVICE_ID": "pi-07",
        "EDGEHMOE_MEMORY_BUDGET_MB": str(BUDGET),
        "EDGEHMOE_DATA": "/var/lib/edgehmoe/data/shard.npz",
        "EDGEHMOE_USERNAME": "pi-07",
        "EDGEHMOE_PASSWORD_FILE": "/etc/edgehmoe/mqtt-password",
    }
    assert mtype(card, "edgehmoe/mqtt-password") == b"s3cret:with-colon"
    assert mtype(card, "edgehmoe/shard.npz") == inputs["shard.npz"].read_bytes()
    assert mtype(card, "edgehmoe/install_client.sh") == INSTALL.read_bytes()
    unit = mtype(card, "edgehmoe/edgehmoe-firstboot.service").decode()
    assert "ExecStart=/bin/bash /boot/firmware/edgehmoe/install_client.sh --from-boot /boot/firmware/edgehmoe" in unit
    assert "After=network-online.target" in unit and "ConditionPathExists=!/boot/firmware/edgehmoe/installed" in unit


def test_flash_trixie_xz_image_writes_cloud_init_seed(tmp_path, inputs):
    require(*FLASH_TOOLS)
    image = build_os_image(tmp_path / "trixie.img", cloud_init=True)
    xz = run(["xz", "-0", "-k", "-T1", image])
    assert xz.returncode == 0, xz.stderr
    card = tmp_path / "card.img"

    res = flash(Path(f"{image}.xz"), card, *full_args(inputs), "--cafile", inputs["ca.pem"],
                "--broker", "mqtts://broker.lab:8883", "--hostname", "lab-pi-7")

    assert res.returncode == 0, res.stderr
    assert "cloud-init (detected)" in res.stderr
    raw, written = image.read_bytes(), card.read_bytes()
    assert written[ROOTFS_OFFSET:] == raw[ROOTFS_OFFSET:]
    assert "firstrun.sh" not in mls(card)

    user_data = mtype(card, "user-data").decode()
    assert user_data.startswith("#cloud-config\n")
    lines = user_data.splitlines()
    assert "hostname: lab-pi-7" in lines and "enable_ssh: true" in lines and "ssh_pwauth: false" in lines
    assert "- name: pi" in lines and "  lock_passwd: true" in lines
    key = inputs["id_ed25519.pub"].read_text().strip()
    assert f'    - "{key}"' in lines
    assert lines[-2:] == ["runcmd:", "- [ sh, /boot/firmware/edgehmoe/firstboot.sh, --start ]"]

    network = mtype(card, "network-config").decode()
    assert '        "Lab \\"Net\\" 5":' in network.splitlines()
    assert f'password: "{wpa_psk(WIFI_PASSPHRASE, WIFI_SSID)}"' in network
    assert 'regulatory-domain: "DE"' in network and "eth0:" in network
    assert mtype(card, "meta-data") == mtype(image, "meta-data"), "the image's instance id is kept"

    cmdline = mtype(card, "cmdline.txt").decode()
    assert "systemd.run" not in cmdline and cmdline.split()[-2:] == ["cgroup_enable=memory",
                                                                      "cfg80211.ieee80211_regdom=DE"]
    assert mtype(card, "edgehmoe/ca.crt") == inputs["ca.pem"].read_bytes()
    env = mtype(card, "edgehmoe/client.env").decode()
    assert "EDGEHMOE_BROKER=mqtts://broker.lab:8883\n" in env and "EDGEHMOE_CAFILE=/etc/edgehmoe/ca.crt\n" in env


def test_dry_run_changes_nothing(tmp_path, inputs):
    require(*FLASH_TOOLS)
    image = build_os_image(tmp_path / "os.img")
    card = tmp_path / "card.img"
    card.write_bytes(random.Random(1).randbytes(IMAGE_SIZE))
    before, listing = sha256(card), sorted(os.listdir(tmp_path))

    res = flash(image, card, *full_args(inputs), "--dry-run")

    assert res.returncode == 0, res.stderr
    assert "dry run: nothing written" in res.stderr and "firstrun.sh" in res.stderr
    assert sha256(card) == before
    assert sorted(os.listdir(tmp_path)) == listing, "dry run left files behind"


def test_new_image_file_target_is_created(tmp_path, inputs):
    require(*FLASH_TOOLS)
    image = build_os_image(tmp_path / "os.img")
    card = tmp_path / "out" / "pi-07.img"
    card.parent.mkdir()

    res = flash(image, card, "--device-id", "pi-07", "--broker", "mqtt://[fd00::2]:1883")

    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(card.parent)) == ["pi-07.img"], "temp file left behind"
    assert b"EDGEHMOE_BROKER=mqtt://[fd00::2]:1883\n" in mtype(card, "edgehmoe/client.env")
    assert b"EDGEHMOE_MEMORY_BUDGET_MB=auto\n" in mtype(card, "edgehmoe/client.env")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image": "missing.img"}, "does not exist"),
        ({"image": "os.zip"}, "zip images are not supported"),
        ({"--broker": "http://10.0.0.2:1883"}, "bad broker URL"),
        ({"--broker": "mqtt://"}, "bad broker URL"),
        ({"--broker": "mqtt://host name:1883"}, "bad broker URL"),
        ({"--broker": "mqtt://10.0.0.2:70000"}, "outside 1-65535"),
        ({"--broker": None}, "--broker is required"),
        ({"--device-id": "pi/07"}, "bad device id"),
        ({"--ssh-key": "nokey.pub"}, "does not exist"),
        ({"--ssh-key": "id_ed25519"}, "PRIVATE key"),
        ({"--ssh-key": "credentials"}, "not an OpenSSH public key"),
        ({"--ssh-key": "."}, "not a regular file"),
        ({"--wifi-password-file": None}, "--wifi-ssid needs --wifi-password-file"),
        ({"--wifi-password": "hunter22"}, "not accepted"),
        ({"--data": "ca.pem"}, "must be an .npz"),
        ({"--memory-budget-mb": "lots"}, "bad --memory-budget-mb"),
        ({"--checksum": "0" * 64}, "checksum mismatch"),
        ({"--provisioning": "magic"}, "choose auto, cloud-init or firstrun"),
        ({"--broker": "mqtts://10.0.0.2:8883", "--certfile": "client.pem"}, "give --certfile and --keyfile together"),
        ({"--certfile": "client.pem", "--keyfile": "client.key"}, "a client certificate needs TLS"),
        ({"--broker": "mqtts://10.0.0.2:8883", "--certfile": "client.pem", "--keyfile": "ca.pem"},
         "holds no PEM private key"),
        ({"--broker": "mqtts://10.0.0.2:8883", "--certfile": "client.key", "--keyfile": "client.key"},
         "holds no PEM certificate"),
    ],
)
def test_bad_arguments_fail_clearly_and_leave_target_untouched(tmp_path, inputs, change, message):
    require(*FLASH_TOOLS)
    image = build_os_image(tmp_path / "os.img")
    (tmp_path / "os.zip").write_bytes(b"PK\x03\x04")
    card = tmp_path / "card.img"
    card.write_bytes(b"\x55" * MIB)
    before = sha256(card)
    opts = dict(zip(full_args(inputs)[::2], full_args(inputs)[1::2]))
    image_arg = image
    for key, value in change.items():
        if key == "image":
            image_arg = tmp_path / value
        elif value is None:
            opts.pop(key)
        else:
            opts[key] = (inputs.get(value, tmp_path / value) if key in {"--ssh-key", "--data", "--certfile", "--keyfile"}
                         else value)
    if change.get("--ssh-key") == ".":
        opts["--ssh-key"] = tmp_path
    args = [x for kv in opts.items() for x in kv]

    res = flash(image_arg, card, *args)

    assert res.returncode != 0
    assert message in res.stderr, res.stderr
    assert sha256(card) == before


def test_unreadable_key_is_refused(tmp_path, inputs):
    require(*FLASH_TOOLS)
    image = build_os_image(tmp_path / "os.img")
    card = tmp_path / "card.img"
    card.write_bytes(b"\x55" * MIB)
    inputs["id_ed25519.pub"].chmod(0)
    cmd = [FLASH, image, card, "--device-id", "a", "--broker", "mqtt://h:1", "--ssh-key", inputs["id_ed25519.pub"]]
    if os.geteuid() == 0:
        # root reads mode-000 files through CAP_DAC_OVERRIDE; drop it so permissions apply.
        require("setpriv")
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *cmd]

    res = run(cmd)

    assert res.returncode == 2, res.stderr
    assert "is not readable" in res.stderr
    assert card.read_bytes() == b"\x55" * MIB


# --------------------------------------------------------------------------------------------
# flash_sd.sh on (fake) block devices: the safety checks
# --------------------------------------------------------------------------------------------
@pytest.fixture
def fake_system(tmp_path):
    """/sys/block with a removable 64 MiB card sdz (sdz1, sdz2) and the system disk nvme0n1
    (root on nvme0n1p2); each disk has a same-named regular file that stands in for /dev/<name>."""
    sys_block = tmp_path / "sys" / "block"
    for disk, parts, removable in (("sdz", ("sdz1", "sdz2"), 1), ("nvme0n1", ("nvme0n1p1", "nvme0n1p2"), 0)):
        (sys_block / disk).mkdir(parents=True)
        (sys_block / disk / "removable").write_text(f"{removable}\n")
        (sys_block / disk / "size").write_text(f"{64 * MIB // 512}\n")
        for i, part in enumerate(parts, 1):
            (sys_block / disk / part).mkdir()
            (sys_block / disk / part / "partition").write_text(f"{i}\n")
    dev = tmp_path / "dev"
    dev.mkdir()
    for disk in ("sdz", "nvme0n1"):
        (dev / disk).write_bytes(b"\xaa" * MIB)
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/nvme0n1p2 / ext4 rw,relatime 0 0\nproc /proc proc rw 0 0\n"
                      "/dev/nvme0n1p1 /boot/efi vfat rw 0 0\n")
    swaps = tmp_path / "swaps"
    swaps.write_text("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n")
    env = {"EDGEHMOE_FAKE_BLOCK_DEVICE": "1", "EDGEHMOE_SYS_BLOCK": str(sys_block),
           "EDGEHMOE_PROC_MOUNTS": str(mounts), "EDGEHMOE_PROC_SWAPS": str(swaps)}
    return {"env": env, "dev": dev, "sys": sys_block, "mounts": mounts, "swaps": swaps}


def test_removable_card_is_flashed(tmp_path, fake_system):
    require(*FLASH_TOOLS)
    image = build_os_image(tmp_path / "os.img")
    card = fake_system["dev"] / "sdz"
    res = flash(image, card, "--device-id", "pi-01", "--broker", "mqtt://h:1883", env=fake_system["env"])
    assert res.returncode == 0, res.stderr
    assert card.read_bytes()[ROOTFS_OFFSET:] == image.read_bytes()[ROOTFS_OFFSET:]
    assert b"EDGEHMOE_DEVICE_ID=pi-01\n" in mtype(card, "edgehmoe/client.env")


@pytest.mark.parametrize(
    "setup, target, extra, message",
    [
        ("mounted", "sdz", [], "is mounted (/dev/sdz1 on /media/me/boot fs)"),
        ("mounted", "sdz", ["--force"], "is mounted"),
        ("swap", "sdz", [], "in use as swap"),
        (None, "nvme0n1", [], "is the system disk"),
        (None, "nvme0n1", ["--force"], "is the system disk"),
        ("fixed", "sdz", [], "does not report itself as removable"),
        ("small", "sdz", [], "holds 1 MiB but the image needs 24 MiB"),
        ("partition", "sdz1", [], "not a whole disk"),
    ],
)
def test_unsafe_targets_are_refused(tmp_path, fake_system, setup, target, extra, message):
    require(*FLASH_TOOLS)
    image = build_os_image(tmp_path / "os.img")
    if setup == "mounted":
        with open(fake_system["mounts"], "a") as f:
            f.write("/dev/sdz1 /media/me/boot\\040fs vfat rw,nosuid 0 0\n")
    elif setup == "swap":
        with open(fake_system["swaps"], "a") as f:
            f.write("/dev/sdz2                               partition\t1048572\t\t0\t\t-2\n")
    elif setup == "fixed":
        (fake_system["sys"] / "sdz" / "removable").write_text("0\n")
    elif setup == "small":
        (fake_system["sys"] / "sdz" / "size").write_text(f"{MIB // 512}\n")
    elif setup == "partition":
        (fake_system["dev"] / "sdz1").write_bytes(b"\xaa" * MIB)
    dev = fake_system["dev"] / target
    before = sha256(dev)

    res = flash(image, dev, "--device-id", "pi-01", "--broker", "mqtt://h:1883", *extra, env=fake_system["env"])

    assert res.returncode == 1, res.stderr
    assert message in res.stderr, res.stderr
    assert sha256(dev) == before


def test_force_allows_a_card_that_is_not_marked_removable(tmp_path, fake_system):
    require(*FLASH_TOOLS)
    image = build_os_image(tmp_path / "os.img")
    (fake_system["sys"] / "sdz" / "removable").write_text("0\n")
    res = flash(image, fake_system["dev"] / "sdz", "--device-id", "pi-01", "--broker", "mqtt://h:1883",
                "--force", env=fake_system["env"])
    assert res.returncode == 0, res.stderr
    assert "not marked removable; continuing because of --force" in res.stderr
    assert "firstrun.sh" in mls(fake_system["dev"] / "sdz")


def test_sd_card_in_builtin_reader_counts_as_removable(tmp_path, fake_system):
    """mmcblk devices report removable=0 even for an SD slot; device/type says SD."""
    require(*FLASH_TOOLS)
    image = build_os_image(tmp_path / "os.img")
    (fake_system["sys"] / "sdz" / "removable").write_text("0\n")
    (fake_system["sys"] / "sdz" / "device").mkdir()
    (fake_system["sys"] / "sdz" / "device" / "type").write_text("SD\n")
    res = flash(image, fake_system["dev"] / "sdz", "--device-id", "pi-01", "--broker", "mqtt://h:1883",
                "--dry-run", env=fake_system["env"])
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------------------------
# install_client.sh
# --------------------------------------------------------------------------------------------
def unit_fields(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_install_client_writes_config_and_unit_and_second_run_changes_nothing(tmp_path, inputs):
    root = tmp_path / "root"
    root.mkdir()
    pw = tmp_path / "pw"
    pw.write_text("s3cret")
    args = ["--broker", "mqtt://10.0.0.2:1883", "--device-id", "pi-07", "--data", inputs["shard.npz"],
            "--memory-budget-mb", str(BUDGET), "--password-file", pw, "--cafile", inputs["ca.pem"]]

    first = install(root, *args)
    snapshot = tree(root)
    second = install(root, *args)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert tree(root) == snapshot, "second run changed files"
    assert "done: 0 changed" in second.stdout and "wrote" not in second.stdout

    env = (root / "etc/edgehmoe/client.env").read_text()
    assert unit_fields(env) == {
        "EDGEHMOE_BROKER": "mqtt://10.0.0.2:1883",
        "EDGEHMOE_DEVICE_ID": "pi-07",
        "EDGEHMOE_MEMORY_BUDGET_MB": str(BUDGET),
        "EDGEHMOE_DATA": "/var/lib/edgehmoe/data/shard.npz",
        "EDGEHMOE_USERNAME": "pi-07",
        "EDGEHMOE_PASSWORD_FILE": "/etc/edgehmoe/mqtt-password",
        "EDGEHMOE_CAFILE": "/etc/edgehmoe/ca.crt",
    }
    assert snapshot["etc/edgehmoe/client.env"][0] == 0o640
    assert snapshot["etc/edgehmoe/mqtt-password"][0] == 0o640
    assert (root / "etc/edgehmoe/mqtt-password").read_text() == "s3cret"
    assert snapshot["var/lib/edgehmoe/data/shard.npz"] == (0o640, sha256(inputs["shard.npz"]))
    assert snapshot["var/lib/edgehmoe"][0] == 0o750
    assert snapshot["opt/edgehmoe/bin/edgehmoe-run"][0] == 0o755
    assert snapshot["usr/local/sbin/edgehmoe-install-client"] == (0o755, sha256(INSTALL))

    unit = (root / "etc/systemd/system/edgehmoe-client.service").read_text()
    fields = unit_fields(unit)
    assert fields["After"].split()[0] == "network-online.target" and fields["Wants"] == "network-online.target"
    assert fields["User"] == "edgehmoe" and fields["Group"] == "edgehmoe"
    assert fields["Restart"] == "on-failure"
    assert fields["MemoryMax"] == f"{BUDGET + OVERHEAD_MB}M"
    assert fields["StandardOutput"] == "journal" and fields["StandardError"] == "journal"
    assert fields["EnvironmentFile"] == "/etc/edgehmoe/client.env"
    assert fields["ExecStart"] == "/opt/edgehmoe/bin/edgehmoe-run"
    assert fields["WantedBy"] == "multi-user.target"
    assert fields["NoNewPrivileges"] == "yes"

    constraints = (root / "etc/edgehmoe/constraints.txt").read_text().splitlines()
    pins = [line for line in constraints if line and not line.startswith("#")]
    assert pins == ["onnxruntime!=1.21.*", "torch!=2.1.0,!=2.4.0,!=2.6.*,!=2.10.*,<2.10"]


def test_unit_files_pass_systemd_analyze_verify(tmp_path, inputs):
    require("systemd-analyze", *FLASH_TOOLS)
    root = tmp_path / "root"
    root.mkdir()
    res = install(root, "--broker", "mqtt://h:1883", "--device-id", "pi-07", "--data", inputs["shard.npz"],
                  "--memory-budget-mb", "512")
    assert res.returncode == 0, res.stderr
    # verify checks that ExecStart= is executable; point it at the runner inside the fake root.
    unit = (root / "etc/systemd/system/edgehmoe-client.service").read_text()
    check = tmp_path / "verify"
    check.mkdir()
    (check / "edgehmoe-client.service").write_text(
        unit.replace("ExecStart=/opt/edgehmoe/", f"ExecStart={root}/opt/edgehmoe/"))
    image = build_os_image(tmp_path / "os.img")
    card = tmp_path / "card.img"
    assert flash(image, card, "--device-id", "pi-07", "--broker", "mqtt://h:1883").returncode == 0
    (check / "edgehmoe-firstboot.service").write_bytes(mtype(card, "edgehmoe/edgehmoe-firstboot.service"))

    for name in ("edgehmoe-client.service", "edgehmoe-firstboot.service"):
        res = run(["systemd-analyze", "verify", "--man=no", check / name])
        assert res.returncode == 0, res.stderr
        assert name not in res.stderr, f"systemd-analyze complained: {res.stderr}"


def test_install_from_flashed_card(tmp_path, inputs):
    """The contract between the two scripts: what flash_sd.sh writes, install_client.sh reads."""
    require(*FLASH_TOOLS)
    image = build_os_image(tmp_path / "os.img")
    card = tmp_path / "card.img"
    res = flash(image, card, *full_args(inputs), "--cafile", inputs["ca.pem"])
    assert res.returncode == 0, res.stderr
    boot = tmp_path / "boot"
    boot.mkdir()
    res = run(["mcopy", "-s", "-i", f"{card}@@{BOOT_OFFSET}", "::/edgehmoe", boot])
    assert res.returncode == 0, res.stderr
    root = tmp_path / "root"
    root.mkdir()

    first = install(root, "--from-boot", boot / "edgehmoe")
    snapshot = tree(root)
    second = install(root, "--from-boot", boot / "edgehmoe")

    assert first.returncode == 0, first.stderr
    env = unit_fields((root / "etc/edgehmoe/client.env").read_text())
    assert env["EDGEHMOE_DEVICE_ID"] == "pi-07" and env["EDGEHMOE_BROKER"] == "mqtt://10.0.0.2:1883"
    assert env["EDGEHMOE_MEMORY_BUDGET_MB"] == str(BUDGET) and env["EDGEHMOE_USERNAME"] == "pi-07"
    assert (root / "etc/edgehmoe/mqtt-password").read_text() == "s3cret:with-colon"
    assert (root / "etc/edgehmoe/ca.crt").read_bytes() == inputs["ca.pem"].read_bytes()
    assert (root / "var/lib/edgehmoe/data/shard.npz").read_bytes() == inputs["shard.npz"].read_bytes()
    left = {p.name for p in (boot / "edgehmoe").iterdir()}
    assert "installed" in left and "mqtt-password" not in left and "shard.npz" not in left
    assert second.returncode == 0 and tree(root) == snapshot and "done: 0 changed" in second.stdout


def test_client_certificate_goes_from_the_card_to_the_client(tmp_path, inputs):
    """A broker that requires client certificates: flash_sd.sh --certfile/--keyfile -> the
    installed service passes them to the client; the private key leaves the boot partition."""
    require(*FLASH_TOOLS, "shellcheck")
    image = build_os_image(tmp_path / "os.img")
    card = tmp_path / "card.img"
    res = flash(image, card, *full_args(inputs), "--broker", "mqtts://10.0.0.2:8883", "--cafile", inputs["ca.pem"],
                "--certfile", inputs["client.pem"], "--keyfile", inputs["client.key"])
    assert res.returncode == 0, res.stderr
    assert "client certificate" in res.stderr
    boot = tmp_path / "boot"
    boot.mkdir()
    assert run(["mcopy", "-s", "-i", f"{card}@@{BOOT_OFFSET}", "::/edgehmoe", boot]).returncode == 0
    root = tmp_path / "root"
    root.mkdir()

    res = install(root, "--from-boot", boot / "edgehmoe")

    assert res.returncode == 0, res.stderr
    env = unit_fields((root / "etc/edgehmoe/client.env").read_text())
    assert env["EDGEHMOE_CERTFILE"] == "/etc/edgehmoe/client.crt" and env["EDGEHMOE_KEYFILE"] == "/etc/edgehmoe/client.key"
    files = tree(root)
    assert files["etc/edgehmoe/client.crt"] == (0o644, sha256(inputs["client.pem"]))
    assert files["etc/edgehmoe/client.key"] == (0o640, sha256(inputs["client.key"]))
    left = {p.name for p in (boot / "edgehmoe").iterdir()}
    assert "client.key" not in left and "client.crt" in left and "installed" in left
    # the service's runner hands them to the client
    fake_client = tmp_path / "client"
    fake_client.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake_client.chmod(0o755)
    env["EDGEHMOE_DATA"] = str(root / "var/lib/edgehmoe/data/shard.npz")
    out = subprocess.run([root / "opt/edgehmoe/bin/edgehmoe-run"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "EDGEHMOE_CLIENT_BIN": str(fake_client), **env})
    assert out.returncode == 0, out.stderr
    argv = out.stdout.splitlines()
    assert argv[argv.index("--certfile") + 1] == "/etc/edgehmoe/client.crt"
    assert argv[argv.index("--keyfile") + 1] == "/etc/edgehmoe/client.key"
    assert argv[argv.index("--cafile") + 1] == "/etc/edgehmoe/ca.crt"
    assert run(["shellcheck", root / "opt/edgehmoe/bin/edgehmoe-run"]).returncode == 0


def test_runner_turns_client_env_into_client_arguments(tmp_path, inputs):
    require("shellcheck")
    root = tmp_path / "root"
    root.mkdir()
    pw = tmp_path / "pw"
    pw.write_text("x")
    res = install(root, "--broker", "mqtts://b.lab:8883", "--device-id", "pi-07", "--data", inputs["shard.npz"],
                  "--memory-budget-mb", "700", "--password-file", pw, "--username", "dev7")
    assert res.returncode == 0, res.stderr
    runner = root / "opt/edgehmoe/bin/edgehmoe-run"
    assert run(["shellcheck", runner]).returncode == 0
    fake_client = tmp_path / "client"
    fake_client.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake_client.chmod(0o755)
    env = unit_fields((root / "etc/edgehmoe/client.env").read_text())
    env["EDGEHMOE_DATA"] = str(root / "var/lib/edgehmoe/data/shard.npz")

    out = subprocess.run([runner], env={"PATH": "/usr/bin:/bin", "EDGEHMOE_CLIENT_BIN": str(fake_client), **env},
                         capture_output=True, text=True)

    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "--broker", "mqtts://b.lab:8883", "--device-id", "pi-07", "--data", env["EDGEHMOE_DATA"],
        "--memory-budget-mb", "700", "--username", "dev7", "--password-file", "/etc/edgehmoe/mqtt-password"]
    env["EDGEHMOE_DATA"] = str(tmp_path / "missing.npz")
    missing = subprocess.run([runner], env={"PATH": "/usr/bin:/bin", "EDGEHMOE_CLIENT_BIN": str(fake_client), **env},
                             capture_output=True, text=True)
    assert missing.returncode == 78 and "data shard" in missing.stderr


def test_install_client_refuses_32bit_userland(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    res = install(root, "--broker", "mqtt://h:1", "--device-id", "a", env={"EDGEHMOE_ARCH": "armhf"})
    assert res.returncode == 1
    assert "not 64-bit ARM" in res.stderr and "64-bit Raspberry Pi OS" in res.stderr
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(
    "args, env_text, message",
    [
        (["--device-id", "a"], None, "no broker"),
        (["--broker", "tcp://h:1", "--device-id", "a"], None, "bad broker URL"),
        (["--broker", "mqtt://h:1", "--device-id", "a b"], None, "bad device id"),
        (["--broker", "mqtt://h:1", "--device-id", "a", "--memory-budget-mb", "12"], None, "bad memory budget"),
        (["--broker", "mqtt://h:1", "--device-id", "a", "--password", "x"], None, "not accepted"),
        (["--broker", "mqtt://h:1", "--device-id", "a", "--data", "/nonexistent.npz"], None, "missing or not readable"),
        (["--from-boot", "BOOT"], "EDGEHMOE_BROKER=mqtt://h:1\nEDGEHMOE_TYPO=1\n", "unknown key 'EDGEHMOE_TYPO'"),
    ],
)
def test_install_client_bad_input_writes_nothing(tmp_path, args, env_text, message):
    root = tmp_path / "root"
    root.mkdir()
    boot = tmp_path / "boot"
    boot.mkdir()
    if env_text:
        (boot / "client.env").write_text(env_text)
    res = install(root, *[str(boot) if a == "BOOT" else a for a in args])
    assert res.returncode != 0
    assert message in res.stderr, res.stderr
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(
    "broker, files, message",
    [
        ("mqtts://h:8883", ["--certfile", "client.pem"], "give --certfile and --keyfile together"),
        ("mqtt://h:1883", ["--certfile", "client.pem", "--keyfile", "client.key"], "a client certificate needs TLS"),
        ("mqtts://h:8883", ["--certfile", "client.pem", "--keyfile", "ca.pem"], "holds no PEM private key"),
        ("mqtts://h:8883", ["--certfile", "client.key", "--keyfile", "client.key"], "holds no PEM certificate"),
    ],
)
def test_install_client_refuses_a_bad_client_certificate(tmp_path, inputs, broker, files, message):
    root = tmp_path / "root"
    root.mkdir()
    res = install(root, "--broker", broker, "--device-id", "a", "--memory-budget-mb", "256",
                  *[inputs.get(f, f) for f in files])
    assert res.returncode != 0
    assert message in res.stderr, res.stderr
    assert list(root.iterdir()) == []


def test_install_client_dry_run_writes_nothing(tmp_path, inputs):
    root = tmp_path / "root"
    root.mkdir()
    res = install(root, "--broker", "mqtt://h:1", "--device-id", "a", "--data", inputs["shard.npz"],
                  "--memory-budget-mb", "256", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "would write /etc/systemd/system/edgehmoe-client.service" in res.stdout
    assert list(root.iterdir()) == []


def test_memory_budget_auto_is_half_the_ram(tmp_path, inputs):
    root = tmp_path / "root"
    root.mkdir()
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        3999548 kB\nMemFree:          100000 kB\n")  # a 4 GB Pi 4
    res = install(root, "--broker", "mqtt://h:1", "--device-id", "a", "--data", inputs["shard.npz"],
                  env={"EDGEHMOE_PROC_MEMINFO": str(meminfo)})
    assert res.returncode == 0, res.stderr
    budget = 3999548 // 1024 // 2
    assert f"EDGEHMOE_MEMORY_BUDGET_MB={budget}\n" in (root / "etc/edgehmoe/client.env").read_text()
    unit = (root / "etc/systemd/system/edgehmoe-client.service").read_text()
    assert f"MemoryMax={budget + OVERHEAD_MB}M\n" in unit


def test_install_client_enables_memory_cgroup_once(tmp_path, inputs):
    root = tmp_path / "root"
    (root / "boot/firmware").mkdir(parents=True)
    cmdline = root / "boot/firmware/cmdline.txt"
    cmdline.write_text(CMDLINE + "\n")
    args = ["--broker", "mqtt://h:1", "--device-id", "a", "--data", inputs["shard.npz"], "--memory-budget-mb", "300"]
    first = install(root, *args)
    after_first = cmdline.read_text()
    second = install(root, *args)
    assert first.returncode == 0 and second.returncode == 0
    assert after_first == CMDLINE + " cgroup_enable=memory\n"
    assert cmdline.read_text() == after_first and "done: 0 changed" in second.stdout
