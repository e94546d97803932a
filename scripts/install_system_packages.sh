#!/usr/bin/env bash
# Debian packages the Python requirements need (FFCV builds against libturbojpeg and OpenCV; our JPEG
# region decoder, data_pipeline/_jpeg_region.c, against libjpeg).
# Idempotent: installs only what is missing; needs root (or sudo) only when something is missing.
# Optional (best effort: a release without it only prints a note): dataset-fashion-mnist, the IDX files that
# `prepare --source fashion-mnist` and bench/payoff.py read.
# With --test: the packages of a local SLURM cluster for tests/test_slurm.py, installed only as root
# (elsewhere those tests skip and say why).
set -euo pipefail
packages=(pkg-config g++ libturbojpeg0-dev libjpeg-dev libopencv-dev numactl)
optional=(dataset-fashion-mnist)
if [ "${1:-}" = "--test" ]; then
  packages=(slurmctld slurmd slurm-client munge)
  optional=()
  if [ "$(id -u)" -ne 0 ]; then
    echo "not root: the SLURM tests will be skipped"
    exit 0
  fi
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
optional_missing=()
for p in "${optional[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || optional_missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && [ ${#optional_missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]:-} ${optional_missing[*]:-}" | tr -s " "
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null; then
    [ ${#missing[@]} -eq 0 ] && { echo "note: not root, ${optional_missing[*]} not installed (optional)"; exit 0; }
    echo "error: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
  SUDO=sudo
fi
# apt and dpkg print a line per package: keep that in a log and show it only when something fails.
mkdir -p .logs
log=.logs/apt.log
install() {
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@"
}
if ! { $SUDO apt-get update -qq && { [ ${#missing[@]} -eq 0 ] || install "${missing[@]}"; }; } >"$log" 2>&1; then
  echo "error: apt-get failed; last lines of $log:" >&2
  tail -n 40 "$log" >&2
  exit 1
fi
for p in "${optional_missing[@]}"; do
  install "$p" >>"$log" 2>&1 || echo "note: optional package $p not installed (not in this release's archive?)"
done
echo "installed Debian package(s): ${missing[*]} ${optional_missing[*]} (log: $log)"
