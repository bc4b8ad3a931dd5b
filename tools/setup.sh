#!/usr/bin/env bash
# Idempotent set-up for `make test` and `make demo` on a fresh Debian/Ubuntu machine:
# apt packages (when root), a .venv with the project installed in editable mode.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

APT_PACKAGES=(
    build-essential bc bison flex libelf-dev libssl-dev xz-utils cpio dpkg-dev
    debian-archive-keyring
    qemu-system-x86 qemu-utils kexec-tools busybox-static debootstrap python3 python3-lz4 python3-cryptography
    e2fsprogs xfsprogs btrfs-progs dosfstools util-linux lz4 socat
    # cryptsetup: R unlocks a LUKS volume holding the target (its crypto variant)
    cryptsetup-bin
    # the TPM2 token: R carries systemd's cryptsetup plugin with the tpm2-tss libraries
    # (libtss2-dev names them on every release); the VM tier's TPM is swtpm
    libtss2-dev swtpm
    dbus libglib2.0-bin
    libgirepository1.0-dev libcairo2-dev pkg-config python3-venv python3-dev
    grub-common
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    else
        echo "setup: these Debian packages are missing; install them as root:" >&2
        echo "  sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi

py=${PYTHON:-python3}
stamp=.venv/.kjumpd-installed
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >&2
    .venv/bin/python -m pip install -q -e '.[test]' >&2
    touch "$stamp"
fi
