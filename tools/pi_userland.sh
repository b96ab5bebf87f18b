#!/usr/bin/env bash
# pi_userland.sh — "a Raspberry Pi in a box": run the device side of edgehmoe in an emulated
# Debian bookworm arm64 userland (debootstrap + qemu-user-static through binfmt_misc) on an
# x86_64 host, and check it behaves as on a Pi.
#
#   --edge-only (what CI runs, via tests/test_pi_userland.py):
#     1. an arm64 bookworm root filesystem (built once, cached as a tarball);
#     2. a venv in it with only edgehmoe[edge] from aarch64 wheels: no torch at all;
#     3. `edgehmoe predict --bundle --json` there gives the host's (x86_64) predictions for the
#        same images, bundle from a tiny `edgehmoe fit` + `edgehmoe export` on the host.
#   full (default; `make pi-check`), in addition, before 2.:
#     4. firmware_scripts/install_client.sh --no-enable, exactly as on a Pi (apt, account,
#        /etc/edgehmoe, venv with edgehmoe[edge,train], smoke test, unit file), run twice (the
#        second run must change nothing);
#     5. that client, started as the service would start it (user edgehmoe, client.env,
#        /opt/edgehmoe/bin/edgehmoe-run), joins an `edgehmoe-server run` on the host through
#        a Mosquitto on loopback (a chroot shares the host's network), trains its experts for
#        a few rounds on a small synthetic shard, and the run completes.
#
# The emulated CPU is a Cortex-A72 by default (QEMU_CPU; the Pi 4's core: ARMv8.0-A, no LSE
# atomics, no SVE), so wheels built for newer cores die with SIGILL here as on a Pi 4.
# Timings under emulation are not a Pi's: this checks behaviour and installs.
#
# Exit status: 0 every check passed; 1 a check failed; 2 usage; 77 skipped (not root, no
# binfmt_misc, no apt) with the reason on stderr. Under CI=true a skip is a failure (exit 1).
#
# Environment:
#   EDGEHMOE_PI_CACHE   cache folder (default ${XDG_CACHE_HOME:-$HOME/.cache}/edgehmoe/pi-userland):
#                       the rootfs tarball, and last-run/ (logs and summary of the last run)
#   EDGEHMOE_PI_MIRROR  Debian mirror for debootstrap (default http://deb.debian.org/debian)
#   EDGEHMOE_HOST_VENV  host venv with edgehmoe[all] (default: the repository's .venv)
#   EDGEHMOE_SRC        source tree the device wheel is built from (default: this repository)
set -euo pipefail

PROG=pi_userland
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${EDGEHMOE_PI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgehmoe/pi-userland}
MIRROR=${EDGEHMOE_PI_MIRROR:-http://deb.debian.org/debian}
HOST_VENV=${EDGEHMOE_HOST_VENV:-$REPO/.venv}
SRC=${EDGEHMOE_SRC:-$REPO}
SUITE=bookworm
# What a Raspberry Pi OS Lite image has that a minbase debootstrap lacks and install_client.sh
# relies on (python3-venv is left out on purpose: install_client.sh installs it with apt).
INCLUDE=python3,ca-certificates,systemd
# Bump when the way the rootfs is built changes, so an old cached tarball is not reused.
RECIPE=1
APT_HOST=(debootstrap qemu-user-static binfmt-support zstd time mosquitto)
DATASET=synthetic:coarse=2,fine=3,per_class=40,test_per_class=10,size=16,seed=3
DEVICE_ID=pi-userland

usage() {
    cat <<EOF
Usage: tools/pi_userland.sh [--edge-only] [--cpu MODEL] [--rounds N] [--rebuild] [--keep]

Run edgehmoe's device side in an emulated Debian $SUITE arm64 userland and check it (see the
header of this script). Needs root, binfmt_misc and Debian's apt (it installs ${APT_HOST[*]}).

  --edge-only   only the torch-free part: edgehmoe[edge] venv + predict equality with x86
  --cpu MODEL   emulated CPU (QEMU_CPU): cortex-a72 (Pi 4, default), cortex-a53 (Pi 3),
                cortex-a76 (Pi 5), max (every feature qemu has)
  --rounds N    federated rounds in the full check (default 3)
  --rebuild     build the rootfs again instead of using the cached tarball
  --keep        keep the work folder (rootfs, logs, run) for inspection
  -h, --help    this help

Cache: $CACHE
Exit: 0 passed, 1 failed, 2 usage, 77 skipped (a failure under CI=true).
EOF
}

EDGE_ONLY=0 CPU=cortex-a72 ROUNDS=3 REBUILD=0 KEEP=0
while [ "$#" -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --edge-only) EDGE_ONLY=1; shift ;;
        --cpu) [ "$#" -ge 2 ] || { echo "$PROG: --cpu needs a value" >&2; exit 2; }; CPU=$2; shift 2 ;;
        --rounds) [ "$#" -ge 2 ] || { echo "$PROG: --rounds needs a value" >&2; exit 2; }; ROUNDS=$2; shift 2 ;;
        --rebuild) REBUILD=1; shift ;;
        --keep) KEEP=1; shift ;;
        *) echo "$PROG: unknown argument '$1' (run tools/pi_userland.sh --help)" >&2; exit 2 ;;
    esac
done
case $CPU in
    cortex-a53|cortex-a72|cortex-a76|max) ;;
    *) echo "$PROG: unknown --cpu '$CPU'; choose one of: cortex-a53 cortex-a72 cortex-a76 max" >&2; exit 2 ;;
esac
[[ $ROUNDS =~ ^[1-9][0-9]?$ ]] || { echo "$PROG: --rounds must be a number from 1 to 99" >&2; exit 2; }

info() { printf '%s: %s\n' "$PROG" "$*"; }
fail() { printf '%s: FAILED: %s\n' "$PROG" "$*" >&2; exit 1; }
skip() {
    if [ "${CI:-}" = true ]; then
        printf '%s: FAILED: %s (CI=true: a skip is a failure)\n' "$PROG" "$*" >&2
        exit 1
    fi
    printf '%s: SKIPPED: %s\n' "$PROG" "$*" >&2
    exit 77
}

# ------------------------------------------------------------------------------------------
# Prerequisites: root, apt packages, binfmt_misc with qemu-aarch64 registered with the F flag
# ------------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || skip "needs root (debootstrap, chroot and mounts); run: sudo tools/pi_userland.sh"
[ "$(uname -s)" = Linux ] || skip "needs Linux (binfmt_misc), this is $(uname -s)"
command -v apt-get >/dev/null 2>&1 || skip "needs a Debian/Ubuntu host (apt-get) for ${APT_HOST[*]}"
HOST_ARCH=$(uname -m)

missing=()
for p in "${APT_HOST[@]}"; do
    dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    info "installing host packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d-style refusals to start services in containers are fine: we start nothing.
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/dev/null ||
        fail "apt-get install ${missing[*]} failed"
fi

BINFMT=/proc/sys/fs/binfmt_misc
if [ "$HOST_ARCH" != aarch64 ]; then
    if [ ! -e "$BINFMT/register" ]; then
        grep -qw binfmt_misc /proc/filesystems ||
            skip "the kernel has no binfmt_misc (a container without it?); aarch64 binaries cannot run here"
        mount -t binfmt_misc binfmt_misc "$BINFMT" 2>/dev/null ||
            skip "cannot mount binfmt_misc on $BINFMT (an unprivileged container?)"
        info "mounted binfmt_misc on $BINFMT"
    fi
    entry=$BINFMT/qemu-aarch64
    if [ ! -e "$entry" ]; then
        # binfmt-support's record for Debian's qemu-user-static says fix_binary yes (the F flag):
        # the kernel opens the interpreter at registration, so it need not exist in the chroot.
        update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 ||
            sed -n '/^:qemu-aarch64:/p' /usr/lib/binfmt.d/qemu-aarch64.conf >"$BINFMT/register" ||
            fail "could not register qemu-aarch64 with binfmt_misc"
        info "registered qemu-aarch64 with binfmt_misc"
    fi
    [ -e "$entry" ] || fail "qemu-aarch64 is not registered in $BINFMT after update-binfmts"
    if [ "$(head -n1 "$entry")" != enabled ]; then
        echo 1 >"$entry" || fail "cannot enable $entry"
    fi
    flags=$(sed -n 's/^flags: //p' "$entry")
    case $flags in
        *F*) ;;
        *) fail "qemu-aarch64 is registered in $BINFMT without the F flag (flags: '$flags'), so the chroot would need its own copy of the emulator. Re-register it: echo -1 > $entry && update-binfmts --enable qemu-aarch64" ;;
    esac
    info "binfmt: qemu-aarch64 enabled, flags $flags, interpreter $(sed -n 's/^interpreter //p' "$entry")"
fi

if [ ! -x "$HOST_VENV/bin/edgehmoe" ] || [ ! -x "$HOST_VENV/bin/edgehmoe-server" ]; then
    fail "no host venv with edgehmoe at $HOST_VENV: run 'make setup' (or set EDGEHMOE_HOST_VENV)"
fi
HOST_PY=$HOST_VENV/bin/python

# ------------------------------------------------------------------------------------------
# Work folder, logs, cleanup
# ------------------------------------------------------------------------------------------
mkdir -p -- "$CACHE"
WORK=$(mktemp -d /var/tmp/edgehmoe-pi.XXXXXX)
ROOT=$WORK/root
HOST=$WORK/host
LOGS=$CACHE/last-run
rm -rf -- "$LOGS"
mkdir -p -- "$ROOT" "$HOST" "$LOGS"
SUMMARY=$LOGS/summary.txt
: >"$SUMMARY"
PIDS=()        # background processes we started (broker, client, the running step)
T_START=$(date +%s)

# kill_tree PID: stop PID and everything it started (children first), by process id; the
# emulated processes of the chroot are ordinary children on the host.
kill_tree() {
    local child
    for child in $(pgrep -P "$1" 2>/dev/null); do kill_tree "$child"; done
    kill -TERM "$1" 2>/dev/null || true
}

mounts_under() { findmnt -rn -o TARGET | awk -v p="$1/" 'index($0, p) == 1' | sort -r; }

cleanup() {
    local rc=$? pid m
    set +e
    for pid in "${PIDS[@]}"; do kill_tree "$pid"; done
    for pid in "${PIDS[@]}"; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -KILL "$pid" 2>/dev/null
    done
    for m in $(mounts_under "$ROOT"); do umount -l "$m" 2>/dev/null; done
    if [ -n "$(mounts_under "$ROOT")" ]; then
        printf '%s: warning: mounts remain under %s; not deleting it\n' "$PROG" "$ROOT" >&2
    elif [ "$KEEP" = 1 ]; then
        info "kept $WORK"
    else
        rm -rf --one-file-system -- "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

note() { printf '%s\n' "$*" >>"$SUMMARY"; info "$*"; }

# run_step NAME CMD...: run CMD with its output in $LOGS/NAME.log; on failure show the log's end.
# CMD runs in the background and is waited for, so a signal to this script is handled at once.
run_step() {
    local name=$1 t0 rc=0 pid
    shift
    t0=$(date +%s)
    "$@" <&0 >"$LOGS/$name.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait "$pid" || rc=$?
    unset 'PIDS[-1]'
    STEP_SECONDS=$(($(date +%s) - t0))
    if [ "$rc" != 0 ]; then
        printf '%s: step %s failed (exit %s) after %s s; end of %s:\n' "$PROG" "$name" "$rc" "$STEP_SECONDS" "$LOGS/$name.log" >&2
        tail -n 40 "$LOGS/$name.log" | sed 's/^/    /' >&2
        exit 1
    fi
}

# The chroot gets a clean environment: nothing of the host's pip or Python settings leaks in.
CHROOT_ENV=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
            QEMU_CPU="$CPU" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_DEFAULT_TIMEOUT=120)
IN_ROOT=(chroot "$ROOT" /usr/bin/env -i "${CHROOT_ENV[@]}")
in_root() { "${IN_ROOT[@]}" "$@"; }
# Peak resident memory of a command (the emulator included: qemu-user runs in the same process).
timed() { local out=$1; shift; /usr/bin/time -f '%M %e' -o "$out" "$@"; }
peak_mb() { awk '{ printf "%d", $1 / 1024 }' "$1"; }

note "host: $(uname -m), $(nproc) cores, $(sed -n 's/^PRETTY_NAME=//p' /etc/os-release | tr -d '"'), qemu-user-static $(dpkg-query -W -f='${Version}' qemu-user-static); emulated CPU: $CPU; mode: $([ "$EDGE_ONLY" = 1 ] && echo edge-only || echo full)"

# ------------------------------------------------------------------------------------------
# 1. The arm64 root filesystem (cached tarball)
# ------------------------------------------------------------------------------------------
key=$(printf '%s|%s|%s|%s|%s' "$SUITE" "$INCLUDE" "$MIRROR" "$RECIPE" minbase | sha256sum | cut -c1-12)
TARBALL=$CACHE/$SUITE-arm64-$key.tar.zst

build_rootfs() {
    local tmp=$CACHE/build-$key
    rm -rf --one-file-system -- "$tmp"
    debootstrap --arch=arm64 --variant=minbase --include="$INCLUDE" "$SUITE" "$tmp" "$MIRROR"
    # Like Raspberry Pi OS: the release, its updates and the security archive.
    printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
        "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SUITE" >"$tmp/etc/apt/sources.list"
    rm -f -- "$tmp"/var/cache/apt/archives/*.deb
    tar --numeric-owner -C "$tmp" -I 'zstd -T0 -3' -cf "$TARBALL.tmp" .
    mv -f -- "$TARBALL.tmp" "$TARBALL"
    rm -rf --one-file-system -- "$tmp"
}

exec 9>"$CACHE/.lock"
flock 9   # one build at a time per cache
if [ "$REBUILD" = 1 ] || [ ! -s "$TARBALL" ]; then
    info "building the $SUITE arm64 rootfs with debootstrap (once; minutes under emulation)"
    run_step rootfs-build build_rootfs
    note "rootfs: built with debootstrap in $STEP_SECONDS s (cold), tarball $(du -m "$TARBALL" | cut -f1) MB: $TARBALL"
else
    note "rootfs: cached $TARBALL ($(du -m "$TARBALL" | cut -f1) MB)"
fi
flock -u 9
run_step rootfs-extract tar --numeric-owner -C "$ROOT" -I zstd -xf "$TARBALL"
note "rootfs: extracted in $STEP_SECONDS s, $(du -smx "$ROOT" | cut -f1) MB"

# /proc and /dev for pip, apt and Python. Not /sys: with the host's /sys, cpuinfo (inside
# onnxruntime and torch) finds CPUs there, then parses the host's x86 /proc/cpuinfo (qemu-user
# 7.2 does not emulate it for aarch64) and onnxruntime 1.32 segfaults at import. Without /sys
# cpuinfo gives up cleanly ("cpuinfo_initialize failed") and the CPU features come from the
# auxiliary vector, which qemu does set from the emulated CPU.
mount -t proc proc "$ROOT/proc"
mount --rbind /dev "$ROOT/dev"
mount --make-rslave "$ROOT/dev"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
# Trust what the host trusts: its network may re-sign TLS with a local CA (a proxy). Added to
# the bundle directly (update-ca-certificates takes minutes under emulation) and kept in
# /usr/local/share/ca-certificates, so a later update-ca-certificates in there keeps them.
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
    cat /usr/local/share/ca-certificates/*.crt >>"$ROOT/etc/ssl/certs/ca-certificates.crt"
    note "trust: added the host's local CA certificates ($(find /usr/local/share/ca-certificates -name '*.crt' | wc -l))"
fi
arch=$(in_root dpkg --print-architecture)
machine=$(in_root uname -m)
if [ "$arch" != arm64 ] || [ "$machine" != aarch64 ]; then fail "the userland is $arch/$machine, expected arm64/aarch64"; fi
note "userland: $(sed -n 's/^PRETTY_NAME=//p' "$ROOT/etc/os-release" | tr -d '"'), dpkg arch $arch, uname -m $machine, $(in_root python3 --version)"

# ------------------------------------------------------------------------------------------
# 2. On the host: the device wheel (built now, from the tree as it is), a tiny model, a bundle,
#    images and the x86 predictions
# ------------------------------------------------------------------------------------------
mkdir -p "$HOST/wheels" "$HOST/check"
run_step wheel "$HOST_PY" -m pip wheel -q --no-deps "$SRC" -w "$HOST/wheels"
WHEEL=$(find "$HOST/wheels" -maxdepth 1 -name 'edgehmoe-*.whl' -printf '%f\n' | head -n1)
[ -n "$WHEEL" ] || fail "pip wheel wrote no edgehmoe wheel into $HOST/wheels"
mkdir -p "$ROOT/srv/edgehmoe/wheels"
cp "$HOST/wheels/$WHEEL" "$ROOT/srv/edgehmoe/wheels/"
note "wheel: $WHEEL built from $SRC in $STEP_SECONDS s"

cd "$HOST/check"
run_step host-fit "$HOST_VENV/bin/edgehmoe" fit --dataset "$DATASET" --model both --epochs 4 --out "$HOST/fit" --force
run_step host-export "$HOST_VENV/bin/edgehmoe" export --model-dir "$HOST/fit" --out bundle --overwrite
run_step host-images "$HOST_VENV/bin/edgehmoe" partition --dataset "$DATASET" --split test --num-devices 1 --out images --force
# Two of the images as PNG files too, so the userland's Pillow decodes them.
run_step host-png "$HOST_PY" -c '
import sys, numpy as np
from PIL import Image
x = np.load("images/device_000.npz", allow_pickle=False)["x"]
for i in (0, 1):
    Image.fromarray(x[i]).save(f"images/img{i}.png")
'
PREDICT_CASES=("hmoe|" "beam2|--beam 2" "flat|--model flat")
for case in "${PREDICT_CASES[@]}"; do
    name=${case%%|*}
    read -r -a extra <<<"${case#*|}"
    run_step "host-predict-$name" sh -c '"$@" >"pred-'"$name"'.x86_64.json"' sh \
        "$HOST_VENV/bin/edgehmoe" predict --bundle bundle images/device_000.npz images/img0.png images/img1.png --json "${extra[@]}"
done
cp -r "$HOST/check" "$ROOT/srv/check"
note "host: tiny model, bundle ($(du -sk bundle | cut -f1) KB) and x86_64 predictions for $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' pred-hmoe.x86_64.json) images"

# ------------------------------------------------------------------------------------------
# 4.-5. Full check: install_client.sh as on a Pi, then a federated run against the host
# ------------------------------------------------------------------------------------------
if [ "$EDGE_ONLY" = 0 ]; then
    B=$HOST/broker
    mkdir -p "$B"
    chmod 700 "$B"
    port=$("$HOST_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    run_step broker-config "$HOST_VENV/bin/edgehmoe-server" broker-config --out-dir "$B/conf"
    # The server's account: plain "user:password" hashed in place by mosquitto_passwd -U, so the
    # password is never on a command line; the device's with `edgehmoe-server credentials add`.
    server_pw=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
    printf '%s' "$server_pw" >"$B/server.password"
    printf 'edgehmoe-server:%s\n' "$server_pw" >"$B/passwd"
    run_step broker-passwd mosquitto_passwd -U "$B/passwd"
    run_step credentials "$HOST_VENV/bin/edgehmoe-server" credentials add --password-file "$B/passwd" \
        --device-id "$DEVICE_ID" --out-dir "$B/creds"
    cat >"$B/mosquitto.conf" <<EOF
# Written by tools/pi_userland.sh: the edgehmoe ACL on a loopback port, for one check run.
per_listener_settings false
listener $port 127.0.0.1
allow_anonymous false
password_file $B/passwd
acl_file $B/conf/acl
persistence false
max_packet_size 67174400
log_dest file $B/mosquitto.log
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
user root
EOF
    mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
    "$mosquitto_bin" -c "$B/mosquitto.conf" >"$LOGS/mosquitto.stdout" 2>&1 &
    PIDS+=("$!")
    for _ in $(seq 50); do
        if "$HOST_PY" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' "$port" 2>/dev/null; then break; fi
        sleep 0.2
    done
    "$HOST_PY" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' "$port" 2>/dev/null ||
        fail "mosquitto did not start on 127.0.0.1:$port (see $LOGS/mosquitto.stdout and $B/mosquitto.log)"
    note "broker: mosquitto on 127.0.0.1:$port (host)"

    # The device's files, as flash_sd.sh would put them on the card.
    run_step device-shard "$HOST_VENV/bin/edgehmoe" partition --dataset "$DATASET" --num-devices 1 --out "$HOST/shards" --force
    cp "$HOST/shards/device_000.npz" "$ROOT/srv/edgehmoe/shard.npz"
    cp "$B/creds/$DEVICE_ID.password" "$ROOT/srv/edgehmoe/mqtt-password"
    cp "$REPO/firmware_scripts/install_client.sh" "$ROOT/srv/edgehmoe/install_client.sh"
    install_args=(--no-enable --broker "mqtt://127.0.0.1:$port" --device-id "$DEVICE_ID"
                  --data /srv/edgehmoe/shard.npz --password-file /srv/edgehmoe/mqtt-password
                  --memory-budget-mb 1024 --pip-spec "/srv/edgehmoe/wheels/${WHEEL}[edge,train]")
    info "running install_client.sh in the userland (apt, venv, pip edgehmoe[edge,train] with torch: several minutes)"
    run_step install-client timed "$LOGS/install-client.time" "${IN_ROOT[@]}" bash /srv/edgehmoe/install_client.sh "${install_args[@]}"
    note "install_client.sh --no-enable: $STEP_SECONDS s under emulation; peak RSS $(peak_mb "$LOGS/install-client.time") MB (pip and the smoke test, emulator included)"
    grep -q -- '--no-enable: skipped systemctl' "$LOGS/install-client.log" ||
        fail "install_client.sh did not say that --no-enable skipped systemctl (see $LOGS/install-client.log)"
    for f in /etc/systemd/system/edgehmoe-client.service /etc/edgehmoe/client.env /etc/edgehmoe/constraints.txt \
             /opt/edgehmoe/bin/edgehmoe-run /opt/edgehmoe/venv/bin/edgehmoe-client /var/lib/edgehmoe/data/shard.npz; do
        [ -e "$ROOT$f" ] || fail "install_client.sh did not create $f"
    done
    if [ -e "$ROOT/etc/systemd/system/multi-user.target.wants/edgehmoe-client.service" ]; then
        fail "--no-enable still enabled edgehmoe-client.service"
    fi
    in_root getent passwd edgehmoe >/dev/null || fail "install_client.sh did not create the edgehmoe account"
    run_step install-client-again in_root bash /srv/edgehmoe/install_client.sh "${install_args[@]}"
    grep -q 'done: 0 changed' "$LOGS/install-client-again.log" ||
        fail "a second install_client.sh run changed something (see $LOGS/install-client-again.log)"
    note "install_client.sh again: 0 changed ($STEP_SECONDS s)"
    in_root /opt/edgehmoe/venv/bin/python -m pip list --format=freeze >"$LOGS/venv-train.freeze" 2>/dev/null
    note "aarch64 wheels (train venv): $(grep -iE '^(numpy|onnxruntime|torch|torchvision|onnx|paho-mqtt|psutil|pillow|safetensors)==' "$LOGS/venv-train.freeze" | sort -f | tr '\n' ' ')"
    note "disk: /opt/edgehmoe/venv $(in_root du -sm /opt/edgehmoe/venv | cut -f1) MB; rootfs now $(du -smx "$ROOT" | cut -f1) MB"
    run_step import-torch timed "$LOGS/import-torch.time" "${IN_ROOT[@]}" /opt/edgehmoe/venv/bin/python -c \
        'import torch, onnxruntime, numpy; print("torch", torch.__version__, "onnxruntime", onnxruntime.__version__, "numpy", numpy.__version__)'
    note "import torch, onnxruntime, numpy: $(tail -n1 "$LOGS/import-torch.log"); $STEP_SECONDS s, peak RSS $(peak_mb "$LOGS/import-torch.time") MB (emulator included)"

    # The server on the host.
    run=$HOST/run
    cat >"$HOST/run.toml" <<EOF
# Written by tools/pi_userland.sh: one emulated device, a few rounds on a small synthetic set.
[run]
name = "edgehmoe"
out = "$run"
dataset = "$DATASET"

[broker]
url = "mqtt://127.0.0.1:$port"
username = "edgehmoe-server"
password_file = "$B/server.password"

[schedule]
mode = "paper"
rounds = $ROUNDS
min_devices = 1
round_timeout_s = 1800.0
wait_for_devices_s = 900.0

[train]
batch_size = 16

[eval]
every = $ROUNDS
EOF
    # The client as edgehmoe-client.service starts it: user edgehmoe, settings from client.env
    # (read as that user, so its permissions are checked too), through edgehmoe-run.
    client_cmd='set -a; . /etc/edgehmoe/client.env; set +a; exec /opt/edgehmoe/bin/edgehmoe-run'
    timed "$LOGS/client.time" chroot "$ROOT" /usr/bin/env -i "${CHROOT_ENV[@]}" HOME=/var/lib/edgehmoe \
        PYTHONUNBUFFERED=1 MPLCONFIGDIR=/tmp EDGEHMOE_STATE_DIR=/var/lib/edgehmoe/state \
        setpriv --reuid=edgehmoe --regid=edgehmoe --init-groups -- sh -c "$client_cmd" >"$LOGS/client.log" 2>&1 &
    client_pid=$!
    PIDS+=("$client_pid")
    info "federated run: $ROUNDS rounds, the emulated client against edgehmoe-server run on the host"
    run_step server timeout 3600 "$HOST_VENV/bin/edgehmoe-server" run --config "$HOST/run.toml"
    fed_seconds=$STEP_SECONDS
    kill -0 "$client_pid" 2>/dev/null || fail "the client exited during the run (see $LOGS/client.log)"
    # $client_pid is /usr/bin/time; its child is the client (chroot, env, setpriv, sh and
    # edgehmoe-run all exec), which SIGTERM stops as systemctl stop would.
    # Only the client: /usr/bin/time must live to write its measurement.
    for child in $(pgrep -P "$client_pid"); do kill_tree "$child"; done
    wait "$client_pid" 2>/dev/null || true
    run_step federation-check "$HOST_PY" - "$run" "$ROUNDS" "$DEVICE_ID" <<'EOF'
import json, sys
from pathlib import Path
run, rounds, device = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
state = json.loads((run / "state.json").read_text())
assert [r["round"] for r in rows] == list(range(rounds)), [r["round"] for r in rows]
assert state["round"] == rounds, state["round"]
mem = []
for r in rows:
    per = [d for d in r["per_device"] if d["device"] == device]
    assert r["devices_answered"] == 1 and per and per[0]["num_examples"] > 0, r
    mem.append((r["round"], r.get("updated"), per[0]["round_time_ms"], per[0]["round_mem_mb"], per[0]["peak_rss_mb"]))
for rnd, upd, t, m, p in mem:
    print(f"round {rnd}: experts {upd}, round_time {t / 1000:.1f} s, round_mem {m:.0f} MB, peak_rss {p:.0f} MB")
f1 = [r["val_info_f1"] for r in rows if "val_info_f1" in r]
print("val_info_f1", f1[-1] if f1 else "n/a")
EOF
    note "federation: $ROUNDS rounds completed in $fed_seconds s (under emulation); device $DEVICE_ID per round:"
    sed 's/^/    /' "$LOGS/federation-check.log" | tee -a "$SUMMARY"
    note "client process: peak RSS $(peak_mb "$LOGS/client.time") MB (emulator included)"
fi

# ------------------------------------------------------------------------------------------
# 2.-3. The edge venv (edgehmoe[edge] only, no torch) and predict equality with x86_64
# ------------------------------------------------------------------------------------------
EDGE=/opt/edgehmoe-edge/venv
if ! in_root dpkg-query -W -f="\${db:Status-Abbrev}" python3-venv 2>/dev/null | grep -q '^ii'; then
    run_step apt-venv in_root sh -c 'DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv'
    note "apt python3-venv (what install_client.sh does first): $STEP_SECONDS s"
fi
run_step edge-venv in_root python3 -m venv "$EDGE"
run_step edge-pip timed "$LOGS/edge-pip.time" "${IN_ROOT[@]}" "$EDGE/bin/python" -m pip install --no-cache-dir --only-binary=:all: \
    "/srv/edgehmoe/wheels/${WHEEL}[edge]"
note "pip install edgehmoe[edge] (wheels only): $STEP_SECONDS s under emulation, peak RSS $(peak_mb "$LOGS/edge-pip.time") MB"
in_root "$EDGE/bin/python" -m pip list --format=freeze >"$LOGS/venv-edge.freeze" 2>/dev/null
note "aarch64 wheels (edge venv): $(grep -iE '^(numpy|onnxruntime|paho-mqtt|psutil|pillow|safetensors|protobuf|flatbuffers)==' "$LOGS/venv-edge.freeze" | sort -f | tr '\n' ' ')"
note "disk: $EDGE $(in_root du -sm "$EDGE" | cut -f1) MB"
if grep -qiE '^(torch|torchvision)==' "$LOGS/venv-edge.freeze" ||
    in_root "$EDGE/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then
    fail "the edge venv has torch; edgehmoe[edge] must not pull it in"
fi
note "edge venv: no torch (checked: not installed, not importable)"

for case in "${PREDICT_CASES[@]}"; do
    name=${case%%|*}
    read -r -a extra <<<"${case#*|}"
    run_step "predict-$name" timed "$LOGS/predict-$name.time" chroot "$ROOT" /usr/bin/env -i "${CHROOT_ENV[@]}" sh -c \
        'cd /srv/check && exec "$@" >"pred-'"$name"'.aarch64.json"' sh \
        "$EDGE/bin/edgehmoe" predict --bundle bundle images/device_000.npz images/img0.png images/img1.png --json "${extra[@]}"
    cp "$ROOT/srv/check/pred-$name.aarch64.json" "$HOST/check/"
    run_step "compare-$name" "$HOST_PY" - "$HOST/check/pred-$name.x86_64.json" "$HOST/check/pred-$name.aarch64.json" <<'EOF'
# Same predictions: every label, node, path and input equal; probabilities to 1e-6 (the two
# onnxruntime builds use different kernels, so the last bits may differ).
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
worst = 0.0
def same(x, y, where):
    global worst
    if isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), f"{where}: keys {sorted(x)} != {sorted(y)}"
        for k in x:
            same(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, list):
        assert isinstance(y, list) and len(x) == len(y), f"{where}: lengths differ"
        for i, (u, v) in enumerate(zip(x, y)):
            same(u, v, f"{where}[{i}]")
    elif isinstance(x, float) and isinstance(y, float):
        worst = max(worst, abs(x - y))
        assert abs(x - y) <= 1e-6, f"{where}: {x} != {y}"
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"
same(a, b, "predictions")
print(f"{len(a)} predictions equal; max |probability difference| {worst:.2e}")
EOF
    note "predict --json ${extra[*]:-(greedy)}: $(tail -n1 "$LOGS/compare-$name.log") (aarch64 run: $(awk '{print $2}' "$LOGS/predict-$name.time") s, peak RSS $(peak_mb "$LOGS/predict-$name.time") MB, emulated)"
done

note "all checks passed in $(($(date +%s) - T_START)) s; logs and this summary: $LOGS"
