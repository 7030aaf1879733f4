#!/usr/bin/env bash
# Install the OS packages Gondolin needs, only when some are missing (Debian/Ubuntu, apt).
set -euo pipefail
packages=(qemu-system-x86 qemu-utils mmdebstrap busybox-static e2fsprogs kmod file python3-venv tmux git cpio openssh-server)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# npm (for the MCP conformance suite in tests/e2e/test_mcp_conformance.py) may come with a nodejs
# package from elsewhere: ask apt for it only when there is no npm command at all.
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "gondolin: installing missing OS packages: ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "gondolin: need root or sudo to apt-get install ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
