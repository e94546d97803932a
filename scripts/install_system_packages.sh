#!/usr/bin/env bash
# Debian packages the Python requirements need (FFCV builds against libturbojpeg and OpenCV; our JPEG
# region decoder, data_pipeline/_jpeg_region.c, against libjpeg).
# Idempotent: installs only what is missing; needs root (or sudo) only when something is missing.
# With --test: the packages of a local SLURM cluster for tests/test_slurm.py, installed only as root
# (elsewhere those tests skip and say why).
set -euo pipefail
packages=(pkg-config g++ libturbojpeg0-dev libjpeg-dev libopencv-dev numactl)
if [ "${1:-}" = "--test" ]; then
  packages=(slurmctld slurmd slurm-client munge)
  if [ "$(id -u)" -ne 0 ]; then
    echo "not root: the SLURM tests will be skipped"
    exit 0
  fi
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "error: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
# apt and dpkg print a line per package: keep that in a log and show it only when something fails.
mkdir -p .logs
log=.logs/apt.log
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
  --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  echo "error: apt-get failed; last lines of $log:" >&2
  tail -n 40 "$log" >&2
  exit 1
fi
echo "installed ${#missing[@]} Debian package(s) (log: $log)"
