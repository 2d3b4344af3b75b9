#!/usr/bin/env bash
# Installs the Debian packages the local platform needs, only when missing (needs root for apt).
set -euo pipefail
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
/usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v unshare >/dev/null || need+=(util-linux)
[ -x /usr/sbin/mkfs.ext4 ] || need+=(e2fsprogs)  # sandbox homes: loop-mounted ext4 images
# sandbox network isolation (service/backends/compute/sandbox_net.py): ip, nft, nsenter
[ -x /usr/sbin/ip ] || command -v ip >/dev/null || need+=(iproute2)
[ -x /usr/sbin/nft ] || command -v nft >/dev/null || need+=(nftables)
command -v nsenter >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "stackml needs these Debian packages: ${need[*]} (run as root: apt-get install ${need[*]})" >&2
    exit 1
  fi
  echo "installing ${need[*]} ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
