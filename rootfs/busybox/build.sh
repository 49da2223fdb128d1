#!/usr/bin/env bash
# Recipe for the busybox test/demo rootfs. Run by `scripts/fixtures busybox`, which hashes this
# directory (plus the busybox binary) and caches the result; run by hand only to inspect it.
#
# usage: build.sh OUTPUT_DIR [BUSYBOX]
#   OUTPUT_DIR  an empty or missing directory to fill
#   BUSYBOX     a statically linked busybox (default: $BUSYBOX, else /bin/busybox from
#               Debian's busybox-static)
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ $# -lt 1 ]]; then usage >&2; exit 2; fi
if [[ $1 == -h || $1 == --help ]]; then usage; exit 0; fi

out=$1
busybox=${2:-${BUSYBOX:-/bin/busybox}}

[[ -x $busybox ]] || { echo "build.sh: no busybox at $busybox (apt-get install busybox-static)" >&2; exit 1; }
banner=$("$busybox" 2>&1 || true)
if [[ $banner != BusyBox* ]]; then
    echo "build.sh: $busybox does not look like busybox" >&2
    exit 1
fi

mkdir -p "$out"
cd "$out"

# Directories: the usual mount points, plus /workdir and /app where iris-worker puts a task's
# working directory and bundle.
mkdir -p bin etc proc sys dev tmp root workdir app usr/bin
chmod 1777 tmp
chmod 0700 root

install -m 0755 "$busybox" bin/busybox
# One symlink per applet, all in /bin (busybox's own name is in the list: skip it).
"$busybox" --list | while IFS= read -r applet; do
    [[ -n $applet && $applet != busybox ]] || continue
    ln -sfn busybox "bin/$applet"
done
# For `#!/usr/bin/env ...` scripts.
ln -sfn ../../bin/busybox usr/bin/env

cat > etc/passwd <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat > etc/group <<'GROUP'
root:x:0:
nobody:x:65534:
GROUP
echo iris > etc/hostname
cat > etc/hosts <<'HOSTS'
127.0.0.1	localhost
::1	localhost ip6-localhost ip6-loopback
HOSTS
: > etc/resolv.conf
chmod 0644 etc/passwd etc/group etc/hostname etc/hosts etc/resolv.conf
