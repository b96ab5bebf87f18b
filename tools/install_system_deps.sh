#!/usr/bin/env bash
# Install the Debian packages edgehmoe's demo and tests need (listed in .ci/apt-packages.txt):
# mosquitto (MQTT broker), wordnet-base (WordNet 3.0 for the Tiny ImageNet tree), and the
# tools the firmware-script tests use. As root it installs what is missing; otherwise it
# prints the command to run. Under CI=true a missing package is an error, never a skip.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
list="$here/.ci/apt-packages.txt"
mapfile -t pkgs < <(grep -v '^\s*#' "$list" | awk 'NF {print $1}')
missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system_deps: apt-get not found; install these yourself: ${missing[*]}" >&2
  [ "${CI:-}" = "true" ] && exit 1
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_system_deps: missing packages: ${missing[*]}" >&2
  echo "  run: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  [ "${CI:-}" = "true" ] && exit 1
  exit 0
fi
echo "install_system_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
