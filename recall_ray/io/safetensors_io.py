"""Safetensors on disk or on an object store: header validation, lazy per-tensor reads,
fingerprints, and a streaming shard writer.

A model directory may be a URI (s3://bucket/prefix, any pyarrow filesystem; storage.model_path):
the header is read first (8 bytes, then its JSON) and each tensor by one read at its offset
(a range request), so nothing is downloaded whole.

Why our own header parsing: a truncated or corrupt file must be refused before any work,
with the file named, and fingerprints must not need the tensor bytes. The header (8-byte
little-endian length + JSON) gives names, dtypes, shapes and byte ranges, which is enough
to check every range lies inside the file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

from ..core.errors import CheckpointError
from .storage import RemotePath, is_uri, model_path, open_for_reads

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype names (the subset models use) -> bytes per element: the header checks
# need no torch, so that a job's input checks answer before torch is imported (seconds).
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


@functools.cache
def dtype_maps() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    """(safetensors dtype name -> torch dtype, and back), built on first use."""
    import torch

    st_to_torch = {st: getattr(torch, t) for st, t in _TORCH_NAMES.items()}
    return st_to_torch, {v: k for k, v in st_to_torch.items()}


def __getattr__(name: str):
    """ST_TO_TORCH and TORCH_TO_ST, the maps of `dtype_maps`, as module attributes (PEP 562):
    importing this module must not import torch."""
    if name in ("ST_TO_TORCH", "TORCH_TO_ST"):
        return dtype_maps()[name == "TORCH_TO_ST"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    file: str
    nbytes: int
    offset: int = -1  # absolute byte offset of the data in a safetensors file (-1: pickle)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_header(path: str | Path) -> tuple[dict, bytes]:
    """Parse and validate one safetensors header; return (header dict, raw header bytes).

    Raises CheckpointError if the file is too short, the header is not JSON, a dtype is
    unknown, or any tensor's byte range does not fit the file (a truncated download).
    """
    path = model_path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes); re-download or re-save it")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors header (header says {n} bytes, file has {size});"
                " re-download or re-save the model"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e}); re-download or re-save the model") from None
    data_len = size - 8 - n
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); re-download or re-save the model")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}; re-download or re-save the model")
        if info.get("dtype") not in ST_ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        begin, end = offsets
        itemsize = ST_ITEMSIZE[info["dtype"]]
        if end - begin != _numel(shape) * itemsize:
            raise CheckpointError(
                f"{path}: tensor {name} spans {end - begin} bytes but its shape {shape} and dtype {info['dtype']}"
                " need a different size: the file is corrupt; re-download or re-save the model"
            )
        if not (0 <= begin <= end <= data_len):
            raise CheckpointError(
                f"{path}: tensor {name} lies outside the file (bytes {begin}-{end} of {data_len}):"
                " the file is truncated or corrupt; re-download or re-save the model"
            )
    return header, raw


def list_weight_files(model_dir: str | Path, allow_pickle: bool = False) -> list[Path | RemotePath]:
    """The safetensors files of a model directory (via its index when sharded); a URI's
    files as RemotePaths."""
    model_dir = model_path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{model_dir}: index names shard(s) that are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES) if model_dir.is_dir() else []
    if pickles:
        if is_uri(model_dir):
            raise CheckpointError(f"{model_dir}: holds only pickle checkpoint(s) {[p.name for p in pickles]}, which"
                                  " recall-ray reads only from a local path; convert to safetensors")
        if not allow_pickle:
            raise CheckpointError(
                f"{model_dir}: holds only pickle checkpoint(s) {[p.name for p in pickles]}, which can run code when"
                " loaded; convert to safetensors (model.save_pretrained(dir, safe_serialization=True)) or set"
                " allow_pickle: true if you trust the file"
            )
        return pickles
    raise CheckpointError(f"{model_dir}: no model weights found (expected *.safetensors)")


def tensor_infos(files: Iterable[Path | str]) -> dict[str, TensorInfo]:
    """Name -> TensorInfo over all files; a tensor in two files is an error."""
    out: dict[str, TensorInfo] = {}
    for f in map(model_path, files):
        if f.suffix in PICKLE_SUFFIXES:
            import torch

            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            for name, t in sd.items():
                out[name] = TensorInfo(name, dtype_maps()[1][t.dtype], tuple(t.shape), str(f), t.numel() * t.element_size())
            continue
        header, raw = read_header(f)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in out:
                raise CheckpointError(f"tensor {name} appears in both {out[name].file} and {f}")
            b, e = info["data_offsets"]
            out[name] = TensorInfo(name, info["dtype"], tuple(info["shape"]), str(f), e - b, 8 + len(raw) + b)
    return out


FINGERPRINT_SAMPLE_BYTES = 4096


def fingerprint_pieces(offset: int, nbytes: int) -> tuple[tuple[int, int], ...]:
    """The (offset, length) pieces of one tensor's data that its file's fingerprint hashes:
    its first and last FINGERPRINT_SAMPLE_BYTES (one piece when it is that small). `offset`
    is where the tensor's data starts, in any frame (the file's, or the data section's)."""
    n = min(FINGERPRINT_SAMPLE_BYTES, nbytes)
    return tuple((at, n) for at in dict.fromkeys((offset, offset + nbytes - n)))


def files_fingerprint(files: Iterable[Path], pieces: Mapping[tuple[str, int], bytes] | None = None) -> str:
    """sha256 over each file's name, size, safetensors header and, for every tensor, the
    first and last FINGERPRINT_SAMPLE_BYTES of its data. The stage keys of a run are built
    from it, so it must change when a model is retrained in place with the same shapes (the
    header alone would not): a fine-tune moves the first and last rows of every tensor it
    trains (a folded LoRA is dense in its weights; new token embeddings sit at the end).
    Reads two small pieces per tensor, never the whole file. Pickle files hash their bytes.

    `pieces`: those pieces already in memory, by (str(file), offset in the file)
    (`LazyTensorReader.fingerprint_pieces`: a read of every tensor kept them), so that no
    tensor byte is read again; KeyError when one is missing."""
    h = hashlib.sha256()
    for f in sorted(map(model_path, files)):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        if f.suffix == ".safetensors":
            header, raw = read_header(f)
            h.update(raw)
            start = 8 + len(raw)
            spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
            if pieces is not None:
                for b, e in spans:
                    for at, n in fingerprint_pieces(start + b, e - b):
                        h.update(pieces[(str(f), at)] if n else b"")  # an empty tensor is not read
                continue
            with f.open("rb") as fh:
                for b, e in spans:
                    for at, n in fingerprint_pieces(start + b, e - b):
                        fh.seek(at)
                        h.update(fh.read(n))
        else:
            if pieces is not None:
                raise KeyError(f"{f}: a pickle file is fingerprinted from its bytes, not from pieces")
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def model_fingerprint(model_dir: str | Path, allow_pickle: bool = False) -> str:
    return files_fingerprint(list_weight_files(model_dir, allow_pickle=allow_pickle))


def content_fingerprint(model_dir: str | Path, allow_pickle: bool = False, sample_bytes: int = 4096) -> str:
    """Identity of a model's weights that ignores how they are laid out on disk: sha256 over
    every tensor's name, dtype and shape plus the first `sample_bytes` of each tensor's data.

    Used to check that an adapter meets the base it was trained on: the same weights saved
    by another library version (other shard sizes, metadata or order) keep this value, while
    a different base (e.g. another fine-tune of the same architecture) changes it.
    """
    infos = tensor_infos(list_weight_files(model_dir, allow_pickle=allow_pickle))
    reader = LazyTensorReader(infos)
    h = hashlib.sha256()
    for name in sorted(infos):
        info = infos[name]
        h.update(f"{name}|{info.dtype}|{list(info.shape)}".encode())
        h.update(reader.first_row_bytes(name, sample_bytes))
    return h.hexdigest()


class LazyTensorReader:
    """Reads single tensors on demand, with plain reads at the offsets the header gives.

    Why not safetensors' mmap: every page of a mapped file stays in the process's RSS until
    the file is closed, so a merge actor reading K models would show K models' worth of
    memory. Reading into a fresh tensor keeps the footprint to the tensors alive now.
    """

    def __init__(self, infos: dict[str, TensorInfo], keep_fingerprint_pieces: bool = False):
        self._infos = infos
        self._files: dict[str, object] = {}
        self._pickled: dict[str, dict] = {}
        self.bytes_read = 0  # tensor bytes read from the files so far (what a merge costs in I/O)
        # keep_fingerprint_pieces: each whole tensor read leaves the pieces files_fingerprint
        # hashes, so that a load that reads every tensor also gives the model's fingerprint
        # without a read of its own (the job's stage keys, from the representation loads)
        self.fingerprint_pieces: dict[tuple[str, int], bytes] | None = {} if keep_fingerprint_pieces else None

    def _read(self, info: TensorInfo, shape: tuple[int, ...], nbytes: int) -> torch.Tensor:
        import torch

        t = torch.empty(shape, dtype=dtype_maps()[0][info.dtype])
        if nbytes == 0:
            return t
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open_for_reads(info.file)
        f.seek(info.offset)  # one range request per tensor on an object store
        data = t.reshape(-1).view(torch.uint8).numpy()
        got = f.readinto(memoryview(data))
        self.bytes_read += got
        if got != nbytes:
            raise CheckpointError(f"{info.file}: tensor {info.name} is cut short ({got} of {nbytes} bytes): the file is"
                                  " truncated; re-download or re-save the model")
        if self.fingerprint_pieces is not None and nbytes == info.nbytes:  # the whole tensor
            for at, n in fingerprint_pieces(info.offset, nbytes):
                self.fingerprint_pieces[(info.file, at)] = data[at - info.offset:at - info.offset + n].tobytes()
        return t

    def _pickle(self, info: TensorInfo) -> torch.Tensor:
        if info.file not in self._pickled:
            import torch

            self._pickled[info.file] = torch.load(info.file, map_location="cpu", weights_only=True, mmap=True)
        return self._pickled[info.file][info.name]

    def get(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        if info.offset < 0:
            return self._pickle(info)
        return self._read(info, info.shape, info.nbytes)

    def first_row_bytes(self, name: str, limit: int) -> bytes:
        """The first whole elements of tensor[0:1] (the whole tensor if 0-d) that fit in
        `limit` bytes (at least one), as stored: read straight from a safetensors file,
        without torch (the input checks fingerprint the base before torch is imported)."""
        info = self._infos[name]
        itemsize = ST_ITEMSIZE[info.dtype]
        if info.offset < 0:
            t = self.first_row(name).reshape(-1)
            return t[:max(1, limit // itemsize)].contiguous().view(dtype_maps()[0]["U8"]).numpy().tobytes()
        row = info.nbytes // info.shape[0] if info.shape and info.shape[0] else info.nbytes
        n = min(row, max(1, limit // itemsize) * itemsize)
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open_for_reads(info.file)
        f.seek(info.offset)
        data = f.read(n)
        self.bytes_read += len(data)
        if len(data) != n:
            raise CheckpointError(f"{info.file}: tensor {info.name} is cut short: the file is truncated;"
                                  " re-download or re-save the model")
        return data

    def first_row(self, name: str) -> torch.Tensor:
        """tensor[0:1] (the whole tensor if 0-d), reading only those bytes."""
        info = self._infos[name]
        if info.offset < 0:
            t = self._pickle(info)
            return t[0:1] if t.ndim else t
        if not info.shape or info.shape[0] == 0:
            return self._read(info, info.shape, info.nbytes)
        return self._read(info, (1, *info.shape[1:]), info.nbytes // info.shape[0])


class StreamingShardWriter:
    """Writes one safetensors file tensor by tensor, so only one tensor is in memory.

    The header is written first from the planned (name, dtype, shape) list; tensors must then
    be written in exactly that order. The file is complete (and valid) only after `close()`.
    """

    def __init__(self, path: str | Path, plan: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._plan = plan
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dtype, shape in plan:
            nbytes = _numel(shape) * ST_ITEMSIZE[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        exp_name, exp_dtype, exp_shape = self._plan[self._next]
        if name != exp_name or dtype_maps()[1][tensor.dtype] != exp_dtype or tuple(tensor.shape) != tuple(exp_shape):
            raise RuntimeError(
                f"shard writer: expected {exp_name} {exp_dtype} {exp_shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._f.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._plan):
            self._f.close()
            raise RuntimeError(f"shard writer: {len(self._plan) - self._next} planned tensors were never written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ------------------------------------------------------------------ EWC Fishers (recall_ray.core.ewc)

def save_fisher(fisher: Mapping[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> str:
    """Write a Fisher as float32 safetensors, atomically (temporary sibling, then rename)."""
    from safetensors.torch import save_file

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    os.close(fd)
    try:
        save_file({n: t.detach().float().contiguous().cpu() for n, t in fisher.items()}, tmp,
                  metadata={"format": "pt", "kind": "ewc_diagonal_fisher", **(metadata or {})})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_fisher(path: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A saved Fisher as float32 tensors; refuses negative or non-finite entries."""
    import torch
    from safetensors.torch import load_file

    fisher = {n: t.float() for n, t in load_file(path, device=str(device)).items()}
    for n, t in fisher.items():
        if not torch.isfinite(t).all() or (t < 0).any():
            raise ValueError(f"EWC Fisher {path}: {n} has negative or non-finite entries")
    return fisher
