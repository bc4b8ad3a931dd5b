#!/usr/bin/env bash
# Build a CONFIG_KEXEC_JUMP bzImage from Debian's linux-source package.
# Usage: savekernel/build-kernel.sh [SERIES]   (SERIES defaults to 6.12)
# Prints the path of the cached bzImage on its last line. The cache lives under
# ${KJUMPD_CACHE:-~/.cache/kjumpd}/kernel/<source-version>-<fragment-hash>/ and is reused when present.
# Builds of one series take turns (flock on kernel/.build-SERIES.lock: the download, the
# unpacked source and the build directory are shared); an entry is built under a temporary
# name and renamed into place when complete, so one that exists is whole (as
# savekernel/buildcache.py does for the Python builders).
set -euo pipefail
series=${1:-6.12}
here=$(cd "$(dirname "$0")" && pwd)
cache=${KJUMPD_CACHE:-$HOME/.cache/kjumpd}
fragment=$here/kernel.fragment
frag_hash=$(sha256sum "$fragment" | cut -c1-12)
aptdir=$cache/apt
mkdir -p "$aptdir/lists/partial" "$aptdir/cache/archives/partial" "$cache/kernel"
exec 9>>"$cache/kernel/.build-$series.lock"
flock 9

mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
mirror=${mirror:-http://deb.debian.org/debian}
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" > "$aptdir/sources.list"
apt_opts=(-o Dir::Etc::SourceList="$aptdir/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o Dir::State::Lists="$aptdir/lists" -o Dir::Cache="$aptdir/cache" -o APT::Sandbox::User=root)

deb=$(ls "$aptdir"/linux-source-"$series"_*_all.deb 2>/dev/null | sort -V | tail -n1 || true)
if [ -z "$deb" ]; then
    echo "kernel: fetching linux-source-$series from Debian's archive" >&2
    apt-get "${apt_opts[@]}" update -qq >&2
    (cd "$aptdir" && apt-get "${apt_opts[@]}" download "linux-source-$series" >&2)
    deb=$(ls "$aptdir"/linux-source-"$series"_*_all.deb | sort -V | tail -n1)
fi
version=$(basename "$deb" | sed -E 's/^linux-source-[^_]+_([^_]+)_all\.deb$/\1/')
out=$cache/kernel/$version-$frag_hash
if [ -s "$out/bzImage" ]; then echo "$out/bzImage"; exit 0; fi

work=$cache/kernel/build-$version
if [ ! -d "$work/linux" ]; then
    echo "kernel: unpacking $version" >&2
    rm -rf "$work"; mkdir -p "$work/deb"
    dpkg-deb -x "$deb" "$work/deb"
    mkdir -p "$work/linux"
    tar -xf "$work"/deb/usr/src/linux-source-*.tar.xz -C "$work/linux" --strip-components=1
    rm -rf "$work/deb"
fi
cd "$work/linux"
make -s tinyconfig >&2
args=()
while IFS= read -r line; do
    line=${line%%#*}; line=$(echo "$line" | tr -d '[:space:]')
    [ -n "$line" ] || continue
    name=${line%%=*}; value=${line#*=}
    case $value in
        y) args+=(-e "$name") ;;
        n) args+=(-d "$name") ;;
        *) args+=(--set-val "$name" "$value") ;;
    esac
done < "$fragment"
scripts/config "${args[@]}"
make -s olddefconfig >&2
# A second pass: options whose dependencies appeared only after the first olddefconfig.
scripts/config "${args[@]}"
make -s olddefconfig >&2
missing=0
while IFS= read -r line; do
    line=${line%%#*}; line=$(echo "$line" | tr -d '[:space:]')
    [ -n "$line" ] || continue
    name=${line%%=*}; value=${line#*=}
    if [ "$value" = n ]; then
        grep -q "^CONFIG_$name=" .config && { echo "kernel: CONFIG_$name still set" >&2; missing=1; }
    else
        grep -q "^CONFIG_$name=$value\$" .config || { echo "kernel: CONFIG_$name=$value did not stick" >&2; missing=1; }
    fi
done < "$fragment"
[ $missing = 0 ] || { echo "kernel: the fragment did not apply; see above" >&2; exit 1; }
echo "kernel: building $version ($(nproc) jobs)" >&2
make -s -j"$(nproc)" bzImage >&2
partial=$out.partial-$$
rm -rf "$out.partial-"* "$out"
mkdir -p "$partial"
cp arch/x86/boot/bzImage "$partial/bzImage"
cp .config "$partial/config"
mv -T "$partial" "$out"
echo "$out/bzImage"
