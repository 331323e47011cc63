#!/usr/bin/env bash
# Install what the embedded cluster and the tests need on a Debian machine (idempotent, quick
# when done): Debian packages, then a project virtualenv in .venv with the package and dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(docker.io containerd runc containernetworking-plugins iptables iproute2 debootstrap
          conntrack openssl gcc libc6-dev nginx-light libnginx-mod-stream ca-certificates)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages: ${missing[*]} — run this script as root (or apt-get install them)" >&2
    exit 2
  fi
  echo "installing: ${missing[*]}" >&2
  apt-get update -qq
  # No daemons from package scripts: the harness starts its own instances.
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >&2
  .venv/bin/python -m pip install -q -e '.[dev]' >&2
  rm -f .venv/.installed-*
  touch "$stamp"
fi
