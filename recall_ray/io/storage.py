"""Where files live: a local path or any pyarrow filesystem URI (s3://, gs://, file://), for
the run directory, the outputs and the input models (`model_path`).

Everything a stage writes goes to a temporary name first and is moved into place when
complete, so a crash never leaves a half-written output where a rerun would trust it.

Object stores: credentials and endpoint come from the environment that pyarrow (the AWS SDK)
reads (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, AWS_PROFILE,
a role), never from a config file: a URI carrying credentials is refused, and no URI is
logged with more than its scheme, bucket and key.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import logging
import math
import os
import posixpath
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import pyarrow.fs as pafs

log = logging.getLogger("recall_ray.storage")
# a copy to the local cache is said wherever it happens: in a Ray worker the root logger is at
# WARNING, and its handler forwards the line to the job's log (cluster.runtime.worker_output_to_log)
if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)

# URI query keys that would put a secret in a config file (pyarrow's S3 and GCS options)
_SECRET_KEYS = {"access_key", "secret_key", "session_token", "access_token", "credentials"}


# Every temporary name written here carries this mark (`<name>.tmp-<hex>`, or a hidden
# `.<name>.tmp-...` sibling): a write in progress, or one a killed run left behind.
TMP_MARK = ".tmp-"


def is_staging_name(name: str) -> bool:
    """Whether a file or directory name is a temporary one (never a finished output), so
    that a reader listing a folder skips what a killed write left there."""
    return TMP_MARK in name


class StorageError(ValueError):
    """An object store location that cannot be used: no credentials, no such bucket, a
    credential in the URI. Its message is one line, naming the location and the fix."""


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a local file's bytes, read in 1 MiB pieces: what names a file by content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_uri(uri: str) -> None:
    """Refuse a URI that carries a credential (user:secret@bucket, ?secret_key=...): they
    come from the environment, so that no config file or log ever holds one. The message
    does not repeat the URI (it holds the secret)."""
    parts = urlsplit(uri)
    if "@" in parts.netloc or _SECRET_KEYS & set(parse_qs(parts.query)):
        raise StorageError(f"a {parts.scheme}:// location in the config carries a credential: remove it and set"
                           " AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, a role) in the environment")


# object stores whose pyarrow path is bucket/key (their filesystem object is kept per bucket)
BUCKET_SCHEMES = ("s3", "gs", "gcs")


@functools.lru_cache(maxsize=32)
def _filesystem_of(root: str) -> pafs.FileSystem:
    """One filesystem object per scheme://bucket (an S3 client is slow to make: it resolves
    credentials and the region), for the life of the process."""
    return pafs.FileSystem.from_uri(root)[0]


def _bucket_filesystem(parts) -> pafs.FileSystem:
    """The (kept) filesystem of a split URI's scheme://bucket, with its query options."""
    return _filesystem_of(f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else ""))


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    path = str(path)
    if is_uri(path):
        parts = urlsplit(path)
        if parts.scheme == "file":
            return pafs.FileSystem.from_uri(path)
        check_uri(path)
        if parts.scheme in BUCKET_SCHEMES:  # the path inside is bucket/key
            return _bucket_filesystem(parts), f"{parts.netloc}{parts.path}".rstrip("/")
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

    def location(self, rel: str = "") -> str:
        """Location of rel for another process: a URI stays a URI, a local path is absolute
        (Ray's workers and Ray Train need not share the driver's working directory)."""
        return self.uri(rel) if is_uri(self.root) else self.path(rel)

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
        tmp = f"{dst}{TMP_MARK}{uuid.uuid4().hex[:8]}"
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
        return f"{rel}{TMP_MARK}{uuid.uuid4().hex[:8]}"

    def replace_dir(self, tmp_rel: str, rel: str) -> None:
        """Move a completed temporary directory into place (replacing an old one)."""
        self.delete(rel)
        move_dir(self.fs, self.path(tmp_rel), self.path(rel))


def move_dir(fs: pafs.FileSystem, src: str, dst: str) -> None:
    """Move a directory: a rename where the filesystem has one (local), else (an object
    store, which has no directories to rename) a copy of every object, then the source
    deleted: `dst` is complete before `src` goes, so a crash in between leaves both, and a
    stage that finds its staging still there does not trust `dst`."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(src, dst)
        return
    for info in fs.get_file_info(pafs.FileSelector(src, recursive=True)):
        if info.type == pafs.FileType.File:
            fs.copy_file(info.path, dst + info.path[len(src):])
    fs.delete_dir(src)


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
        loc = f"{dest.rstrip('/')}{TMP_MARK}{uuid.uuid4().hex[:8]}"
        fs.create_dir(filesystem(loc)[1], recursive=True)
        return loc
    parent = Path(dest).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{Path(dest).name}{TMP_MARK}", dir=parent)


def put_file(local_file: str, location: str, name: str) -> None:
    """Place a finished local file at location/name (a rename locally, an upload remotely)."""
    if is_uri(location):
        fs, path = filesystem(location)
        with open(local_file, "rb") as src, fs.open_output_stream(f"{path}/{name}") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
        os.remove(local_file)
    else:
        shutil.move(local_file, str(Path(location) / name))


def put_tree(local: str, location: str, name: str) -> None:
    """Copy a local file or folder to location/name on a local path or an object store
    (the local side is left as it is)."""
    if os.path.isdir(local):
        for entry in sorted(os.listdir(local)):
            put_tree(os.path.join(local, entry), f"{location.rstrip('/')}/{name}", entry)
        return
    fs, path = filesystem(f"{location.rstrip('/')}/{name}")
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
        shutil.copyfileobj(src, dst, length=16 << 20)


def publish(staging: str, dest: str, overwrite: bool) -> None:
    """Move a complete staging directory to `dest`, replacing it only with `overwrite`."""
    refuse_existing_output(dest, overwrite)
    fs, path = filesystem(dest)
    _, spath = filesystem(staging)
    if overwrite and output_exists(dest):  # without overwrite, refuse_existing_output found none
        fs.delete_dir(path)
    move_dir(fs, spath, path)


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


# ------------------------------------------------------------------ input models on a URI

class RemotePath:
    """The few pathlib.Path operations the model readers use (`/`, name, suffix, parent,
    exists, is_file, is_dir, stat().st_size, read_bytes/read_text, glob of one folder,
    iterdir, open), on an object store location, so that one reader serves a local path and
    a URI (`model_path`). open() gives a random-access file: a read at an offset is one
    range request, never the whole object."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.key = filesystem(self.uri)

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"RemotePath({self.uri!r})"

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(f"{self.uri}/{name}")

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.uri == self.uri

    def __lt__(self, other: RemotePath) -> bool:
        return self.uri < other.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    @property
    def name(self) -> str:
        return posixpath.basename(self.uri)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.uri.rsplit("/", 1)[0])

    def expanduser(self) -> RemotePath:
        return self

    def resolve(self) -> RemotePath:
        return self

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.key)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def stat(self) -> os.stat_result:
        info = self._info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self.uri} does not exist")
        return os.stat_result((0, 0, 0, 0, 0, 0, info.size, 0, 0, 0))

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.key) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def _entries(self) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(self.key, allow_not_found=True))

    def iterdir(self) -> list[RemotePath]:
        return [self / posixpath.basename(i.path) for i in self._entries()]

    def glob(self, pattern: str) -> list[RemotePath]:
        """The files of this folder whose names match (one listing request)."""
        return [self / posixpath.basename(i.path) for i in self._entries()
                if i.type == pafs.FileType.File and fnmatch.fnmatchcase(posixpath.basename(i.path), pattern)]

    def open(self, mode: str = "rb", buffering: int = -1):
        if mode != "rb":
            raise ValueError(f"{self.uri}: input models are read-only here (mode {mode!r})")
        return self.fs.open_input_file(self.key)


def replace_json(path: str | os.PathLike, obj, indent: int | None = None) -> None:
    """Write `obj` to the local file `path` whole or not at all (a temporary file renamed over
    it): a stopped run never leaves a half-written label or key behind."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=indent)
    os.replace(tmp, path)


def model_path(path: str | os.PathLike) -> Path | RemotePath:
    """A model location as a Path (local) or a RemotePath (URI): the readers use either."""
    return RemotePath(str(path)) if is_uri(path) else Path(path)


def open_for_reads(path: str):
    """A file opened for reads at offsets (seek + readinto): unbuffered locally, a
    random-access object (each read one range request) on a URI."""
    return model_path(path).open("rb", buffering=0)


def check_model_location(uri: str) -> None:
    """Before a model's URI is read: the credentials and the bucket are there, each refused
    with one line naming the fix (a missing object is the caller's, with the model named).
    Local paths and file:// need nothing."""
    parts = urlsplit(uri)
    if parts.scheme == "file" or not is_uri(uri):
        return
    check_uri(uri)
    if parts.scheme in ("s3", "s3a") and not _aws_credentials_available():
        raise StorageError(f"no credentials for {parts.scheme}://{parts.netloc}: set AWS_ACCESS_KEY_ID and"
                           " AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a store other than AWS), or AWS_PROFILE,"
                           " in the environment of the job")
    fs = _bucket_filesystem(parts)
    try:
        found = fs.get_file_info(parts.netloc).type != pafs.FileType.NotFound
    except OSError as e:  # access denied, an endpoint that does not answer: the store's own words, one line
        raise StorageError(f"cannot read {parts.scheme}://{parts.netloc}: {' '.join(str(e).split())[:300]};"
                           " check the credentials and AWS_ENDPOINT_URL") from None
    if not found:
        raise StorageError(f"bucket {parts.netloc!r} does not exist ({uri}): check the name, the account and"
                           " AWS_ENDPOINT_URL")


def _aws_credentials_available() -> bool:
    """Whether the AWS credential chain finds anything (environment, profile files, web
    identity, container or instance role), asked through botocore when it is installed;
    without it, only the environment is known, and pyarrow answers the rest itself."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return True
    try:
        import botocore.session
    except ImportError:
        return True  # cannot tell: let the store answer
    return botocore.session.get_session().get_credentials() is not None


COPY_CHUNK = 16 << 20
COPY_PROGRESS_EVERY_S = 30.0
COPY_UNIT = (10**6, "MB")  # bytes, name: the copy's progress counts in it


def cache_root() -> Path:
    return Path(os.environ.get("RECALL_RAY_CACHE", "~/.cache/recall-ray")).expanduser()


def local_copy(uri: str, names: list[str] | None = None) -> str:
    """A local directory holding the files of the model directory `uri` (only `names`, when
    given, those of them that exist), for libraries that read only local paths
    (transformers' from_pretrained, tokenizers). Downloaded once into the cache
    (RECALL_RAY_CACHE/remote/) and reused while every file keeps its size and modification
    time; the download goes to a temporary folder, moved into place when complete. Logged,
    with the size, since a model's weights can be gigabytes."""
    if not is_uri(uri):
        return uri
    src = RemotePath(uri)
    infos = [i for i in src.fs.get_file_info(pafs.FileSelector(src.key, recursive=True))
             if i.type == pafs.FileType.File]
    wanted = [(i.path[len(src.key) + 1:], i) for i in infos]
    if names is not None:
        wanted = [(rel, i) for rel, i in wanted if rel in names]
    listing = sorted((rel, i.size, str(i.mtime_ns)) for rel, i in wanted)
    tag = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:20]
    dest = cache_root() / "remote" / tag
    if dest.is_dir():
        return str(dest)
    total = sum(i.size for _, i in wanted)
    log.info("copying %d file(s) of %s (%.1f MB) to the local cache %s: transformers reads only local files",
             len(wanted), uri, total / 1e6, dest)
    from ..progress import Progress

    # a 7B model's copy takes minutes: a line every COPY_PROGRESS_EVERY_S (in a Ray worker, to
    # the job's log), as the job's stages do
    unit, label = COPY_UNIT
    progress = Progress(f"copy of {uri} to the cache", math.ceil(total / unit), label, every_s=COPY_PROGRESS_EVERY_S)
    copied = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{tag}{TMP_MARK}", dir=dest.parent))
    try:
        for rel, info in wanted:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            with src.fs.open_input_stream(info.path) as f, open(tmp / rel, "wb") as out:
                while chunk := f.read(COPY_CHUNK):
                    out.write(chunk)
                    copied += len(chunk)
                    progress.update(math.ceil(copied / unit) - progress.done)
        progress.close()
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():  # another process finished the same copy first: use it
            raise
    return str(dest)
