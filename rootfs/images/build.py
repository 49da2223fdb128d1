#!/usr/bin/env python3
"""Writes the test images as one OCI image layout: scripts/fixtures images runs this.

usage: build.py OUT BUSYBOX_ROOTFS PYTHON_ROOTFS PYTHON312

OUT/layout is an OCI image layout with four tags (see README.md). PYTHON312 is the interpreter
of the newest-Iris venv (Python >= 3.12 with cloudpickle), whose installation the `python312`
tag carries: what Iris's task image gives a pickled callable of Iris's newest client. Layers are made with GNU tar
(sorted, mtime 0, numeric root owner) so the same inputs give the same digests; gzip layers
carry no name or time, and one layer is zstd to exercise that decoder.
"""
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Layout:
    def __init__(self, root):
        self.root = root
        self.blobs = os.path.join(root, "blobs", "sha256")
        os.makedirs(self.blobs, exist_ok=True)
        with open(os.path.join(root, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        self.manifests = []

    def add_file(self, path):
        digest = sha256_file(path)
        dest = os.path.join(self.blobs, digest)
        if not os.path.exists(dest):
            shutil.move(path, dest)
        return "sha256:" + digest, os.path.getsize(dest)

    def add_bytes(self, data):
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.blobs, digest), "wb") as f:
            f.write(data)
        return "sha256:" + digest, len(data)

    def layer(self, tree, compression, work):
        """tar of `tree` -> (descriptor, diff_id)."""
        tar = os.path.join(work, "layer.tar")
        subprocess.run(
            ["tar", "--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner",
             "--xattrs", "-C", tree, "-cf", tar, "."],
            check=True,
        )
        diff_id = "sha256:" + sha256_file(tar)
        if compression == "gzip":
            out = tar + ".gz"
            with open(tar, "rb") as src, open(out, "wb") as raw:
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
                    shutil.copyfileobj(src, gz, 1 << 20)
            media = LAYER_GZIP
        else:
            out = tar + ".zst"
            subprocess.run(["zstd", "-q", "-3", "-f", tar, "-o", out], check=True)
            media = LAYER_ZSTD
        os.remove(tar)
        digest, size = self.add_file(out)
        return {"mediaType": media, "digest": digest, "size": size}, diff_id

    def image(self, tag, layers, config):
        descs = [d for d, _ in layers]
        cfg = {
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [i for _, i in layers]},
        }
        cdigest, csize = self.add_bytes(json.dumps(cfg, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": csize},
            "layers": descs,
        }
        mdigest, msize = self.add_bytes(json.dumps(manifest, sort_keys=True).encode())
        self.manifests.append({
            "mediaType": OCI_MANIFEST, "digest": mdigest, "size": msize,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        })

    def finish(self):
        with open(os.path.join(self.root, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": self.manifests}, f, sort_keys=True)


def write(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def add_interpreter(tree, python):
    """Copies the installation of `python` (a Python >= 3.12 with cloudpickle) into `tree` at
    its own absolute prefix (a pyenv build finds its libpython there; a python-build-standalone
    one is relocatable anyway), without its tests, caches, headers and packages but cloudpickle,
    and links /usr/local/bin/python to it."""
    probe = subprocess.run(
        [python, "-c", "import sys, os, cloudpickle; print(sys.base_prefix); "
         "print(f'{sys.version_info[0]}.{sys.version_info[1]}'); print(os.path.dirname(cloudpickle.__file__))"],
        check=True, capture_output=True, text=True,
    ).stdout.split("\n")
    prefix, version, cloudpickle = probe[0], probe[1], probe[2]
    dest = os.path.join(tree, prefix.lstrip("/"))
    skip = shutil.ignore_patterns("test", "tests", "__pycache__", "idlelib", "tkinter", "turtledemo",
                                  "ensurepip", "site-packages", "config-*", "*.a", "lib2to3")
    shutil.copytree(os.path.join(prefix, "lib"), os.path.join(dest, "lib"), symlinks=True, ignore=skip)
    os.makedirs(os.path.join(dest, "bin"))
    shutil.copy2(os.path.join(prefix, "bin", f"python{version}"), os.path.join(dest, "bin", f"python{version}"))
    site = os.path.join(dest, "lib", f"python{version}", "site-packages")
    shutil.copytree(cloudpickle, os.path.join(site, "cloudpickle"), ignore=shutil.ignore_patterns("__pycache__"))
    os.makedirs(os.path.join(tree, "usr/local/bin"), exist_ok=True)
    os.symlink(os.path.join(prefix, "bin", f"python{version}"), os.path.join(tree, "usr/local/bin/python"))
    write(os.path.join(tree, "etc/image-marker"), f"python{version}\n")


MEMRAY = "memray==1.20.0"


def add_memray(tree, python):
    """memray (with what its CLI imports) into the interpreter's site-packages."""
    prefix, version = subprocess.run(
        [python, "-c", "import sys; print(sys.base_prefix); print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
        check=True, capture_output=True, text=True).stdout.split()
    site = os.path.join(tree, prefix.lstrip("/"), "lib", f"python{version}", "site-packages")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
                    "--only-binary=:all:", "--target", site, MEMRAY], check=True)


def add_lldb(tree, base_rootfs):
    """The host's lldb (Debian's lldb-14, what `memray attach` drives: gdb 13 cannot call into
    a process on this kernel), its server and Python module, and the libraries they need that
    the base rootfs lacks (the host is the same Debian release as the python rootfs)."""
    lldb = shutil.which("lldb")
    if lldb is None:
        sys.exit("build.py: no lldb on this host (scripts/setup installs it)")
    llvm_bin = os.path.dirname(os.path.realpath(lldb))
    # lldb finds its server by its version's name (lldb-server-14.0.6) beside itself.
    programs = sorted(os.path.join(llvm_bin, p) for p in os.listdir(llvm_bin)
                      if p.startswith(("lldb-server", "lldb-argdumper")) or p == "lldb")
    for program in programs:
        copy_file(os.path.realpath(program), tree, as_path=program)
    os.makedirs(os.path.join(tree, "usr/bin"), exist_ok=True)
    os.symlink(os.path.join(llvm_bin, "lldb"), os.path.join(tree, "usr/bin/lldb"))
    module = os.path.realpath("/usr/lib/python3/dist-packages/lldb")
    shutil.copytree(module, os.path.join(tree, module.lstrip("/")), symlinks=True)
    os.makedirs(os.path.join(tree, "usr/lib/python3/dist-packages"), exist_ok=True)
    os.symlink(os.path.relpath(module, "/usr/lib/python3/dist-packages"),
               os.path.join(tree, "usr/lib/python3/dist-packages/lldb"))
    # The module's native part links liblldb; lldb-server's closure is lldb's.
    needed = programs + [os.path.join(module, f) for f in os.listdir(module) if f.endswith(".so")]
    for binary in needed:
        libs = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
        for line in libs.splitlines():
            parts = line.split("=>")
            if len(parts) != 2 or not parts[1].strip().startswith("/"):
                continue
            lib = parts[1].split()[0]
            # Under its soname, in the directory the loader found it in, that directory's links
            # resolved (/lib is a link to usr/lib here, and a real /lib in a layer would hide
            # the base's link).
            named = os.path.join(os.path.realpath(os.path.dirname(lib)), os.path.basename(lib))
            if not os.path.lexists(os.path.join(base_rootfs, named.lstrip("/"))) \
                    and not os.path.lexists(os.path.join(tree, named.lstrip("/"))):
                copy_file(os.path.realpath(lib), tree, as_path=named)


def copy_file(path, tree, as_path=None):
    dest = os.path.join(tree, (as_path or path).lstrip("/"))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copy2(path, dest)


def main():
    out, busybox, python, python312 = sys.argv[1:5]
    layout = Layout(os.path.join(out, "layout"))
    with tempfile.TemporaryDirectory(dir=out) as work:
        # The shared base: busybox plus the files the upper layers hide.
        base = os.path.join(work, "base")
        shutil.copytree(busybox, base, symlinks=True)
        write(os.path.join(base, "fixture/gone"), "hidden by a whiteout\n")
        write(os.path.join(base, "fixture/kept"), "kept\n")
        write(os.path.join(base, "fixture/opq/a"), "a\n")
        write(os.path.join(base, "fixture/opq/b"), "b\n")
        base_layer = layout.layer(base, "gzip", work)

        top = os.path.join(work, "top")
        write(os.path.join(top, "fixture/.wh.gone"), "")
        write(os.path.join(top, "fixture/opq/.wh..wh..opq"), "")
        write(os.path.join(top, "fixture/opq/c"), "c\n")
        write(os.path.join(top, "etc/image-marker"), "busybox\n")
        write(os.path.join(top, "usr/local/bin/hello"), "#!/bin/sh\necho hello from the image\n", 0o755)
        os.symlink("hello", os.path.join(top, "usr/local/bin/hello-link"))
        os.link(os.path.join(top, "etc/image-marker"), os.path.join(top, "etc/image-marker-link"))
        top_layer = layout.layer(top, "zstd", work)
        layout.image("busybox", [base_layer, top_layer], {
            "Env": [PATH, "IMAGE_VAR=from-image"],
            "Cmd": ["/bin/sh", "-c", "echo default command of the image"],
            "WorkingDir": "/fixture",
        })

        extra = os.path.join(work, "extra")
        write(os.path.join(extra, "etc/image-marker"), "busybox-extra\n")
        layout.image("busybox-extra", [base_layer, layout.layer(extra, "gzip", work)], {
            "Env": [PATH],
            "Cmd": ["/bin/sh"],
        })

        python_top = os.path.join(work, "python-top")
        write(os.path.join(python_top, "etc/image-marker"), "python\n")
        python_base = layout.layer(python, "gzip", work)
        layout.image("python", [python_base, layout.layer(python_top, "gzip", work)], {
            "Env": [PATH, "LANG=C.UTF-8"],
            "Cmd": ["python3"],
        })

        newer = os.path.join(work, "python312-top")
        add_interpreter(newer, python312)
        add_memray(newer, python312)
        newer_layer = layout.layer(newer, "gzip", work)
        layout.image("python312", [python_base, newer_layer], {
            "Env": [PATH, "LANG=C.UTF-8", "IMAGE_VAR=from-python312"],
            "Cmd": ["python"],
        })

        debugger = os.path.join(work, "lldb")
        add_lldb(debugger, python)
        layout.image("python312-lldb", [python_base, newer_layer, layout.layer(debugger, "gzip", work)], {
            "Env": [PATH, "LANG=C.UTF-8", "IMAGE_VAR=from-python312"],
            "Cmd": ["python"],
        })
    layout.finish()


if __name__ == "__main__":
    main()
