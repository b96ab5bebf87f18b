#!/usr/bin/env bash
# flash_sd.sh — write a Raspberry Pi OS image to an SD card (or to an image file) and provision
# it so that the Pi joins the edgehmoe federation on its first boot, with no hand editing.
#
# What ends up on the card's FAT boot partition (mounted at /boot/firmware on the Pi):
#   edgehmoe/client.env                  EDGEHMOE_* settings for the client (broker, device id, ...)
#   edgehmoe/shard.npz                   the device's data shard (--data)
#   edgehmoe/mqtt-password, ca.crt       broker credentials (--credentials, --cafile)
#   edgehmoe/client.crt, client.key      client certificate for a broker that requires one
#                                        (--certfile, --keyfile; the key is deleted after install)
#   edgehmoe/install_client.sh           the installer, run on the Pi once the network is up
#   edgehmoe/firstboot.sh                installs + enables edgehmoe-firstboot.service
#   edgehmoe/edgehmoe-firstboot.service  oneshot unit: runs install_client.sh --from-boot, retried
#                                        until it succeeds
# plus the first-boot hook in the format the image expects (see --provisioning):
#   cloud-init   user-data (+ network-config for Wi-Fi): current Raspberry Pi OS Trixie images
#                ("init_format": "cloudinit-rpi"; NoCloud seed read from /boot/firmware)
#   firstrun     firstrun.sh + "systemd.run=..." appended to cmdline.txt: Bookworm images and the
#                first Trixie release ("init_format": "systemd"), the way Raspberry Pi Imager does it
# Sources: raspberrypi/rpi-imager doc/os_customisation_formats.md and src/customization_generator.cpp,
# RPi-Distro/pi-gen stage2/04-cloud-init/. cmdline.txt also gets cgroup_enable=memory, because
# Raspberry Pi kernels ship the memory cgroup disabled (raspberrypi/linux#6980) and the client's
# MemoryMax= would otherwise not be enforced.
#
# How the write works: the boot partition is copied out of the image into a private temp file,
# provisioned there with mtools (no mounting, no root, no loop devices), and the image is then
# streamed to the target in ONE pass with that partition substituted. A block device is opened
# once, so a desktop automounter cannot grab the card between "image written" and "provisioned";
# a regular-file target is written to a temp file beside it and renamed at the end.
#
# Every argument, file and safety check is validated before the target is opened: bad input ends
# with a message and a non-zero exit and the target untouched.
#
# Test hooks (environment; used by tests/test_firmware.py, they only point the safety checks at
# fake files and can never relax them):
#   EDGEHMOE_PROC_MOUNTS=FILE      instead of /proc/mounts
#   EDGEHMOE_PROC_SWAPS=FILE       instead of /proc/swaps
#   EDGEHMOE_SYS_BLOCK=DIR         instead of /sys/block
#   EDGEHMOE_FAKE_BLOCK_DEVICE=1   treat a regular-file TARGET as the block device named by its
#                                  basename, so every block-device check applies to it
set -euo pipefail

PROG=${0##*/}
# sfdisk lives in /usr/sbin, which a normal user's PATH lacks on Debian; it works on image files
# without root.
PATH=$PATH:/usr/sbin:/sbin
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
PI_BOOT=/boot/firmware          # where Raspberry Pi OS (Bookworm and later) mounts the FAT partition
PI_DIR=$PI_BOOT/edgehmoe        # our files on the Pi
CMDLINE_HOOK="systemd.run=$PI_BOOT/firstrun.sh systemd.run_success_action=reboot systemd.unit=kernel-command-line.target"

usage() {
    cat <<EOF
Usage: $PROG IMAGE TARGET --device-id ID --broker mqtt://HOST:PORT [options]

Write IMAGE (.img or .img.xz) to TARGET (an SD card such as /dev/sdb, or an image file) and
provision it as edgehmoe client ID. All data on TARGET is replaced.

Required:
  --device-id ID            device id (letters, digits, '.', '_', '-'; at most 64)
  --broker URL              mqtt://HOST[:PORT] or mqtts://HOST[:PORT]

Device:
  --data SHARD.npz          the device's data shard (copied to the card)
  --memory-budget-mb N      training memory budget in MiB (default: half the Pi's RAM)
  --credentials FILE        broker login: one line "USERNAME:PASSWORD", or just "PASSWORD"
                            (the username is then the device id)
  --cafile FILE             CA certificate (PEM) for an mqtts:// broker
  --certfile FILE           client certificate (PEM) for an mqtts:// broker that requires one
  --keyfile FILE            ... and its private key (PEM); removed from the card after install
  --hostname H              hostname (default: edgehmoe-ID)
  --admin-user NAME         login account to create (default: pi; password locked)
  --ssh-key FILE            public key allowed to log in as the admin user (enables SSH)
  --wifi-ssid S             Wi-Fi network to join ...
  --wifi-password-file F    ... with the passphrase read from F (never from the command line)
  --wifi-country CC         Wi-Fi regulatory domain, e.g. GB, DE, US

Image and target:
  --checksum SHA256         expected sha256 of IMAGE (default: read IMAGE.sha256 if present)
  --provisioning FORMAT     auto (default), cloud-init or firstrun; auto picks cloud-init when
                            the image's boot partition carries a cloud-init seed (user-data/meta-data)
  --force                   write to a block device that does not report itself removable
  --yes                     do not ask for confirmation before erasing a block device
  --dry-run                 validate everything and print the plan; write nothing
  -h, --help                this help

Exit status: 0 done, 1 failure (target untouched unless the write itself failed), 2 bad usage.
EOF
}

info() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage_error() { printf '%s: error: %s\n(run %s --help for usage)\n' "$PROG" "$*" "$PROG" >&2; exit 2; }
need_value() { if [ "$#" -lt 2 ] || [ -z "$2" ]; then usage_error "option $1 needs a value"; fi; }

# Quote a value for a POSIX shell script ('...' with embedded quotes escaped).
shq() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
# Quote a value as a YAML double-quoted scalar.
yq() { printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"; }

require_tools() {
    local t missing=()
    for t in "$@"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
    [ "${#missing[@]}" -eq 0 ] || die "missing tools: ${missing[*]} (Debian/Ubuntu: apt-get install mtools fdisk xz-utils coreutils python3)"
}

readable_file() {  # readable_file WHAT PATH
    [ -e "$2" ] || usage_error "$1 '$2' does not exist"
    [ -f "$2" ] || usage_error "$1 '$2' is not a regular file"
    [ -r "$2" ] || usage_error "$1 '$2' is not readable (check its permissions)"
}

# ------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------
IMAGE="" TARGET="" DEVICE_ID="" BROKER="" DATA="" BUDGET="" CREDENTIALS="" CAFILE="" CERTFILE="" KEYFILE=""
HOSTNAME_NEW="" ADMIN_USER=pi SSH_KEY="" WIFI_SSID="" WIFI_PASSWORD_FILE="" WIFI_COUNTRY=""
CHECKSUM="" PROVISIONING=auto FORCE=0 ASSUME_YES=0 DRY_RUN=0
positional=()
while [ "$#" -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --device-id) need_value "$@"; DEVICE_ID=$2; shift 2 ;;
        --broker) need_value "$@"; BROKER=$2; shift 2 ;;
        --data) need_value "$@"; DATA=$2; shift 2 ;;
        --memory-budget-mb) need_value "$@"; BUDGET=$2; shift 2 ;;
        --credentials) need_value "$@"; CREDENTIALS=$2; shift 2 ;;
        --cafile) need_value "$@"; CAFILE=$2; shift 2 ;;
        --certfile) need_value "$@"; CERTFILE=$2; shift 2 ;;
        --keyfile) need_value "$@"; KEYFILE=$2; shift 2 ;;
        --hostname) need_value "$@"; HOSTNAME_NEW=$2; shift 2 ;;
        --admin-user) need_value "$@"; ADMIN_USER=$2; shift 2 ;;
        --ssh-key) need_value "$@"; SSH_KEY=$2; shift 2 ;;
        --wifi-ssid) need_value "$@"; WIFI_SSID=$2; shift 2 ;;
        --wifi-password-file) need_value "$@"; WIFI_PASSWORD_FILE=$2; shift 2 ;;
        --wifi-password) usage_error "--wifi-password is not accepted: secrets on the command line leak into shell history and ps; use --wifi-password-file" ;;
        --password) usage_error "--password is not accepted: put the broker login in a file and pass --credentials FILE" ;;
        --wifi-country) need_value "$@"; WIFI_COUNTRY=$2; shift 2 ;;
        --checksum) need_value "$@"; CHECKSUM=$2; shift 2 ;;
        --provisioning) need_value "$@"; PROVISIONING=$2; shift 2 ;;
        --force) FORCE=1; shift ;;
        --yes) ASSUME_YES=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --) shift; positional+=("$@"); break ;;
        -*) usage_error "unknown option '$1'" ;;
        *) positional+=("$1"); shift ;;
    esac
done
[ "${#positional[@]}" -eq 2 ] || usage_error "expected IMAGE and TARGET, got ${#positional[@]} positional argument(s)"
IMAGE=${positional[0]}
TARGET=${positional[1]}

# ------------------------------------------------------------------------------------------
# Validation (nothing is written before all of this has passed)
# ------------------------------------------------------------------------------------------
[ -n "$DEVICE_ID" ] || usage_error "--device-id is required"
[ -n "$BROKER" ] || usage_error "--broker is required"
[[ $DEVICE_ID =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] ||
    usage_error "bad device id '$DEVICE_ID': use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit (it becomes part of MQTT topics)"

host_re='([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])'
if [[ $BROKER =~ ^(mqtts?)://${host_re}(:([0-9]{1,5}))?$ ]]; then
    port=${BASH_REMATCH[7]}
    if [ -n "$port" ] && { [ "$((10#$port))" -lt 1 ] || [ "$((10#$port))" -gt 65535 ]; }; then
        usage_error "bad broker URL '$BROKER': port $port is outside 1-65535"
    fi
else
    usage_error "bad broker URL '$BROKER': expected mqtt://HOST:PORT or mqtts://HOST:PORT (e.g. mqtt://192.168.1.10:1883)"
fi

if [ -n "$BUDGET" ]; then
    if ! [[ $BUDGET =~ ^[0-9]{1,6}$ ]] || [ "$BUDGET" -lt 64 ] || [ "$BUDGET" -gt 65536 ]; then
        usage_error "bad --memory-budget-mb '$BUDGET': give a whole number of MiB between 64 and 65536"
    fi
fi

if [ -z "$HOSTNAME_NEW" ]; then
    HOSTNAME_NEW=$(printf 'edgehmoe-%s' "$DEVICE_ID" | tr '[:upper:]' '[:lower:]' | sed 's/[_.]/-/g' | cut -c1-63 | sed 's/-*$//')
fi
[[ $HOSTNAME_NEW =~ ^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$ ]] ||
    usage_error "bad hostname '$HOSTNAME_NEW': use 1-63 letters, digits or '-', not starting or ending with '-'"
[[ $ADMIN_USER =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] ||
    usage_error "bad --admin-user '$ADMIN_USER': lower-case letters, digits, '_' or '-', at most 32"

case $PROVISIONING in auto|cloud-init|firstrun) ;; *)
    usage_error "bad --provisioning '$PROVISIONING': choose auto, cloud-init or firstrun" ;;
esac

readable_file image "$IMAGE"
case $IMAGE in
    *.img.xz) IMAGE_KIND=xz ;;
    *.img) IMAGE_KIND=raw ;;
    *.zip) usage_error "zip images are not supported: unzip '$IMAGE' and pass the .img" ;;
    *) usage_error "image '$IMAGE' must end in .img or .img.xz" ;;
esac

if [ -n "$CHECKSUM" ]; then
    [[ $CHECKSUM =~ ^[0-9A-Fa-f]{64}$ ]] || usage_error "bad --checksum: expected 64 hex digits (a sha256)"
    CHECKSUM_FROM="--checksum"
elif [ -f "$IMAGE.sha256" ]; then
    CHECKSUM=$(awk 'NF { print $1; exit }' "$IMAGE.sha256")
    [[ $CHECKSUM =~ ^[0-9A-Fa-f]{64}$ ]] || usage_error "'$IMAGE.sha256' does not start with a sha256 (64 hex digits)"
    CHECKSUM_FROM="$IMAGE.sha256"
fi
CHECKSUM=$(printf '%s' "$CHECKSUM" | tr '[:upper:]' '[:lower:]')

if [ -n "$DATA" ]; then
    readable_file "data shard" "$DATA"
    case $DATA in *.npz) ;; *) usage_error "data shard '$DATA' must be an .npz file" ;; esac
    [ "$(head -c 4 -- "$DATA" | od -An -tx1 | tr -d ' \n')" = 504b0304 ] ||
        usage_error "data shard '$DATA' is not an .npz (zip) archive"
fi

MQTT_USERNAME="" MQTT_PASSWORD=""
if [ -n "$CREDENTIALS" ]; then
    readable_file credentials "$CREDENTIALS"
    cred_line=$(head -n 1 -- "$CREDENTIALS" | tr -d '\r')
    [ -n "$cred_line" ] || usage_error "credentials file '$CREDENTIALS' is empty: expected USERNAME:PASSWORD or PASSWORD on its first line"
    if [[ $cred_line == *:* ]]; then
        MQTT_USERNAME=${cred_line%%:*}
        MQTT_PASSWORD=${cred_line#*:}
    else
        MQTT_USERNAME=$DEVICE_ID
        MQTT_PASSWORD=$cred_line
    fi
    [[ $MQTT_USERNAME =~ ^[A-Za-z0-9_.@-]{1,64}$ ]] ||
        usage_error "bad username '$MQTT_USERNAME' in '$CREDENTIALS': use letters, digits, '.', '_', '@' or '-'"
    [ -n "$MQTT_PASSWORD" ] || usage_error "credentials file '$CREDENTIALS' has an empty password"
fi
if [ -n "$CAFILE" ]; then
    readable_file "CA file" "$CAFILE"
    grep -q -- '-----BEGIN CERTIFICATE-----' "$CAFILE" || usage_error "CA file '$CAFILE' holds no PEM certificate"
fi
if [ -n "$CERTFILE$KEYFILE" ]; then
    if [ -z "$CERTFILE" ] || [ -z "$KEYFILE" ]; then
        usage_error "give --certfile and --keyfile together (the client certificate and its private key)"
    fi
    [[ $BROKER == mqtts://* ]] || usage_error "a client certificate needs TLS: the broker URL '$BROKER' must be mqtts://"
    readable_file "certificate file" "$CERTFILE"
    readable_file "key file" "$KEYFILE"
    grep -q -- '-----BEGIN CERTIFICATE-----' "$CERTFILE" || usage_error "certificate file '$CERTFILE' holds no PEM certificate"
    grep -q -- 'PRIVATE KEY-----' "$KEYFILE" || usage_error "key file '$KEYFILE' holds no PEM private key"
fi

SSH_KEYS=""
if [ -n "$SSH_KEY" ]; then
    readable_file "ssh key" "$SSH_KEY"
    if grep -q 'PRIVATE KEY' "$SSH_KEY"; then
        usage_error "'$SSH_KEY' is a PRIVATE key; pass the public one (usually the same name + .pub)"
    fi
    key_re='^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com) [A-Za-z0-9+/]+={0,3}( .*)?$'
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%$'\r'}
        case $line in ''|'#'*) continue ;; esac
        [[ $line =~ $key_re ]] || usage_error "'$SSH_KEY' is not an OpenSSH public key file (line: '${line:0:40}...')"
        SSH_KEYS+="$line"$'\n'
    done <"$SSH_KEY"
    [ -n "$SSH_KEYS" ] || usage_error "ssh key file '$SSH_KEY' holds no key"
fi

WIFI_PSK=""
if [ -n "$WIFI_SSID$WIFI_PASSWORD_FILE" ]; then
    [ -n "$WIFI_SSID" ] || usage_error "--wifi-password-file needs --wifi-ssid"
    [ -n "$WIFI_PASSWORD_FILE" ] || usage_error "--wifi-ssid needs --wifi-password-file (open networks are not supported)"
    [ "$(printf '%s' "$WIFI_SSID" | wc -c)" -le 32 ] || usage_error "Wi-Fi SSID is longer than 32 bytes"
    readable_file "Wi-Fi password file" "$WIFI_PASSWORD_FILE"
    wifi_pass=$(head -n 1 -- "$WIFI_PASSWORD_FILE" | tr -d '\r')
    if [[ $wifi_pass =~ ^[0-9A-Fa-f]{64}$ ]]; then
        WIFI_PSK=$(printf '%s' "$wifi_pass" | tr '[:upper:]' '[:lower:]')
    else
        n=$(printf '%s' "$wifi_pass" | wc -c)
        if [ "$n" -lt 8 ] || [ "$n" -gt 63 ]; then
            usage_error "Wi-Fi passphrase in '$WIFI_PASSWORD_FILE' must be 8-63 characters (or a 64-hex-digit PSK)"
        fi
        require_tools python3
        # Store the WPA PSK (PBKDF2-SHA1(passphrase, ssid, 4096, 32)) as Raspberry Pi Imager does,
        # not the passphrase itself. The passphrase travels on stdin, never in argv.
        WIFI_PSK=$(printf '%s' "$wifi_pass" | python3 -c '
import hashlib, sys
print(hashlib.pbkdf2_hmac("sha1", sys.stdin.buffer.read(), sys.argv[1].encode(), 4096, 32).hex())' "$WIFI_SSID")
    fi
    unset wifi_pass
fi
if [ -n "$WIFI_COUNTRY" ]; then
    [[ $WIFI_COUNTRY =~ ^[A-Za-z]{2}$ ]] || usage_error "bad --wifi-country '$WIFI_COUNTRY': expected a two-letter ISO 3166 code such as GB"
    WIFI_COUNTRY=$(printf '%s' "$WIFI_COUNTRY" | tr '[:lower:]' '[:upper:]')
fi

[ -f "$SCRIPT_DIR/install_client.sh" ] || die "install_client.sh not found next to $PROG (in $SCRIPT_DIR)"

tools=(sfdisk mtype mcopy mdir mmd dd sha256sum od awk sed)
[ "$IMAGE_KIND" = xz ] && tools+=(xz)
require_tools "${tools[@]}"
export MTOOLS_SKIP_CHECK=1 MTOOLS_NO_VFAT=0 LC_ALL=C

# ------------------------------------------------------------------------------------------
# Target safety checks
# ------------------------------------------------------------------------------------------
PROC_MOUNTS=${EDGEHMOE_PROC_MOUNTS:-/proc/mounts}
PROC_SWAPS=${EDGEHMOE_PROC_SWAPS:-/proc/swaps}
SYS_BLOCK=${EDGEHMOE_SYS_BLOCK:-/sys/block}

# Kernel name of the whole disk holding block device NAME (a disk, partition or dm device).
disk_of() {
    local name=$1 d s
    [ -n "$name" ] || return 0   # root on overlay/zfs/...: no block device to compare with
    if [ -d "$SYS_BLOCK/$name" ]; then
        # A device-mapper/LVM/RAID device: follow its slaves down to a real disk.
        for s in "$SYS_BLOCK/$name"/slaves/*; do
            [ -e "$s" ] || continue
            disk_of "${s##*/}"
            return
        done
        printf '%s\n' "$name"
        return
    fi
    for d in "$SYS_BLOCK"/*/"$name"; do
        [ -e "$d" ] || continue
        d=${d%/*}
        printf '%s\n' "${d##*/}"
        return
    done
}

# Kernel name for a device path as written in /proc/mounts or /proc/swaps ("" if not a /dev path).
dev_name_of() {
    local p=$1
    case $p in /dev/*) ;; *) return 0 ;; esac
    p=$(readlink -m -- "$p")
    printf '%s\n' "${p##*/}"
}

# Decode the octal escapes (\040 for a space, ...) that /proc/mounts uses in paths.
unescape_mount() { printf '%b' "$1"; }

check_block_target() {
    local name=$1 part s parts=() holders=() root_src root_disk mounted=() swaps=() src mp rest
    [ -d "$SYS_BLOCK/$name" ] ||
        die "'$TARGET' ($name) is not a whole disk (it may be a partition): pass the disk itself, e.g. /dev/sdb rather than /dev/sdb1"
    for part in "$SYS_BLOCK/$name"/*/; do
        part=${part%/}
        [ -f "$part/partition" ] || continue
        parts+=("${part##*/}")
        for s in "$part"/holders/*; do [ -e "$s" ] && holders+=("${part##*/} -> ${s##*/}"); done
    done
    for s in "$SYS_BLOCK/$name"/holders/*; do [ -e "$s" ] && holders+=("$name -> ${s##*/}"); done

    # The system disk: the disk behind "/" (through device-mapper if need be).
    root_src=$(awk '$2 == "/" { src = $1 } END { print src }' "$PROC_MOUNTS")
    if [ -n "$root_src" ]; then
        root_disk=$(disk_of "$(dev_name_of "$root_src")")
        [ "$root_disk" != "$name" ] ||
            die "'$TARGET' is the system disk (it holds the root filesystem, $root_src); refusing to overwrite it"
    fi

    while read -r src mp rest; do
        local n; n=$(dev_name_of "$src")
        [ -n "$n" ] || continue
        if [ "$n" = "$name" ] || printf '%s\n' "${parts[@]}" | grep -qxF -- "$n"; then
            mounted+=("$src on $(unescape_mount "$mp")")
        fi
    done <"$PROC_MOUNTS"
    if [ "${#mounted[@]}" -gt 0 ]; then
        die "'$TARGET' is mounted (${mounted[*]}); unmount it first, e.g. 'udisksctl unmount -b ${mounted[0]%% on *}' or 'sudo umount ${mounted[0]%% on *}'"
    fi
    if [ -r "$PROC_SWAPS" ]; then
        while read -r src rest; do
            local n; n=$(dev_name_of "$src")
            [ -n "$n" ] || continue
            if [ "$n" = "$name" ] || printf '%s\n' "${parts[@]}" | grep -qxF -- "$n"; then swaps+=("$src"); fi
        done < <(tail -n +2 "$PROC_SWAPS")
        [ "${#swaps[@]}" -eq 0 ] || die "'$TARGET' is in use as swap (${swaps[*]}); run 'sudo swapoff ${swaps[0]}' first"
    fi
    [ "${#holders[@]}" -eq 0 ] ||
        die "'$TARGET' is in use by device-mapper/LVM/RAID (${holders[*]}); close those first"

    local removable sdtype
    removable=$(cat "$SYS_BLOCK/$name/removable" 2>/dev/null || echo 0)
    sdtype=$(cat "$SYS_BLOCK/$name/device/type" 2>/dev/null || true)
    if [ "$removable" != 1 ] && [ "$sdtype" != SD ]; then
        [ "$FORCE" = 1 ] ||
            die "'$TARGET' does not report itself as removable media ($SYS_BLOCK/$name/removable is $removable); if it really is your SD card (some USB readers hide this), re-run with --force"
        info "warning: '$TARGET' is not marked removable; continuing because of --force"
    fi

    local sectors
    sectors=$(cat "$SYS_BLOCK/$name/size" 2>/dev/null || echo 0)
    TARGET_BYTES=$((sectors * 512))
}

TARGET_KIND="" TARGET_BYTES=0
if [ "${EDGEHMOE_FAKE_BLOCK_DEVICE:-0}" = 1 ]; then
    [ -f "$TARGET" ] || die "EDGEHMOE_FAKE_BLOCK_DEVICE=1 needs TARGET to be an existing regular file"
    TARGET_KIND="block"
    check_block_target "$(basename -- "$TARGET")"
elif [ -b "$TARGET" ]; then
    TARGET_KIND="block"
    check_block_target "$(basename -- "$(readlink -f -- "$TARGET")")"
elif [ -f "$TARGET" ]; then
    TARGET_KIND="file"
elif [ ! -e "$TARGET" ] && [ -d "$(dirname -- "$TARGET")" ]; then
    TARGET_KIND="file"
elif [ -d "$TARGET" ]; then
    usage_error "target '$TARGET' is a directory; give a device (e.g. /dev/sdb) or an image file name"
else
    usage_error "target '$TARGET' is neither a block device nor a regular file"
fi
if [ "$TARGET_KIND" = file ] && [ -e "$TARGET" ] && [ "$(readlink -f -- "$TARGET")" = "$(readlink -f -- "$IMAGE")" ]; then
    usage_error "target and image are the same file"
fi
if [ "$TARGET_KIND" = block ] && [ ! -w "$TARGET" ]; then
    die "no permission to write '$TARGET'; run with sudo"
fi
if [ "$TARGET_KIND" = file ] && [ ! -w "$(dirname -- "$TARGET")" ]; then
    die "no permission to write in '$(dirname -- "$TARGET")'"
fi

# ------------------------------------------------------------------------------------------
# Image checks: checksum, size, partition table, boot partition
# ------------------------------------------------------------------------------------------
if [ -n "$CHECKSUM" ]; then
    info "verifying sha256 of $IMAGE (from $CHECKSUM_FROM)"
    actual=$(sha256sum -- "$IMAGE" | awk '{ print $1 }')
    [ "$actual" = "$CHECKSUM" ] ||
        die "checksum mismatch for '$IMAGE': expected $CHECKSUM, got $actual (download it again)"
else
    info "no checksum given (--checksum or $IMAGE.sha256): image integrity not verified"
fi

if [ "$IMAGE_KIND" = xz ]; then
    info "testing xz archive $IMAGE"
    xz -t -- "$IMAGE" 2>/dev/null || die "'$IMAGE' is not a valid .xz archive (truncated download?)"
    IMAGE_BYTES=$(xz --robot --list -- "$IMAGE" | awk -F'\t' '$1 == "totals" { print $5 }')
    image_stream() { xz -dc -- "$IMAGE"; }
else
    IMAGE_BYTES=$(stat -c %s -- "$IMAGE")
    image_stream() { cat -- "$IMAGE"; }
fi
[ "${IMAGE_BYTES:-0}" -gt 0 ] || die "could not determine the size of '$IMAGE'"
if [ "$TARGET_KIND" = block ] && [ "$TARGET_BYTES" -gt 0 ] && [ "$TARGET_BYTES" -lt "$IMAGE_BYTES" ]; then
    die "'$TARGET' holds $((TARGET_BYTES / 1048576)) MiB but the image needs $((IMAGE_BYTES / 1048576)) MiB"
fi

umask 077
WORK=$(mktemp -d "${TMPDIR:-/tmp}/edgehmoe-flash.XXXXXX")
PARTIAL=""
cleanup() {
    rm -rf -- "$WORK"
    if [ -n "$PARTIAL" ]; then rm -f -- "$PARTIAL"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The partition table lives in the first sectors; 4 MiB covers MBR and GPT.
image_stream 2>/dev/null | head -c 4194304 >"$WORK/head.bin" || true
sfdisk --dump "$WORK/head.bin" >"$WORK/ptable.txt" 2>/dev/null ||
    die "'$IMAGE' has no readable partition table; is it a Raspberry Pi OS image?"
SECTOR=$(awk -F': *' '$1 == "sector-size" { print $2 }' "$WORK/ptable.txt")
SECTOR=${SECTOR:-512}
# First FAT partition: MBR types 01/04/06/0b/0c/0e/ef, or the GPT basic-data/ESP type GUIDs.
read -r FAT_START FAT_SECTORS < <(awk '
    / : start=/ {
        start = ""; size = ""; type = ""
        n = split($0, f, ",")
        for (i = 1; i <= n; i++) {
            if (f[i] ~ /start=/) { sub(/.*start= */, "", f[i]); start = f[i] }
            else if (f[i] ~ /size=/) { sub(/.*size= */, "", f[i]); size = f[i] }
            else if (f[i] ~ /type=/) { sub(/.*type= */, "", f[i]); type = toupper(f[i]) }
        }
        if (type ~ /^(1|4|6|B|C|E|EF|EBD0A0A2-B9E5-4433-87C0-68B6B72699C7|C12A7328-F81F-11D2-BA4B-00A0C93EC93B)$/) {
            print start, size; exit
        }
    }' "$WORK/ptable.txt") || true
[ -n "${FAT_START:-}" ] || die "'$IMAGE' has no FAT boot partition; is it a Raspberry Pi OS image?"
FAT_OFFSET=$((FAT_START * SECTOR))
FAT_BYTES=$((FAT_SECTORS * SECTOR))
[ $((FAT_OFFSET + FAT_BYTES)) -le "$IMAGE_BYTES" ] || die "the boot partition of '$IMAGE' runs past the end of the image"

info "copying the boot partition out of the image ($((FAT_BYTES / 1048576)) MiB at offset $FAT_OFFSET)"
FAT="$WORK/boot.fat"
# (The rest of the stream is not needed: the producer stops on SIGPIPE, hence the "|| true";
# the size and mtools checks below catch a short read.)
image_stream 2>/dev/null | {
    dd bs=4M iflag=fullblock,count_bytes count="$FAT_OFFSET" of=/dev/null status=none
    dd bs=4M iflag=fullblock,count_bytes count="$FAT_BYTES" of="$FAT" status=none
} || true
[ "$(stat -c %s "$FAT")" = "$FAT_BYTES" ] || die "could not read the boot partition from '$IMAGE'"
mdir -i "$FAT" ::/ >/dev/null 2>&1 || die "the boot partition of '$IMAGE' is not a FAT file system mtools can read"
mtype -i "$FAT" ::/config.txt >/dev/null 2>&1 ||
    die "the boot partition of '$IMAGE' has no config.txt; this does not look like a Raspberry Pi OS image"

if [ "$PROVISIONING" = auto ]; then
    if mdir -i "$FAT" ::/user-data >/dev/null 2>&1 || mdir -i "$FAT" ::/meta-data >/dev/null 2>&1; then
        PROVISIONING=cloud-init
    else
        PROVISIONING=firstrun
    fi
    info "image provisioning format: $PROVISIONING (detected)"
fi
if [ "$PROVISIONING" = firstrun ] && ! mtype -i "$FAT" ::/cmdline.txt >/dev/null 2>&1; then
    die "the boot partition of '$IMAGE' has no cmdline.txt, which firstrun provisioning needs"
fi

# ------------------------------------------------------------------------------------------
# Provisioning files
# ------------------------------------------------------------------------------------------
STAGE="$WORK/stage"
mkdir -p "$STAGE/edgehmoe"

{
    printf '# edgehmoe client configuration for device %s, written by flash_sd.sh.\n' "$DEVICE_ID"
    printf '# install_client.sh copies it to /etc/edgehmoe/client.env on first boot; edit that copy later.\n'
    printf 'EDGEHMOE_BROKER=%s\n' "$BROKER"
    printf 'EDGEHMOE_DEVICE_ID=%s\n' "$DEVICE_ID"
    printf 'EDGEHMOE_MEMORY_BUDGET_MB=%s\n' "${BUDGET:-auto}"
    printf 'EDGEHMOE_DATA=/var/lib/edgehmoe/data/shard.npz\n'
    if [ -n "$MQTT_PASSWORD" ]; then
        printf 'EDGEHMOE_USERNAME=%s\n' "$MQTT_USERNAME"
        printf 'EDGEHMOE_PASSWORD_FILE=/etc/edgehmoe/mqtt-password\n'
    fi
    if [ -n "$CAFILE" ]; then printf 'EDGEHMOE_CAFILE=/etc/edgehmoe/ca.crt\n'; fi
    if [ -n "$CERTFILE" ]; then
        printf 'EDGEHMOE_CERTFILE=/etc/edgehmoe/client.crt\n'
        printf 'EDGEHMOE_KEYFILE=/etc/edgehmoe/client.key\n'
    fi
} >"$STAGE/edgehmoe/client.env"
if [ -n "$DATA" ]; then cp -- "$DATA" "$STAGE/edgehmoe/shard.npz"; fi
if [ -n "$MQTT_PASSWORD" ]; then printf '%s' "$MQTT_PASSWORD" >"$STAGE/edgehmoe/mqtt-password"; fi
if [ -n "$CAFILE" ]; then cp -- "$CAFILE" "$STAGE/edgehmoe/ca.crt"; fi
if [ -n "$CERTFILE" ]; then
    cp -- "$CERTFILE" "$STAGE/edgehmoe/client.crt"
    cp -- "$KEYFILE" "$STAGE/edgehmoe/client.key"
fi
cp -- "$SCRIPT_DIR/install_client.sh" "$STAGE/edgehmoe/install_client.sh"

cat >"$STAGE/edgehmoe/edgehmoe-firstboot.service" <<EOF
# Installed by $PI_DIR/firstboot.sh. Runs install_client.sh once the network is up and
# retries every 5 minutes until it succeeds; install_client.sh then writes $PI_DIR/installed.
[Unit]
Description=edgehmoe first-boot install of the federated learning client
Wants=network-online.target
After=network-online.target time-sync.target
ConditionPathExists=$PI_DIR/client.env
ConditionPathExists=!$PI_DIR/installed
StartLimitIntervalSec=0

[Service]
Type=oneshot
ExecStart=/bin/bash $PI_DIR/install_client.sh --from-boot $PI_DIR
Restart=on-failure
RestartSec=5min
TimeoutStartSec=3h

[Install]
WantedBy=multi-user.target
EOF

cat >"$STAGE/edgehmoe/firstboot.sh" <<EOF
#!/bin/sh
# edgehmoe first-boot hook, called by cloud-init (runcmd) or firstrun.sh.
# It only installs edgehmoe-firstboot.service: the real work (apt, pip, the client service)
# needs the network, which is not up yet when first-boot hooks run.
set -eu
install -m 0644 $PI_DIR/edgehmoe-firstboot.service /etc/systemd/system/edgehmoe-firstboot.service
systemctl daemon-reload || true
systemctl enable edgehmoe-firstboot.service
if [ "\${1:-}" = --start ]; then
    systemctl start --no-block edgehmoe-firstboot.service
fi
EOF

cat >"$STAGE/edgehmoe/README.txt" <<EOF
This card was provisioned by edgehmoe's flash_sd.sh for device $DEVICE_ID.
On first boot the Pi installs the edgehmoe client (see edgehmoe-firstboot.service) and moves
the credentials and data shard off this partition. Guide: docs/pi.md in the edgehmoe sources.
EOF

ADMIN_GROUPS=users,adm,dialout,audio,netdev,video,plugdev,cdrom,games,input,gpio,spi,i2c,render,sudo
if [ "$PROVISIONING" = cloud-init ]; then
    {
        printf '#cloud-config\n'
        printf '# Written by edgehmoe flash_sd.sh for device %s (cloud-init NoCloud seed, read from %s).\n' "$DEVICE_ID" "$PI_BOOT"
        printf 'hostname: %s\n' "$HOSTNAME_NEW"
        printf 'manage_etc_hosts: true\n'
        if [ -n "$SSH_KEYS" ]; then printf 'enable_ssh: true\n'; fi
        printf 'ssh_pwauth: false\n'
        printf 'users:\n'
        printf -- '- name: %s\n' "$ADMIN_USER"
        printf '  groups: %s\n' "$ADMIN_GROUPS"
        printf '  shell: /bin/bash\n'
        printf '  lock_passwd: true\n'
        printf '  sudo: ALL=(ALL) NOPASSWD:ALL\n'
        if [ -n "$SSH_KEYS" ]; then
            printf '  ssh_authorized_keys:\n'
            while IFS= read -r k; do [ -n "$k" ] && printf '    - %s\n' "$(yq "$k")"; done <<<"$SSH_KEYS"
        fi
        if [ -n "$WIFI_COUNTRY" ] && [ -z "$WIFI_SSID" ]; then
            printf 'runcmd:\n- [ rfkill, unblock, wifi ]\n'
            printf -- '- [ sh, %s/firstboot.sh, --start ]\n' "$PI_DIR"
        else
            printf 'runcmd:\n- [ sh, %s/firstboot.sh, --start ]\n' "$PI_DIR"
        fi
    } >"$STAGE/user-data"
    if [ -n "$WIFI_SSID" ]; then
        {
            printf '# Written by edgehmoe flash_sd.sh: netplan v2, applied by cloud-init on first boot.\n'
            printf 'network:\n  version: 2\n'
            printf '  ethernets:\n    eth0:\n      dhcp4: true\n      optional: true\n'
            printf '  wifis:\n    wlan0:\n      dhcp4: true\n      optional: true\n'
            if [ -n "$WIFI_COUNTRY" ]; then printf '      regulatory-domain: "%s"\n' "$WIFI_COUNTRY"; fi
            printf '      access-points:\n        %s:\n          password: "%s"\n' "$(yq "$WIFI_SSID")" "$WIFI_PSK"
        } >"$STAGE/network-config"
    fi
    if ! mdir -i "$FAT" ::/meta-data >/dev/null 2>&1; then
        printf 'dsmode: local\ninstance-id: edgehmoe-%s\n' "$DEVICE_ID" >"$STAGE/meta-data"
    fi
else
    {
        cat <<EOF
#!/bin/bash
# edgehmoe first-run script for device $DEVICE_ID, written by flash_sd.sh in Raspberry Pi Imager's
# "systemd" customisation format: cmdline.txt runs it once through systemd.run=, it removes itself
# and the Pi reboots. Wi-Fi and logins follow the Imager's firstrun.sh (imager_custom when present).
set +e

NEW_HOSTNAME=$(shq "$HOSTNAME_NEW")
ADMIN_USER=$(shq "$ADMIN_USER")
WIFI_SSID=$(shq "$WIFI_SSID")
WIFI_PSK=$(shq "$WIFI_PSK")
WIFI_COUNTRY=$(shq "$WIFI_COUNTRY")
SYS_MODS=/usr/lib/raspberrypi-sys-mods/imager_custom

CURRENT_HOSTNAME=\$(tr -d ' \t\n\r' </etc/hostname)
if [ -x "\$SYS_MODS" ]; then
    "\$SYS_MODS" set_hostname "\$NEW_HOSTNAME"
else
    echo "\$NEW_HOSTNAME" >/etc/hostname
    sed -i "s/127.0.1.1.*\$CURRENT_HOSTNAME/127.0.1.1\t\$NEW_HOSTNAME/g" /etc/hosts
fi

# The admin login: rename the image's first user; no password (locked), SSH keys only.
if [ -x /usr/lib/userconf-pi/userconf ]; then
    /usr/lib/userconf-pi/userconf "\$ADMIN_USER" ''
elif ! id "\$ADMIN_USER" >/dev/null 2>&1; then
    useradd -m -s /bin/bash -G sudo "\$ADMIN_USER"
fi
EOF
        if [ -n "$SSH_KEYS" ]; then
            SSH_KEYS_BLOCK=${SSH_KEYS%$'\n'}
            cat <<EOF
ADMIN_HOME=\$(getent passwd "\$ADMIN_USER" | cut -d: -f6)
install -o "\$ADMIN_USER" -g "\$ADMIN_USER" -m 700 -d "\$ADMIN_HOME/.ssh"
cat >"\$ADMIN_HOME/.ssh/authorized_keys" <<'EDGEHMOE_KEYS'
${SSH_KEYS_BLOCK}
EDGEHMOE_KEYS
chown "\$ADMIN_USER:\$ADMIN_USER" "\$ADMIN_HOME/.ssh/authorized_keys"
chmod 600 "\$ADMIN_HOME/.ssh/authorized_keys"
echo 'PasswordAuthentication no' >/etc/ssh/sshd_config.d/50-edgehmoe.conf
systemctl enable ssh
EOF
        fi
        if [ -n "$WIFI_SSID" ]; then
            cat <<'EOF'
if [ -x "$SYS_MODS" ]; then
    "$SYS_MODS" set_wlan "$WIFI_SSID" "$WIFI_PSK" "$WIFI_COUNTRY"
else
    # NetworkManager keyfile (Bookworm and later manage Wi-Fi with NetworkManager).
    install -m 700 -d /etc/NetworkManager/system-connections
    cat >/etc/NetworkManager/system-connections/edgehmoe-wifi.nmconnection <<NMEOF
[connection]
id=edgehmoe-wifi
type=wifi
autoconnect=true

[wifi]
mode=infrastructure
ssid=$WIFI_SSID

[wifi-security]
key-mgmt=wpa-psk
psk=$WIFI_PSK

[ipv4]
method=auto

[ipv6]
method=auto
NMEOF
    chmod 600 /etc/NetworkManager/system-connections/edgehmoe-wifi.nmconnection
    if [ -n "$WIFI_COUNTRY" ] && command -v raspi-config >/dev/null; then
        raspi-config nonint do_wifi_country "$WIFI_COUNTRY"
    fi
fi
EOF
        fi
        if [ -n "$WIFI_SSID$WIFI_COUNTRY" ]; then
            cat <<'EOF'
rfkill unblock wifi
for f in /var/lib/systemd/rfkill/*:wlan; do
    [ -e "$f" ] && echo 0 >"$f"
done
EOF
        fi
        cat <<EOF

# Install edgehmoe-firstboot.service; it installs the client after the reboot, once online.
sh $PI_DIR/firstboot.sh

rm -f $PI_BOOT/firstrun.sh /boot/firstrun.sh
for f in $PI_BOOT/cmdline.txt /boot/cmdline.txt; do
    if [ -f "\$f" ]; then
        sed -i 's| systemd.run=[^ ]*||g; s| systemd.run_success_action=[^ ]*||g; s| systemd.unit=kernel-command-line.target||g' "\$f"
    fi
done
exit 0
EOF
    } >"$STAGE/firstrun.sh"
fi

# cmdline.txt: one line. Add cgroup_enable=memory (MemoryMax needs the memory cgroup, which
# Raspberry Pi kernels disable by default) and, for firstrun, the systemd.run hook.
if mtype -i "$FAT" ::/cmdline.txt >"$WORK/cmdline.orig" 2>/dev/null; then
    line=$(tr '\r\n' '  ' <"$WORK/cmdline.orig" | sed 's/  */ /g; s/^ //; s/ $//')
    # Drop hooks a previous provisioning may have left, then append ours.
    line=$(printf '%s' "$line" | sed 's/ *systemd\.run=[^ ]*//g; s/ *systemd\.run_success_action=[^ ]*//g; s/ *systemd\.unit=kernel-command-line\.target//g')
    case " $line " in *" cgroup_enable=memory "*) ;; *) line="$line cgroup_enable=memory" ;; esac
    if [ -n "$WIFI_COUNTRY" ]; then
        line=$(printf '%s' "$line" | sed 's/ *cfg80211\.ieee80211_regdom=[^ ]*//g')
        line="$line cfg80211.ieee80211_regdom=$WIFI_COUNTRY"
    fi
    if [ "$PROVISIONING" = firstrun ]; then line="$line $CMDLINE_HOOK"; fi
    printf '%s\n' "$line" >"$STAGE/cmdline.txt"
fi

# Copy everything into the boot partition image.
if ! mdir -i "$FAT" ::/edgehmoe >/dev/null 2>&1; then
    mmd -i "$FAT" ::/edgehmoe || die "could not create edgehmoe/ on the boot partition"
fi
need=$(du -sb "$STAGE" | awk '{ print $1 }')
free=$(mdir -i "$FAT" ::/ 2>/dev/null | awk '/bytes free/ { gsub(/[^0-9]/, ""); print }')
if [ -n "$free" ] && [ "$need" -gt "$free" ]; then
    die "the boot partition has $((free / 1048576)) MiB free but the provisioning files (mostly the data shard) need $((need / 1048576)) MiB; use a smaller shard, or copy it over SSH later with install_client.sh --data"
fi
for f in "$STAGE"/edgehmoe/*; do
    mcopy -o -i "$FAT" "$f" "::/edgehmoe/${f##*/}" 2>"$WORK/mcopy.err" ||
        die "could not write ${f##*/} to the boot partition: $(cat "$WORK/mcopy.err")"
done
for f in "$STAGE"/*; do
    [ -f "$f" ] || continue
    mcopy -o -i "$FAT" "$f" "::/${f##*/}" 2>"$WORK/mcopy.err" ||
        die "could not write ${f##*/} to the boot partition: $(cat "$WORK/mcopy.err")"
done
mtype -i "$FAT" ::/edgehmoe/client.env | cmp -s - "$STAGE/edgehmoe/client.env" ||
    die "read-back of edgehmoe/client.env from the provisioned boot partition failed"

# ------------------------------------------------------------------------------------------
# Plan / write
# ------------------------------------------------------------------------------------------
summary() {
    local login="no SSH: pass --ssh-key to allow logins" broker=$BROKER files
    if [ -n "$SSH_KEYS" ]; then login="SSH key login"; fi
    if [ -n "$MQTT_PASSWORD" ]; then broker+=", user $MQTT_USERNAME"; fi
    if [ -n "$CAFILE" ]; then broker+=", CA $CAFILE"; fi
    if [ -n "$CERTFILE" ]; then broker+=", client certificate $CERTFILE"; fi
    files=$(cd "$STAGE" && find . -type f | sed 's|^\./||' | sort | tr '\n' ' ')
    cat >&2 <<EOF
  image         $IMAGE ($IMAGE_KIND, $((IMAGE_BYTES / 1048576)) MiB)
  target        $TARGET ($TARGET_KIND)
  device        $DEVICE_ID, hostname $HOSTNAME_NEW, admin user $ADMIN_USER ($login)
  broker        $broker
  data shard    ${DATA:-none (place one later with install_client.sh --data)}
  Wi-Fi         ${WIFI_SSID:-none (Ethernet)}
  first boot    $PROVISIONING: ${files% }
EOF
}

if [ "$DRY_RUN" = 1 ]; then
    info "dry run: nothing written. Would write:"
    summary
    exit 0
fi

if [ "$TARGET_KIND" = block ] && [ "$ASSUME_YES" != 1 ] && [ -t 0 ] && [ "${EDGEHMOE_FAKE_BLOCK_DEVICE:-0}" != 1 ]; then
    model=$(tr -s ' ' <"$SYS_BLOCK/$(basename -- "$(readlink -f -- "$TARGET")")/device/model" 2>/dev/null || true)
    printf '%s: ALL DATA on %s (%s%s MiB) will be erased. Type "yes" to continue: ' \
        "$PROG" "$TARGET" "${model:+$model, }" "$((TARGET_BYTES / 1048576))" >&2
    read -r answer
    [ "$answer" = yes ] || die "aborted; nothing written"
fi

info "writing $IMAGE to $TARGET"
summary
OUT=$TARGET
if [ "$TARGET_KIND" = file ] && [ "${EDGEHMOE_FAKE_BLOCK_DEVICE:-0}" != 1 ]; then
    PARTIAL=$(mktemp "$(dirname -- "$TARGET")/.${TARGET##*/}.edgehmoe-partial.XXXXXX")
    OUT=$PARTIAL
fi
progress=none
[ -t 2 ] && progress=progress
# One pass: bytes before the boot partition, our provisioned boot partition, the rest.
image_stream | {
    dd bs=4M iflag=fullblock,count_bytes count="$FAT_OFFSET" status=none
    dd bs=4M iflag=fullblock,count_bytes count="$FAT_BYTES" of=/dev/null status=none
    cat -- "$FAT"
    cat
} | dd of="$OUT" bs=4M iflag=fullblock conv=fsync status="$progress" ||
    die "writing to '$TARGET' failed; run $PROG again (a card may hold a partial image now)"

# Verify the boot partition as written.
dd if="$OUT" bs=4M iflag=skip_bytes,count_bytes skip="$FAT_OFFSET" count="$FAT_BYTES" status=none | cmp -s - "$FAT" ||
    die "verification failed: the boot partition read back from '$TARGET' differs from what was written"
mtype -i "$OUT@@$FAT_OFFSET" ::/edgehmoe/client.env >/dev/null ||
    die "verification failed: edgehmoe/client.env is not readable on '$TARGET'"

if [ -n "$PARTIAL" ]; then
    chmod 0644 "$PARTIAL"
    mv -f -- "$PARTIAL" "$TARGET"
    PARTIAL=""
fi
if [ "$TARGET_KIND" = block ] && [ "${EDGEHMOE_FAKE_BLOCK_DEVICE:-0}" != 1 ]; then
    sync
    if command -v blockdev >/dev/null; then blockdev --rereadpt "$TARGET" 2>/dev/null || true; fi
fi
info "done. Put the card in the Pi and power it on; it installs the client on first boot (10-30 min)."
info "watch it join: mosquitto_sub -h BROKER -t 'edgehmoe/+/device/$DEVICE_ID/status' -v   (see docs/pi.md)"
