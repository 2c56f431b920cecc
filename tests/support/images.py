"""A busybox OCI image built locally (no registry): one layer with busybox-static and its applets."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

IMAGE_NAME = "docker.io/library/busybox:kata-py"
# the CRI sandbox_image: busybox whose default command waits (for SIGTERM/SIGKILL) forever, like /pause
PAUSE_IMAGE_NAME = "registry.k8s.io/pause:kata-py"
PAUSE_CMD = ("/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done")
APPLETS = ("sh", "echo", "cat", "sleep", "true", "false", "ls", "ps", "id", "env", "nproc", "grep", "head",
           "wc", "date", "hostname", "kill", "dd", "free", "uname", "test", "seq", "tr", "mkdir", "rm",
           "httpd", "wget", "nc", "ip")


def _busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if Path(candidate).is_file():
            return Path(candidate)
    found = shutil.which("busybox")
    if not found:
        raise FileNotFoundError("busybox-static is not installed")
    return Path(found)


def _layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add_dir(name: str) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)

        for d in ("bin", "tmp", "etc", "proc", "sys", "dev", "root"):
            add_dir(d)
        data = _busybox().read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode, info.mtime = len(data), 0o755, 0
        tar.addfile(info, io.BytesIO(data))
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname, link.mode, link.mtime = tarfile.SYMTYPE, "busybox", 0o777, 0
            tar.addfile(link)
        passwd = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size, info.mode, info.mtime = len(passwd), 0o644, 0
        tar.addfile(info, io.BytesIO(passwd))
    return buf.getvalue()


def build_oci_tar(dest: Path, name: str = IMAGE_NAME, cmd: tuple[str, ...] = ("/bin/sh",)) -> Path:
    """Write an OCI image layout tarball that `ctr images import` accepts; `cmd` is the image's Cmd."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> dict[str, object]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    layer_tar = _layer()
    layer_gz = gzip.compress(layer_tar, mtime=0)
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": list(cmd), "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]},
    }
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(json.dumps(config).encode())},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(layer_gz)}],
    }
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **blob(json.dumps(manifest).encode()),
        "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]},
        "platform": {"architecture": "amd64", "os": "linux"}}]}
    with tarfile.open(dest, "w") as tar:
        def add(path: str, data: bytes) -> None:
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add("blobs/sha256/" + digest.split(":", 1)[1], data)
    return dest
