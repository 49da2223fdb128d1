#!/usr/bin/env bash
# Recipe for the Python task rootfs (the default environment of tasks with a bundle and no
# image). Run by `scripts/fixtures python`, which hashes this directory and caches the result.
#
# usage: build.sh OUTPUT_DIR
#   Debian bookworm minbase with python3, python3-venv and CA certificates (mmdebstrap, from
#   the host's apt sources), plus the uv binary from its PyPI wheel (version in uv.version).
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ $# -ne 1 ]]; then usage >&2; exit 2; fi
if [[ $1 == -h || $1 == --help ]]; then usage; exit 0; fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=$1
uv_version=$(tr -d '[:space:]' < "$here/uv.version")

command -v mmdebstrap >/dev/null || { echo "build.sh: mmdebstrap is missing (scripts/setup installs it)" >&2; exit 1; }

# No mirror argument: mmdebstrap takes the host's apt sources, the mirror this machine may reach.
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$out"

# uv: the binary inside its manylinux wheel (a registry package, not a download of a binary).
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_17_x86_64 --dest "$wheels" "uv==$uv_version"
wheel=$(find "$wheels" -name 'uv-*.whl' | head -n 1)
[[ -n $wheel ]] || { echo "build.sh: no uv wheel was downloaded" >&2; exit 1; }
python3 - "$wheel" "$out/usr/local/bin/uv" <<'PY'
import sys, zipfile, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".data/scripts/uv"))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with z.open(name) as src, open(dest, "wb") as dst:
        dst.write(src.read())
os.chmod(dest, 0o755)
PY

# Where iris-worker mounts a task's bundle, its venv and its workdir.
mkdir -p "$out/app/.venv" "$out/workdir"
"$out/usr/local/bin/uv" --version >&2
