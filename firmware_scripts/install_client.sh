#!/usr/bin/env bash
# install_client.sh — install (or update) the edgehmoe client on a Raspberry Pi running 64-bit
# Raspberry Pi OS, as a systemd service. Runs at first boot from the SD card
# (edgehmoe-firstboot.service, written by flash_sd.sh) or by hand over SSH.
#
# What it sets up (paths under --root, default /):
#   /etc/edgehmoe/client.env                   EDGEHMOE_* settings (EnvironmentFile of the unit)
#   /etc/edgehmoe/mqtt-password, ca.crt        broker credentials (root:edgehmoe 0640 / 0644)
#   /etc/edgehmoe/client.crt, client.key       client certificate for a broker that requires one
#                                              (0644 / root:edgehmoe 0640)
#   /etc/edgehmoe/constraints.txt              pip constraints: versions that crash on a Pi 4
#   /var/lib/edgehmoe/data/shard.npz           the device's data shard (edgehmoe 0640)
#   /opt/edgehmoe/venv                         venv with edgehmoe[edge,train] from aarch64 wheels
#   /opt/edgehmoe/bin/edgehmoe-run             turns client.env into edgehmoe-client arguments
#   /etc/systemd/system/edgehmoe-client.service
#   /usr/local/sbin/edgehmoe-install-client    a copy of this script, for updates
# Idempotent: a file is only replaced when its content or mode differs, pip only runs when the
# requested packages or constraints changed (or with --upgrade), and the service is only
# restarted when something it reads changed. A second run prints "0 changed" and touches nothing.
#
# Test hooks (environment; used by tests/test_firmware.py):
#   EDGEHMOE_ARCH=arm64|armhf|...   instead of asking dpkg for the userland architecture
#   EDGEHMOE_PROC_MEMINFO=FILE      instead of /proc/meminfo (for --memory-budget-mb auto)
set -euo pipefail

PROG=${0##*/}
SELF=$(readlink -f -- "${BASH_SOURCE[0]}")

VENV=/opt/edgehmoe/venv
RUNNER=/opt/edgehmoe/bin/edgehmoe-run
ETC=/etc/edgehmoe
STATE=/var/lib/edgehmoe
UNIT_NAME=edgehmoe-client.service
SERVICE_USER=edgehmoe
DEFAULT_PIP_SPEC='edgehmoe[edge,train]'
# What the process needs on top of the training budget: the interpreter with torch, onnxruntime
# and numpy imported (about 300 MiB resident on aarch64) plus slack. The budget itself is what
# one round of training may use (round_mem_mb, see DESIGN); MemoryMax caps the sum.
MEMORY_OVERHEAD_MB=384
APT_PACKAGES=(python3 python3-venv ca-certificates)

usage() {
    cat <<EOF
Usage: $PROG [--from-boot DIR] [--broker URL] [--device-id ID] [--data SHARD.npz]
       [--memory-budget-mb N|auto] [--username U --password-file F] [--cafile F]
       [--certfile F --keyfile F]
       [--pip-spec SPEC] [--upgrade] [--root DIR] [--no-install] [--no-enable] [--dry-run]

Install or update the edgehmoe client service on this Raspberry Pi (64-bit OS only). Run as root.
Settings come from, in increasing priority: the existing /etc/edgehmoe/client.env, the
provisioning directory given by --from-boot (what flash_sd.sh wrote to the card), the options.

  --from-boot DIR        take client.env, shard.npz, mqtt-password, ca.crt, client.crt and
                         client.key from DIR (used at first boot with DIR=/boot/firmware/edgehmoe);
                         on success the password, private key and shard are removed from DIR and
                         DIR/installed is written
  --broker URL           mqtt://HOST:PORT or mqtts://HOST:PORT
  --device-id ID         this device's id
  --data FILE            data shard (.npz), copied to $STATE/data/shard.npz
  --memory-budget-mb N   training memory budget in MiB, or "auto" (half the RAM)
  --username U           broker user name (default: the device id when a password is given)
  --password-file F      file holding the broker password, copied to $ETC/mqtt-password
  --cafile F             CA certificate (PEM) for mqtts://, copied to $ETC/ca.crt
  --certfile F           client certificate (PEM) for an mqtts:// broker that requires one
                         (require_certificate), copied to $ETC/client.crt
  --keyfile F            its private key (PEM), copied to $ETC/client.key (root:edgehmoe 0640)
  --pip-spec SPEC        what to pip install (default: $DEFAULT_PIP_SPEC; may be a wheel path)
  --upgrade              upgrade the venv's packages to the newest allowed versions
  --root DIR             install into DIR instead of / (image building, tests); no apt, pip,
                         systemctl or account changes are made there
  --no-install           write configuration and unit only; skip apt, pip and systemctl
  --no-enable            do everything (apt, pip, account, files, unit) except what needs a
                         booted systemd: no daemon-reload, enable or (re)start of the unit.
                         For a chroot or container with no systemd running (tools/pi_userland.sh)
  --dry-run              print what would change; change nothing
  -h, --help             this help
EOF
}

info() { printf '%s: %s\n' "$PROG" "$*"; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage_error() { printf '%s: error: %s\n(run %s --help for usage)\n' "$PROG" "$*" "$PROG" >&2; exit 2; }
need_value() { if [ "$#" -lt 2 ] || [ -z "$2" ]; then usage_error "option $1 needs a value"; fi; }

# ------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------
ROOT=/ FROM_BOOT="" OPT_BROKER="" OPT_DEVICE_ID="" OPT_DATA="" OPT_BUDGET="" OPT_USERNAME=""
OPT_PASSWORD_FILE="" OPT_CAFILE="" OPT_CERTFILE="" OPT_KEYFILE="" PIP_SPEC=$DEFAULT_PIP_SPEC UPGRADE=0 NO_INSTALL=0 NO_ENABLE=0 DRY_RUN=0
while [ "$#" -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --from-boot) need_value "$@"; FROM_BOOT=$2; shift 2 ;;
        --broker) need_value "$@"; OPT_BROKER=$2; shift 2 ;;
        --device-id) need_value "$@"; OPT_DEVICE_ID=$2; shift 2 ;;
        --data) need_value "$@"; OPT_DATA=$2; shift 2 ;;
        --memory-budget-mb) need_value "$@"; OPT_BUDGET=$2; shift 2 ;;
        --username) need_value "$@"; OPT_USERNAME=$2; shift 2 ;;
        --password-file) need_value "$@"; OPT_PASSWORD_FILE=$2; shift 2 ;;
        --password) usage_error "--password is not accepted (it would show up in ps and shell history); use --password-file" ;;
        --cafile) need_value "$@"; OPT_CAFILE=$2; shift 2 ;;
        --certfile) need_value "$@"; OPT_CERTFILE=$2; shift 2 ;;
        --keyfile) need_value "$@"; OPT_KEYFILE=$2; shift 2 ;;
        --pip-spec) need_value "$@"; PIP_SPEC=$2; shift 2 ;;
        --upgrade) UPGRADE=1; shift ;;
        --root) need_value "$@"; ROOT=$2; shift 2 ;;
        --no-install) NO_INSTALL=1; shift ;;
        --no-enable) NO_ENABLE=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done

[ -d "$ROOT" ] || usage_error "--root '$ROOT' is not a directory"
ROOT=$(cd -- "$ROOT" && pwd)
R=${ROOT%/}                      # prefix for every path we touch ("" on a real system)
REAL_SYSTEM=0
if [ -z "$R" ]; then REAL_SYSTEM=1; fi
if [ "$REAL_SYSTEM" = 1 ] && [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "run me as root (sudo $PROG ...), or use --root DIR / --dry-run"
fi
DO_SYSTEM=0                      # apt, pip, accounts, systemctl
if [ "$REAL_SYSTEM" = 1 ] && [ "$NO_INSTALL" = 0 ] && [ "$DRY_RUN" = 0 ]; then DO_SYSTEM=1; fi
CAN_CHOWN=0
if [ "$REAL_SYSTEM" = 1 ] && [ "$(id -u)" = 0 ]; then CAN_CHOWN=1; fi

# ------------------------------------------------------------------------------------------
# 64-bit check: the wheels we install (torch, onnxruntime) exist for aarch64 only. What matters
# is the userland: 32-bit Raspberry Pi OS can boot a 64-bit kernel on a Pi 4, so uname can lie.
# ------------------------------------------------------------------------------------------
if [ -n "${EDGEHMOE_ARCH:-}" ]; then
    ARCH=$EDGEHMOE_ARCH
elif command -v dpkg >/dev/null 2>&1; then
    ARCH=$(dpkg --print-architecture)
else
    ARCH=$(uname -m)
fi
case $ARCH in
    arm64|aarch64) ;;
    *) die "this system's userland is '$ARCH', not 64-bit ARM (arm64): edgehmoe needs the 64-bit Raspberry Pi OS (Raspberry Pi OS Lite (64-bit)) on a Pi 3/4/5. Reflash with flash_sd.sh and a 64-bit image." ;;
esac

# ------------------------------------------------------------------------------------------
# Settings: existing client.env < --from-boot DIR/client.env < options
# ------------------------------------------------------------------------------------------
KEYS=(EDGEHMOE_BROKER EDGEHMOE_DEVICE_ID EDGEHMOE_MEMORY_BUDGET_MB EDGEHMOE_DATA
      EDGEHMOE_USERNAME EDGEHMOE_PASSWORD_FILE EDGEHMOE_CAFILE EDGEHMOE_CERTFILE EDGEHMOE_KEYFILE)
declare -A CFG=()

load_env() {  # load_env FILE: KEY=VALUE lines; unknown keys are an error
    local file=$1 line key value n=0
    while IFS= read -r line || [ -n "$line" ]; do
        n=$((n + 1))
        line=${line%$'\r'}
        case $line in ''|'#'*) continue ;; esac
        [[ $line =~ ^([A-Z_][A-Z0-9_]*)=(.*)$ ]] || die "$file:$n: expected KEY=VALUE, got '$line'"
        key=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]}
        if [[ $value =~ ^\"(.*)\"$ ]] || [[ $value =~ ^\'(.*)\'$ ]]; then value=${BASH_REMATCH[1]}; fi
        printf '%s\n' "${KEYS[@]}" | grep -qxF -- "$key" ||
            die "$file:$n: unknown key '$key'; valid keys: ${KEYS[*]}"
        CFG[$key]=$value
    done <"$file"
}

if [ -f "$R$ETC/client.env" ]; then load_env "$R$ETC/client.env"; fi
if [ -n "$FROM_BOOT" ]; then
    [ -d "$FROM_BOOT" ] || usage_error "--from-boot '$FROM_BOOT' is not a directory"
    [ -f "$FROM_BOOT/client.env" ] || die "'$FROM_BOOT' holds no client.env; was the card written by flash_sd.sh?"
    load_env "$FROM_BOOT/client.env"
fi
if [ -n "$OPT_BROKER" ]; then CFG[EDGEHMOE_BROKER]=$OPT_BROKER; fi
if [ -n "$OPT_DEVICE_ID" ]; then CFG[EDGEHMOE_DEVICE_ID]=$OPT_DEVICE_ID; fi
if [ -n "$OPT_BUDGET" ]; then CFG[EDGEHMOE_MEMORY_BUDGET_MB]=$OPT_BUDGET; fi
if [ -n "$OPT_USERNAME" ]; then CFG[EDGEHMOE_USERNAME]=$OPT_USERNAME; fi

# Files: where each comes from (option, or the provisioning dir) and where it goes.
readable() { if [ ! -f "$2" ] || [ ! -r "$2" ]; then usage_error "$1 '$2' is missing or not readable"; fi; }
SRC_DATA="" SRC_PASSWORD="" SRC_CA="" SRC_CERT="" SRC_KEY=""
if [ -n "$OPT_DATA" ]; then readable "data shard" "$OPT_DATA"; SRC_DATA=$OPT_DATA
elif [ -n "$FROM_BOOT" ] && [ -f "$FROM_BOOT/shard.npz" ]; then SRC_DATA=$FROM_BOOT/shard.npz; fi
if [ -n "$OPT_PASSWORD_FILE" ]; then readable "password file" "$OPT_PASSWORD_FILE"; SRC_PASSWORD=$OPT_PASSWORD_FILE
elif [ -n "$FROM_BOOT" ] && [ -f "$FROM_BOOT/mqtt-password" ]; then SRC_PASSWORD=$FROM_BOOT/mqtt-password; fi
if [ -n "$OPT_CAFILE" ]; then readable "CA file" "$OPT_CAFILE"; SRC_CA=$OPT_CAFILE
elif [ -n "$FROM_BOOT" ] && [ -f "$FROM_BOOT/ca.crt" ]; then SRC_CA=$FROM_BOOT/ca.crt; fi
if [ -n "$OPT_CERTFILE$OPT_KEYFILE" ]; then
    if [ -z "$OPT_CERTFILE" ] || [ -z "$OPT_KEYFILE" ]; then
        usage_error "give --certfile and --keyfile together (the client certificate and its private key)"
    fi
    readable "certificate file" "$OPT_CERTFILE"; readable "key file" "$OPT_KEYFILE"
    SRC_CERT=$OPT_CERTFILE SRC_KEY=$OPT_KEYFILE
elif [ -n "$FROM_BOOT" ] && [ -f "$FROM_BOOT/client.crt" ]; then
    [ -f "$FROM_BOOT/client.key" ] || die "'$FROM_BOOT' holds client.crt but no client.key; provision the card again with --certfile and --keyfile"
    SRC_CERT=$FROM_BOOT/client.crt SRC_KEY=$FROM_BOOT/client.key
fi

if [ -n "$SRC_DATA" ]; then
    [ "$(head -c 4 -- "$SRC_DATA" | od -An -tx1 | tr -d ' \n')" = 504b0304 ] ||
        usage_error "data shard '$SRC_DATA' is not an .npz (zip) archive"
fi
if [ -n "$SRC_CA" ]; then
    grep -q -- '-----BEGIN CERTIFICATE-----' "$SRC_CA" || usage_error "CA file '$SRC_CA' holds no PEM certificate"
fi
if [ -n "$SRC_PASSWORD" ]; then
    [ -s "$SRC_PASSWORD" ] || usage_error "password file '$SRC_PASSWORD' is empty"
fi
if [ -n "$SRC_CERT" ]; then
    grep -q -- '-----BEGIN CERTIFICATE-----' "$SRC_CERT" ||
        usage_error "certificate file '$SRC_CERT' holds no PEM certificate"
    grep -q -- 'PRIVATE KEY-----' "$SRC_KEY" || usage_error "key file '$SRC_KEY' holds no PEM private key"
fi

# Installed files live at fixed paths, whatever the source was called.
CFG[EDGEHMOE_DATA]=$STATE/data/shard.npz
if [ -n "$SRC_PASSWORD" ] || [ -f "$R$ETC/mqtt-password" ]; then
    CFG[EDGEHMOE_PASSWORD_FILE]=$ETC/mqtt-password
    if [ -z "${CFG[EDGEHMOE_USERNAME]:-}" ]; then CFG[EDGEHMOE_USERNAME]=${CFG[EDGEHMOE_DEVICE_ID]:-}; fi
else
    CFG[EDGEHMOE_PASSWORD_FILE]=""
fi
if [ -n "$SRC_CA" ] || [ -f "$R$ETC/ca.crt" ]; then CFG[EDGEHMOE_CAFILE]=$ETC/ca.crt; else CFG[EDGEHMOE_CAFILE]=""; fi
if [ -n "$SRC_CERT" ] || [ -f "$R$ETC/client.crt" ]; then
    CFG[EDGEHMOE_CERTFILE]=$ETC/client.crt CFG[EDGEHMOE_KEYFILE]=$ETC/client.key
else
    CFG[EDGEHMOE_CERTFILE]="" CFG[EDGEHMOE_KEYFILE]=""
fi

# Validate the merged settings.
BROKER=${CFG[EDGEHMOE_BROKER]:-}
DEVICE_ID=${CFG[EDGEHMOE_DEVICE_ID]:-}
[ -n "$BROKER" ] || usage_error "no broker: pass --broker mqtt://HOST:PORT (or --from-boot DIR)"
[ -n "$DEVICE_ID" ] || usage_error "no device id: pass --device-id ID (or --from-boot DIR)"
host_re='([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])'
[[ $BROKER =~ ^mqtts?://${host_re}(:[0-9]{1,5})?$ ]] ||
    usage_error "bad broker URL '$BROKER': expected mqtt://HOST:PORT or mqtts://HOST:PORT"
if [ -n "${CFG[EDGEHMOE_CERTFILE]}" ] && [[ $BROKER != mqtts://* ]]; then
    usage_error "a client certificate needs TLS: the broker URL '$BROKER' must be mqtts://"
fi
[[ $DEVICE_ID =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] ||
    usage_error "bad device id '$DEVICE_ID': use 1-64 letters, digits, '.', '_' or '-'"
if [ -n "${CFG[EDGEHMOE_USERNAME]:-}" ]; then
    [[ ${CFG[EDGEHMOE_USERNAME]} =~ ^[A-Za-z0-9_.@-]{1,64}$ ]] ||
        usage_error "bad broker username '${CFG[EDGEHMOE_USERNAME]}'"
fi

BUDGET=${CFG[EDGEHMOE_MEMORY_BUDGET_MB]:-auto}
if [ "$BUDGET" = auto ]; then
    MEMINFO=${EDGEHMOE_PROC_MEMINFO:-/proc/meminfo}
    mem_kb=$(awk '$1 == "MemTotal:" { print $2 }' "$MEMINFO" 2>/dev/null || true)
    [ -n "$mem_kb" ] || die "cannot read MemTotal from $MEMINFO to size the memory budget; pass --memory-budget-mb N"
    BUDGET=$((mem_kb / 1024 / 2))
    info "memory budget: auto -> $BUDGET MiB (half of $((mem_kb / 1024)) MiB RAM)"
fi
if ! [[ $BUDGET =~ ^[0-9]{1,6}$ ]] || [ "$BUDGET" -lt 64 ] || [ "$BUDGET" -gt 65536 ]; then
    usage_error "bad memory budget '$BUDGET': a whole number of MiB between 64 and 65536, or auto"
fi
CFG[EDGEHMOE_MEMORY_BUDGET_MB]=$BUDGET
MEMORY_MAX_MB=$((BUDGET + MEMORY_OVERHEAD_MB))

if [ -z "$SRC_DATA" ] && [ ! -f "$R$STATE/data/shard.npz" ]; then
    info "warning: no data shard yet; the client will not start until one is installed (--data FILE)"
fi

# ------------------------------------------------------------------------------------------
# File helpers (compare, then replace atomically; count what changed)
# ------------------------------------------------------------------------------------------
CHANGED=0
SERVICE_INPUTS_CHANGED=0
TMP=$(mktemp -d "${TMPDIR:-/tmp}/edgehmoe-install.XXXXXX")   # mode 0700
trap 'rm -rf -- "$TMP"' EXIT
# Everything installed must be readable by the service account (the venv in particular);
# files that must not be are given their mode explicitly.
umask 022

owner_ids() {  # owner_ids USER GROUP -> "uid:gid" ("" when ownership is not managed here)
    if [ "$CAN_CHOWN" = 1 ] && getent passwd "$1" >/dev/null 2>&1; then
        printf '%s:%s\n' "$(id -u "$1")" "$(getent group "$2" | cut -d: -f3)"
    fi
}

# put_file SRC DEST MODE USER GROUP [service]: install SRC as $R/DEST if content, mode or owner differ.
put_file() {
    local src=$1 dest=$R$2 mode=$3 own cur_mode cur_own
    own=$(owner_ids "$4" "$5")
    if [ -f "$dest" ] && cmp -s -- "$src" "$dest"; then
        cur_mode=$(stat -c %a -- "$dest")
        cur_own=$(stat -c %u:%g -- "$dest")
        if [ "$cur_mode" = "${mode#0}" ] && { [ -z "$own" ] || [ "$cur_own" = "$own" ]; }; then
            return 0
        fi
    fi
    CHANGED=$((CHANGED + 1))
    if [ "${6:-}" = service ]; then SERVICE_INPUTS_CHANGED=1; fi
    if [ "$DRY_RUN" = 1 ]; then info "would write $2 (mode $mode)"; return 0; fi
    mkdir -p -- "$(dirname -- "$dest")"
    local tmp
    tmp=$(mktemp "$(dirname -- "$dest")/.${dest##*/}.XXXXXX")
    cat -- "$src" >"$tmp"
    chmod "$mode" "$tmp"
    if [ -n "$own" ]; then chown "$own" "$tmp"; fi
    mv -f -- "$tmp" "$dest"
    info "wrote $2"
}

# put_dir DIR MODE USER GROUP
put_dir() {
    local dir=$R$1 mode=$2 own
    own=$(owner_ids "$3" "$4")
    if [ -d "$dir" ] && [ "$(stat -c %a -- "$dir")" = "${mode#0}" ] &&
        { [ -z "$own" ] || [ "$(stat -c %u:%g -- "$dir")" = "$own" ]; }; then
        return 0
    fi
    CHANGED=$((CHANGED + 1))
    if [ "$DRY_RUN" = 1 ]; then info "would create $1/ (mode $mode)"; return 0; fi
    mkdir -p -- "$dir"
    chmod "$mode" "$dir"
    if [ -n "$own" ]; then chown "$own" "$dir"; fi
}

# ------------------------------------------------------------------------------------------
# Packages (apt) and the service account
# ------------------------------------------------------------------------------------------
if [ "$DO_SYSTEM" = 1 ]; then
    missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        info "installing apt packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${missing[@]}"
        CHANGED=$((CHANGED + 1))
    fi
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' ||
        die "python3 is older than 3.9; edgehmoe needs Raspberry Pi OS Bookworm or later"
fi

sysusers=$TMP/sysusers.conf
printf '# edgehmoe client service account (written by install_client.sh)\nu %s - "edgehmoe client" %s /usr/sbin/nologin\n' \
    "$SERVICE_USER" "$STATE" >"$sysusers"
put_file "$sysusers" /etc/sysusers.d/edgehmoe.conf 0644 root root
if [ "$CAN_CHOWN" = 1 ] && [ "$DRY_RUN" = 0 ] && ! getent passwd "$SERVICE_USER" >/dev/null; then
    if command -v systemd-sysusers >/dev/null; then
        systemd-sysusers /etc/sysusers.d/edgehmoe.conf
    else
        useradd --system --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
    fi
    info "created system user $SERVICE_USER"
    CHANGED=$((CHANGED + 1))
elif [ "$REAL_SYSTEM" = 0 ]; then
    info "note: --root: account '$SERVICE_USER' and file ownership are left to the target system"
fi

# ------------------------------------------------------------------------------------------
# Configuration, credentials, data
# ------------------------------------------------------------------------------------------
put_dir "$ETC" 0755 root root
put_dir "$STATE" 0750 "$SERVICE_USER" "$SERVICE_USER"
put_dir "$STATE/data" 0750 "$SERVICE_USER" "$SERVICE_USER"

env_file=$TMP/client.env
{
    printf '# edgehmoe client settings, read by %s (EnvironmentFile=).\n' "$UNIT_NAME"
    printf '# Written by install_client.sh; after editing run: sudo systemctl restart %s\n' "$UNIT_NAME"
    for k in "${KEYS[@]}"; do
        if [ -n "${CFG[$k]:-}" ]; then printf '%s=%s\n' "$k" "${CFG[$k]}"; fi
    done
} >"$env_file"
put_file "$env_file" "$ETC/client.env" 0640 root "$SERVICE_USER" service
if [ -n "$SRC_PASSWORD" ]; then put_file "$SRC_PASSWORD" "$ETC/mqtt-password" 0640 root "$SERVICE_USER" service; fi
if [ -n "$SRC_CA" ]; then put_file "$SRC_CA" "$ETC/ca.crt" 0644 root root service; fi
if [ -n "$SRC_CERT" ]; then
    put_file "$SRC_CERT" "$ETC/client.crt" 0644 root root service
    put_file "$SRC_KEY" "$ETC/client.key" 0640 root "$SERVICE_USER" service
fi
if [ -n "$SRC_DATA" ]; then put_file "$SRC_DATA" "$STATE/data/shard.npz" 0640 "$SERVICE_USER" "$SERVICE_USER" service; fi

# Versions with known crashes on the Raspberry Pi 4 (Cortex-A72 is ARMv8.0-A: no LSE atomics,
# no SVE). Sources are in docs/pi.md; `import torch, onnxruntime` is smoke-tested below anyway.
constraints=$TMP/constraints.txt
cat >"$constraints" <<'EOF'
# edgehmoe: versions that crash on Raspberry Pi 4 (Cortex-A72, ARMv8.0-A). See docs/pi.md.
# onnxruntime 1.21.0: SIGILL at import (microsoft/onnxruntime#23957, #24112); 1.20.x works and
#   1.22.0 carries the fix (#23978). 1.21.1 is excluded too: we could not confirm it has the fix.
onnxruntime!=1.21.*
# torch 2.1.0: segfault in Conv2d forward on a Pi 4 (pytorch/pytorch#120374, #110819).
# torch 2.4.0: SIGILL at import, LSE atomics in the bundled Arm Compute Library (#132032); fixed in 2.4.1.
# torch 2.6.*: SIGILL in torch.jit / torch.onnx.export, built with -march=armv8.2-a+sve (#146792, #146803);
#   fixed for 2.7.0 by #148070.
# torch 2.10.*: SIGILL at import, LSE atomics in the mimalloc inside libc10.so (#174344, #176993);
#   fixed in 2.11.0 by #174401.
# torch >= 2.10: PyPI's aarch64 wheels of 2.11.0 and 2.14.1 (2.12, 2.13 not checked) are CUDA builds
#   that pull in CUDA 13 (nvidia-cublas alone is 543 MB, plus cuDNN, cuda-bindings, ...): gigabytes a
#   Pi cannot use. 2.9.1 is a CPU build (tools/pi_userland.sh). Drop the ceiling once PyPI has a CPU
#   aarch64 build of a newer release again.
torch!=2.1.0,!=2.4.0,!=2.6.*,!=2.10.*,<2.10
EOF
put_file "$constraints" "$ETC/constraints.txt" 0644 root root

runner=$TMP/edgehmoe-run
cat >"$runner" <<EOF
#!/bin/sh
# Start edgehmoe-client with the settings systemd loaded from $ETC/client.env.
# Written by install_client.sh. EDGEHMOE_CLIENT_BIN overrides the client (tests).
set -eu
: "\${EDGEHMOE_BROKER:?is not set in $ETC/client.env}"
: "\${EDGEHMOE_DEVICE_ID:?is not set in $ETC/client.env}"
: "\${EDGEHMOE_DATA:?is not set in $ETC/client.env}"
: "\${EDGEHMOE_MEMORY_BUDGET_MB:?is not set in $ETC/client.env}"
if [ ! -r "\$EDGEHMOE_DATA" ]; then
    echo "edgehmoe-run: data shard \$EDGEHMOE_DATA is missing; install one with: sudo edgehmoe-install-client --data FILE" >&2
    exit 78  # EX_CONFIG
fi
set -- --broker "\$EDGEHMOE_BROKER" --device-id "\$EDGEHMOE_DEVICE_ID" \\
    --data "\$EDGEHMOE_DATA" --memory-budget-mb "\$EDGEHMOE_MEMORY_BUDGET_MB"
if [ -n "\${EDGEHMOE_USERNAME:-}" ]; then set -- "\$@" --username "\$EDGEHMOE_USERNAME"; fi
if [ -n "\${EDGEHMOE_PASSWORD_FILE:-}" ]; then set -- "\$@" --password-file "\$EDGEHMOE_PASSWORD_FILE"; fi
if [ -n "\${EDGEHMOE_CAFILE:-}" ]; then set -- "\$@" --cafile "\$EDGEHMOE_CAFILE"; fi
if [ -n "\${EDGEHMOE_CERTFILE:-}" ]; then set -- "\$@" --certfile "\$EDGEHMOE_CERTFILE" --keyfile "\$EDGEHMOE_KEYFILE"; fi
exec "\${EDGEHMOE_CLIENT_BIN:-$VENV/bin/edgehmoe-client}" "\$@"
EOF
put_dir /opt/edgehmoe 0755 root root
put_dir /opt/edgehmoe/bin 0755 root root
put_file "$runner" "$RUNNER" 0755 root root service

unit=$TMP/$UNIT_NAME
cat >"$unit" <<EOF
# edgehmoe federated learning client. Written by install_client.sh, which rewrites it on every
# install or update: put local changes in a drop-in (sudo systemctl edit $UNIT_NAME).
[Unit]
Description=edgehmoe federated learning client
Wants=network-online.target
After=network-online.target time-sync.target
StartLimitIntervalSec=10min
StartLimitBurst=5

[Service]
Type=exec
User=$SERVICE_USER
Group=$SERVICE_USER
EnvironmentFile=$ETC/client.env
Environment=PYTHONUNBUFFERED=1 HOME=$STATE MPLCONFIGDIR=/var/cache/edgehmoe
ExecStart=$RUNNER
WorkingDirectory=$STATE
StateDirectory=edgehmoe
StateDirectoryMode=0750
CacheDirectory=edgehmoe
Restart=on-failure
RestartSec=15s
# Exit 78 (EX_CONFIG): no data shard; retrying will not help.
RestartPreventExitStatus=78
# Training budget ($BUDGET MiB) + interpreter and libraries ($MEMORY_OVERHEAD_MB MiB). Enforced only
# when the kernel has the memory cgroup: cmdline.txt needs cgroup_enable=memory on Raspberry Pi OS.
MemoryMax=${MEMORY_MAX_MB}M
StandardOutput=journal
StandardError=journal
SyslogIdentifier=edgehmoe-client
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
LockPersonality=yes
ProtectHostname=yes
ProtectClock=yes
ProtectKernelLogs=yes
CapabilityBoundingSet=
SystemCallArchitectures=native
UMask=0027

[Install]
WantedBy=multi-user.target
EOF
put_file "$unit" "/etc/systemd/system/$UNIT_NAME" 0644 root root service
UNIT_CHANGED=$SERVICE_INPUTS_CHANGED

put_file "$SELF" /usr/local/sbin/edgehmoe-install-client 0755 root root

# MemoryMax needs the memory cgroup, which Raspberry Pi kernels leave disabled unless cmdline.txt
# says cgroup_enable=memory (raspberrypi/linux#6980). flash_sd.sh adds it; do the same here.
for cmdline in "$R/boot/firmware/cmdline.txt" "$R/boot/cmdline.txt"; do
    [ -f "$cmdline" ] || continue
    if ! grep -qw 'cgroup_enable=memory' "$cmdline"; then
        CHANGED=$((CHANGED + 1))
        if [ "$DRY_RUN" = 1 ]; then
            info "would add cgroup_enable=memory to ${cmdline#"$R"}"
        else
            # Rewritten in place: it lives on the FAT partition, where chmod and rename-over fail.
            printf '%s cgroup_enable=memory\n' "$(tr -d '\n' <"$cmdline")" >"$TMP/cmdline.txt"
            cat -- "$TMP/cmdline.txt" >"$cmdline"
            info "added cgroup_enable=memory to ${cmdline#"$R"}: reboot once for MemoryMax to be enforced"
        fi
    fi
    break
done

# ------------------------------------------------------------------------------------------
# The venv (pip, aarch64 wheels only) and the service
# ------------------------------------------------------------------------------------------
if [ "$DO_SYSTEM" = 1 ]; then
    if [ ! -x "$VENV/bin/python" ]; then
        info "creating venv $VENV"
        python3 -m venv "$VENV"
        CHANGED=$((CHANGED + 1))
    fi
    want="$PIP_SPEC $(sha256sum "$ETC/constraints.txt" | cut -c1-16)"
    stamp=$VENV/.edgehmoe-installed
    if [ "$UPGRADE" = 1 ] || [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
        info "installing $PIP_SPEC (wheels only; this takes a while on a Pi)"
        pip_args=(install --no-cache-dir --only-binary=:all: --constraint "$ETC/constraints.txt")
        if [ "$UPGRADE" = 1 ]; then pip_args+=(--upgrade --upgrade-strategy eager); fi
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 "$VENV/bin/python" -m pip "${pip_args[@]}" "$PIP_SPEC" ||
            die "pip could not install $PIP_SPEC; see the messages above (network? disk space: $(df -h --output=avail / | tail -1 | tr -d ' ') free)"
        rm -f "$stamp"
        CHANGED=$((CHANGED + 1))
        SERVICE_INPUTS_CHANGED=1
    fi
    if [ ! -f "$stamp" ]; then
        # A wheel built for a newer CPU dies with SIGILL (exit 132) right here, not mid-round.
        rc=0
        "$VENV/bin/python" -c 'import numpy, onnxruntime, torch; torch.nn.Conv2d(3, 4, 3)(torch.zeros(1, 3, 8, 8)).sum().item()' || rc=$?
        if [ "$rc" = 132 ]; then
            die "importing torch/onnxruntime died with SIGILL: the installed wheels use instructions this CPU lacks. Add the version to $ETC/constraints.txt (see docs/pi.md) and re-run with --upgrade"
        elif [ "$rc" != 0 ]; then
            die "the installed packages fail to import (exit $rc); see the traceback above"
        fi
        printf '%s\n' "$want" >"$stamp"
        "$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | grep -iE '^(edgehmoe|torch|onnxruntime|numpy)==' | sed "s/^/$PROG: installed /" || true
    fi
    [ -x "$VENV/bin/edgehmoe-client" ] || die "$VENV/bin/edgehmoe-client is missing after pip install"

    if [ "$NO_ENABLE" = 1 ]; then
        info "--no-enable: skipped systemctl daemon-reload, enable and start of $UNIT_NAME (needs a booted systemd); the unit file is written"
    else
        if [ "$UNIT_CHANGED" = 1 ]; then systemctl daemon-reload; fi
        if ! systemctl -q is-enabled "$UNIT_NAME" 2>/dev/null; then
            systemctl enable "$UNIT_NAME"
            CHANGED=$((CHANGED + 1))
        fi
        if [ "$SERVICE_INPUTS_CHANGED" = 1 ]; then
            systemctl restart --no-block "$UNIT_NAME"
            info "(re)started $UNIT_NAME"
        elif ! systemctl -q is-active "$UNIT_NAME"; then
            systemctl start --no-block "$UNIT_NAME"
            info "started $UNIT_NAME"
        fi
    fi
elif [ "$NO_INSTALL" = 1 ] || [ "$REAL_SYSTEM" = 0 ]; then
    info "skipped apt, pip and systemctl (--no-install or --root)"
fi

# ------------------------------------------------------------------------------------------
# First boot: take the secrets off the FAT partition and stop edgehmoe-firstboot.service
# ------------------------------------------------------------------------------------------
if [ -n "$FROM_BOOT" ] && [ "$DRY_RUN" = 0 ] && { [ "$DO_SYSTEM" = 1 ] || [ "$REAL_SYSTEM" = 0 ]; }; then
    rm -f -- "$FROM_BOOT/mqtt-password" "$FROM_BOOT/client.key" "$FROM_BOOT/shard.npz"
    printf 'edgehmoe client installed; settings now live in %s/client.env\n' "$ETC" >"$FROM_BOOT/installed"
    if [ "$DO_SYSTEM" = 1 ] && [ "$NO_ENABLE" = 0 ]; then systemctl disable edgehmoe-firstboot.service 2>/dev/null || true; fi
fi

if [ "$DRY_RUN" = 1 ]; then
    info "dry run: $CHANGED change(s) would be made"
else
    info "done: $CHANGED changed"
fi
