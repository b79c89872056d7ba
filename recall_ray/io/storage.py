"""The run directory: a local path or any pyarrow filesystem URI (s3://, gs://, file://).

Everything a stage writes goes to a temporary name first and is moved into place when
complete, so a crash never leaves a half-written output where a rerun would trust it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


class RunDir:
    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self.base = filesystem(self.root)
        self.fs.create_dir(self.base, recursive=True)

    def uri(self, rel: str = "") -> str:
        """Location of rel for pyarrow / Ray Data (a URI stays a URI)."""
        return f"{self.root}/{rel}" if rel else self.root

    def path(self, rel: str = "") -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic where the filesystem allows it: write a temporary name, then move."""
        dst = self.path(rel)
        self.fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
        tmp = f"{dst}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, dst)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, obj) -> None:
        self.write_text(rel, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def delete(self, rel: str) -> None:
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))

    def tmp_name(self, rel: str) -> str:
        return f"{rel}.tmp-{uuid.uuid4().hex[:8]}"

    def replace_dir(self, tmp_rel: str, rel: str) -> None:
        """Move a completed temporary directory into place (replacing an old one)."""
        self.delete(rel)
        self.fs.move(self.path(tmp_rel), self.path(rel))


def output_exists(dest: str) -> bool:
    fs, path = filesystem(dest)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


class NotWritableError(ValueError):
    """A destination whose filesystem refuses writes (read-only, full, no permission)."""


def check_writable(dest: str) -> None:
    """Refuse, before any work, a local destination whose filesystem refuses writes: a
    probe file is created beside it (in its nearest existing folder) and removed at once."""
    if is_uri(dest):
        return  # an object store answers at the first write
    parent = Path(dest).resolve()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotWritableError(f"cannot write {dest}: {parent} is a file, not a folder; choose another location")
    try:
        fd, probe = tempfile.mkstemp(prefix=".recall-ray-probe-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise NotWritableError(f"cannot write {dest}: {parent} refuses new files ({os.strerror(e.errno or 0)});"
                               " choose another location") from None


def refuse_existing_output(dest: str, overwrite: bool) -> None:
    """The one rule for an output that is already there: an error unless `overwrite`."""
    if not overwrite and output_exists(dest):
        raise FileExistsError(f"output {dest} already exists; pass --overwrite or choose another `output`")


def staging_location(dest: str) -> str:
    """A temporary directory on the same filesystem as `dest`, so that publishing is one
    move (an atomic rename for a local path). Local: a hidden sibling; URI: a suffix."""
    if is_uri(dest):
        fs, path = filesystem(dest)
        loc = f"{dest.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
        fs.create_dir(filesystem(loc)[1], recursive=True)
        return loc
    parent = Path(dest).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{Path(dest).name}.tmp-", dir=parent)


def put_file(local_file: str, location: str, name: str) -> None:
    """Place a finished local file at location/name (a rename locally, an upload remotely)."""
    if is_uri(location):
        fs, path = filesystem(location)
        with open(local_file, "rb") as src, fs.open_output_stream(f"{path}/{name}") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
        os.remove(local_file)
    else:
        shutil.move(local_file, str(Path(location) / name))


def publish(staging: str, dest: str, overwrite: bool) -> None:
    """Move a complete staging directory to `dest`, replacing it only with `overwrite`."""
    refuse_existing_output(dest, overwrite)
    fs, path = filesystem(dest)
    _, spath = filesystem(staging)
    if output_exists(dest):
        fs.delete_dir(path)
    fs.move(spath, path)


@contextmanager
def staged(dest: str, overwrite: bool) -> Iterator[str]:
    """Build `dest` in a staging directory (yielded) and publish it only when the block
    completes; on any error the staging directory is removed and `dest` is untouched."""
    staging = staging_location(dest)
    try:
        yield staging
        publish(staging, dest, overwrite)
    except BaseException:
        discard(staging)
        raise


def discard(staging: str) -> None:
    fs, path = filesystem(staging)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
