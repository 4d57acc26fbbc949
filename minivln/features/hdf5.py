"""Panorama and object features in the community HDF5 layouts (see ``docs/features.md``).

View features (one file per backbone, as released with HAMT/DUET)::

    /{scan}_{viewpoint}            dataset (36, D) with D in {512, 768, 1024}; or (36, D + 1000)
                                   where the last 1000 columns are ImageNet class *logits* (readers
                                   apply a softmax; used by masked-region classification, MRC)
    /class_probs/{scan}_{viewpoint} optional dataset (36, C): a class *distribution* per view,
                                   the MiniVLN alternative to the concatenated logits
    root attributes (optional)     standin (bool), description (str), feature_dim, class_layout
                                   ("none" | "concat" | "separate"), class_names, ...

Object features (VLN-DUET REVERIE layout)::

    /{scan}_{viewpoint}            dataset (K, D_obj) [optionally (K, D_obj + 1000) with logits]
        attrs: obj_ids (K,), directions (K, 2) [heading, elevation of the box centre, radians],
               sizes (K, 2) [w, h pixels of a 640x480 view], bboxes (K, 4) [x1, y1, x2, y2 pixels],
               view_ids (K,) [the view the box was taken from], names (K,) optional
    or, equivalently, a group with datasets ``fts``, ``obj_ids``, ``directions``, ``sizes``,
    ``bboxes``, ``view_ids``.  A viewpoint without objects may have no entry.

Readers open the file on first use (and again in a forked worker), read one key at a time and
keep at most ``cache_size`` decoded entries (least recently used first out); a view feature dataset
stored contiguous and unfiltered (how the writers store it) is read straight from the file at its
offset, which is looked up once per key; ``FeatureStore.require``
checks, from the key list alone, that a file holds every viewpoint a split needs.  Writers write to a
temporary file beside the target and rename it into place only when everything was written; a write
that fails (a full disk) stops the writer with one :class:`~minivln.paths.WriteError` naming the file
and the space needed and left, and removes the temporary file (the target stays as it was).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import h5py
import numpy as np
import torch

from minivln.paths import (
    DataError,
    WriteError,
    describe_os_error,
    error_number,
    format_bytes,
    free_bytes,
    write_error,
)

NUM_VIEWS = 36
NUM_CLASSES = 1000
COMMUNITY_DIMS = (512, 768, 1024)
CLASS_GROUP = "class_probs"
CLASS_LAYOUTS = ("none", "concat", "separate")
_LOGIT_EPS = 1e-6


class MissingFeatureError(DataError, KeyError):
    """A feature file has no entry for the requested ``{scan}_{viewpoint}`` key."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def feature_key(scan: str, vp: str) -> str:
    """The community key of a viewpoint: ``"{scan}_{viewpoint}"``."""
    return f"{scan}_{vp}"


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def as_float32(x: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 copy of ``x`` (float16 is widened by torch, exactly and several times
    faster than numpy)."""
    if x.dtype == np.float16:
        return torch.from_numpy(np.ascontiguousarray(x)).float().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


_KINDS = {"b": "boolean", "S": "byte-string", "U": "string", "O": "object (variable-length string)",
          "V": "compound", "M": "date", "m": "time-delta", "c": "complex"}


def _require_numbers(path: Path, key: str, arr: np.ndarray) -> None:
    """A :class:`DataError` naming the file and the key when ``arr`` holds no real numbers (strings,
    compound records, ...), instead of a conversion traceback."""
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{path}: key {key!r} holds {_KINDS.get(arr.dtype.kind, str(arr.dtype))} values "
                        f"({arr.dtype}), not numbers; a feature file holds float arrays")


def _require_finite(path: Path, key: str, arr: np.ndarray, rows: str, what: str = "values") -> None:
    """A :class:`DataError` naming the file, the key and the rows (views, objects) where ``arr`` (read
    from ``key``) has a NaN or an infinity: the agent would just stop there, with no word why."""
    if arr.dtype.kind != "f" or np.isfinite(arr).all():
        return
    bad = ~np.isfinite(arr)
    where = np.unique(np.nonzero(bad)[0]) if arr.ndim > 1 else np.nonzero(bad)[0]
    shown = ", ".join(str(int(i)) for i in where[:5]) + (", ..." if len(where) > 5 else "")
    raise DataError(f"{path}: key {key!r} has {int(bad.sum()):,} non-finite {what} (NaN or infinite), "
                    f"in {rows} {shown}; a damaged or badly converted feature file?")


def probs_to_logits(probs: np.ndarray) -> np.ndarray:
    """Logits whose softmax gives back ``probs`` (up to a 1e-6 floor): ``log(p + 1e-6)``."""
    return np.log(np.asarray(probs, dtype=np.float32) + _LOGIT_EPS)


def _attr(value: Any) -> Any:
    """h5py attribute -> plain Python (bytes -> str, numpy scalars -> Python)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype.kind in ("O", "S"):
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value.tolist()]
    return value


class _LazyH5:
    """An HDF5 file opened read-only on first use (and reopened after a fork), plus an LRU cache."""

    def __init__(self, path: str | os.PathLike, cache_size: int):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"feature file {self.path} does not exist")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.cache_size = int(cache_size)
        self._h5: h5py.File | None = None
        self._fd: int | None = None  # a plain read-only descriptor for the direct reads
        self._pid: int | None = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        # per key: (byte offset or None = read through h5py, dtype, shape) of a root dataset
        self._locations: dict[str, tuple[int | None, np.dtype | None, tuple[int, ...]]] = {}
        self._types: list[tuple[h5py.h5t.TypeID, np.dtype | None]] = []  # HDF5 type -> numpy dtype
        self.hits = 0
        self.misses = 0

    def file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            try:
                self._h5 = h5py.File(self.path, "r")
            except OSError as exc:
                raise DataError(f"{self.path} is not a readable HDF5 file: {exc}") from exc
            self._fd = None  # a forked child opens its own descriptor and HDF5 type handles
            self._types = []
            self._pid = os.getpid()
        return self._h5

    def close(self) -> None:
        if self._pid == os.getpid():
            if self._h5 is not None:
                self._h5.close()
            if self._fd is not None:
                os.close(self._fd)
        self._h5 = None
        self._fd = None
        self._cache.clear()

    def read_dataset(self, key: str) -> np.ndarray | None:
        """The root dataset ``key`` whole, as ``file()[key][()]`` gives it; None when the root has no
        dataset of that name.  A dataset with a byte offset (HDF5 gives one only to contiguous storage
        in this file: no chunks, hence no filters, no external or virtual storage) is read with one
        ``preadv`` there, its offset, shape and type looked up once per key, which skips h5py's
        per-read overhead (most of a read's time); any other layout goes through h5py."""
        h5 = self.file()
        loc = self._locations.get(key)
        if loc is None:
            try:
                dsid = h5py.h5d.open(h5.id, key.encode())
            except KeyError:  # no such name, or not a dataset
                return None
            offset = dsid.get_offset() if hasattr(os, "preadv") else None
            loc = (offset, self._numpy_type(dsid) if offset is not None else None, tuple(dsid.shape))
            self._locations[key] = loc
        offset, dtype, shape = loc
        if offset is None or dtype is None:
            return h5[key][()]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        out = np.empty(shape, dtype=dtype)
        if os.preadv(self._fd, [out], offset) != out.nbytes:
            raise DataError(f"{self.path}: short read of {key!r} (a truncated file?)")
        return out

    def _numpy_type(self, dsid: h5py.h5d.DatasetID) -> np.dtype | None:
        """The numpy dtype of a dataset's HDF5 type (asked once per distinct type: h5py's conversion
        is slow); None for types a plain read cannot give (object, variable length)."""
        htype = dsid.get_type()
        for known, dtype in self._types:
            if known == htype:
                return dtype
        dtype = dsid.dtype
        dtype = None if dtype.hasobject else dtype
        self._types.append((htype, dtype))
        return dtype

    def cached(self, key: str) -> Any | None:
        if key in self._cache:
            self._cache.move_to_end(key)
            self.hits += 1
            return self._cache[key]
        self.misses += 1
        return None

    def remember(self, key: str, value: Any) -> None:
        if self.cache_size == 0:
            return
        self._cache[key] = value
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def cache_len(self) -> int:
        return len(self._cache)

    def root_attrs(self) -> dict[str, Any]:
        return {k: _attr(v) for k, v in self.file().attrs.items()}


class _StoreMetadata:
    """Metadata shared by the feature stores (each has ``self._f``, a ``_LazyH5``)."""

    _f: _LazyH5

    @property
    def path(self) -> Path:
        return self._f.path

    @property
    def attrs(self) -> dict[str, Any]:
        """The file's root attributes (empty for most community files)."""
        return self._f.root_attrs()

    @property
    def is_standin(self) -> bool:
        """True for MiniVLN stand-in features (root attribute ``standin=True``), not real images."""
        return bool(self.attrs.get("standin", False))

    @property
    def description(self) -> str:
        return str(self.attrs.get("description", ""))


class FeatureStore(_StoreMetadata):
    """Lazy, memory-bounded reader of per-viewpoint panorama features ``(36, D)``.

    ``expected_dim``: the view feature width the caller needs; a file of another width raises a
    ``DataError`` naming both.  ``cache_size``: at most this many viewpoints are kept decoded
    (float32; 36 x 768 x 4 bytes = 110 KB each, so the default 1024 holds about 113 MB).
    """

    def __init__(self, path: str | os.PathLike, expected_dim: int | None = None, cache_size: int = 1024):
        self._f = _LazyH5(path, cache_size)
        self.expected_dim = expected_dim
        self._layout: tuple[int, int, str] | None = None  # (dim, stored width, class layout)
        self._names: frozenset[str] | None = None

    # -- metadata ------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Width D of the view features (class logits/probabilities excluded)."""
        return self._resolve_layout()[0]

    @property
    def class_layout(self) -> str:
        """How per-view class distributions are stored: "none", "concat" or "separate"."""
        return self._resolve_layout()[2]

    @property
    def has_classes(self) -> bool:
        return self.class_layout != "none"

    @property
    def class_names(self) -> list[str] | None:
        names = self.attrs.get("class_names")
        return list(names) if names is not None else None

    def _first_dataset(self) -> tuple[str, h5py.Dataset]:
        for name, obj in self._f.file().items():
            if isinstance(obj, h5py.Dataset):
                return name, obj
        raise DataError(f"{self.path} holds no per-viewpoint feature datasets")

    def _resolve_layout(self) -> tuple[int, int, str]:
        if self._layout is not None:
            return self._layout
        attrs = self.attrs
        key, ds = self._first_dataset()
        if ds.ndim != 2 or ds.shape[0] != NUM_VIEWS:
            raise DataError(
                f"{self.path}: dataset {key!r} has shape {ds.shape}; expected ({NUM_VIEWS}, D) "
                "view features (is this an object feature file? use ObjectFeatureStore)"
            )
        width = int(ds.shape[1])
        if "feature_dim" in attrs:
            dim = int(attrs["feature_dim"])
            layout = str(attrs.get("class_layout", "none"))
            if layout not in CLASS_LAYOUTS:
                raise DataError(f"{self.path}: unknown class_layout {layout!r}; expected one of {CLASS_LAYOUTS}")
        elif self.expected_dim is not None and width in (self.expected_dim, self.expected_dim + NUM_CLASSES):
            dim = self.expected_dim
            layout = "concat" if width > dim else "none"
        elif width in COMMUNITY_DIMS:
            dim, layout = width, "none"
        elif width - NUM_CLASSES in COMMUNITY_DIMS:
            dim, layout = width - NUM_CLASSES, "concat"
        else:
            dim, layout = width, "none"
        if layout == "none" and CLASS_GROUP in self._f.file():
            layout = "separate"
        stored = dim + NUM_CLASSES if layout == "concat" else dim
        if width != stored:
            raise DataError(f"{self.path}: dataset {key!r} has width {width}, but the file says D={dim} "
                            f"with class layout {layout!r} (width {stored})")
        if self.expected_dim is not None and dim != self.expected_dim:
            extra = f" (+{NUM_CLASSES} class logits)" if layout == "concat" else ""
            raise DataError(
                f"{self.path}: expected view features of dim {self.expected_dim}, found dim {dim}{extra} "
                f"(dataset {key!r} has shape {tuple(ds.shape)})"
            )
        self._layout = (dim, stored, layout)
        return self._layout

    # -- access --------------------------------------------------------------------------------
    def __contains__(self, key: str | tuple[str, str]) -> bool:
        name = feature_key(*key) if isinstance(key, tuple) else key
        return name in self._f.file()

    def has(self, scan: str, vp: str) -> bool:
        return feature_key(scan, vp) in self._f.file()

    def keys(self) -> Iterator[str]:
        """All ``{scan}_{viewpoint}`` keys (datasets at the root)."""
        for name, obj in self._f.file().items():
            if isinstance(obj, h5py.Dataset):
                yield name

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def root_names(self) -> frozenset[str]:
        """Every name at the file's root (the key list only: no data is read), cached."""
        if self._names is None:
            self._names = frozenset(self._f.file().keys())
        return self._names

    def require(self, keys: Iterable[str], what: str) -> None:
        """Raise a :class:`MissingFeatureError` now, naming the count and the first few, when some of
        ``keys`` (``{scan}_{viewpoint}``) are not in the file (``what`` needs them, e.g. ``"the r2r
        val_unseen split (11 houses)"``), instead of failing several batches into a run."""
        keys = list(keys)
        names = self.root_names()
        missing = [k for k in keys if k not in names]
        if missing:
            raise MissingFeatureError(
                f"{self.path} lacks features for {len(missing):,} of the {len(keys):,} viewpoints that {what} needs "
                f"(first missing: {', '.join(missing[:3])}); a feature file of other houses, or an incomplete build?")

    def _read(self, key: str) -> tuple[np.ndarray, np.ndarray | None]:
        hit = self._f.cached(key)
        if hit is not None:
            return hit
        dim, stored, layout = self._resolve_layout()
        arr = self._f.read_dataset(key)
        if arr is None:
            if key not in self._f.file():
                raise MissingFeatureError(f"{self.path} has no features for key {key!r}")
            raise DataError(f"{self.path}: key {key!r} has shape a group; expected ({NUM_VIEWS}, {stored})")
        _require_numbers(self.path, key, arr)
        if arr.shape != (NUM_VIEWS, stored):
            raise DataError(f"{self.path}: key {key!r} has shape {arr.shape}; expected ({NUM_VIEWS}, {stored})")
        fts = as_float32(arr[:, :dim])
        _require_finite(self.path, key, fts, "view(s)")
        classes = None
        if layout == "concat":
            classes = softmax(arr[:, dim:])
            _require_finite(self.path, key, classes, "view(s)", "class probabilities (from its logits)")
        value = (fts, classes)
        self._f.remember(key, value)
        return value

    def get(self, scan: str, vp: str) -> np.ndarray:
        """View features of one viewpoint, ``(36, D)`` float32 (view index as in ``env.geometry``)."""
        return self._read(feature_key(scan, vp))[0]

    def classes(self, scan: str, vp: str) -> np.ndarray:
        """Per-view class distribution ``(36, C)`` (rows sum to 1), for MRC targets."""
        layout = self.class_layout
        key = feature_key(scan, vp)
        if layout == "none":
            raise DataError(f"{self.path} stores no class distributions")
        if layout == "concat":
            classes = self._read(key)[1]
            assert classes is not None
            return classes
        group = self._f.file()[CLASS_GROUP]
        if key not in group:
            raise MissingFeatureError(f"{self.path} has no class distribution for key {key!r}")
        raw = np.asarray(group[key][()])
        _require_numbers(self.path, f"{CLASS_GROUP}/{key}", raw)
        probs = np.asarray(raw, dtype=np.float32)
        if probs.ndim != 2 or probs.shape[0] != NUM_VIEWS:
            raise DataError(f"{self.path}: {CLASS_GROUP}/{key} has shape {probs.shape}; expected ({NUM_VIEWS}, C)")
        _require_finite(self.path, f"{CLASS_GROUP}/{key}", probs, "view(s)")
        return probs

    def cache_info(self) -> dict[str, int]:
        return {"size": self._f.cache_len(), "max": self._f.cache_size, "hits": self._f.hits,
                "misses": self._f.misses}

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # Picklable for DataLoader workers: the open file handle and the cache stay behind.
        return {"path": str(self.path), "expected_dim": self.expected_dim, "cache_size": self._f.cache_size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["expected_dim"], state["cache_size"])


@dataclass
class ObjectFeatures:
    """The objects annotated around one viewpoint (K may be 0)."""

    fts: np.ndarray  # (K, D) float32
    obj_ids: np.ndarray  # (K,) int64
    directions: np.ndarray  # (K, 2) heading, elevation (radians) of the box centre
    sizes: np.ndarray  # (K, 2) w, h in pixels of a 640x480 view
    bboxes: np.ndarray  # (K, 4) x1, y1, x2, y2 in pixels
    view_ids: np.ndarray  # (K,) int64, -1 where unknown
    names: list[str] | None = None
    class_probs: np.ndarray | None = None  # (K, 1000) when the file has logits

    def __len__(self) -> int:
        return len(self.obj_ids)


_OBJ_FIELDS = ("obj_ids", "directions", "sizes", "bboxes", "view_ids")


class ObjectFeatureStore(_StoreMetadata):
    """Lazy, memory-bounded reader of REVERIE object features (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, expected_dim: int | None = None, cache_size: int = 4096,
                 strict: bool = False):
        self._f = _LazyH5(path, cache_size)
        self.expected_dim = expected_dim
        self.strict = strict  # raise on a missing key instead of returning zero objects
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        """Width of the object features (class logits excluded)."""
        if self._dim is None:
            attrs = self.attrs
            if "feature_dim" in attrs:
                dim = int(attrs["feature_dim"])
            else:
                width = None
                for _, obj in self._f.file().items():
                    ds = obj["fts"] if isinstance(obj, h5py.Group) and "fts" in obj else obj
                    if isinstance(ds, h5py.Dataset) and ds.ndim == 2 and ds.shape[0] > 0:
                        width = int(ds.shape[1])
                        break
                if width is None:
                    if self.expected_dim is None:
                        raise DataError(f"{self.path} holds no object features to tell their dim from")
                    width = self.expected_dim
                if self.expected_dim is not None and width == self.expected_dim + NUM_CLASSES:
                    dim = self.expected_dim
                elif width - NUM_CLASSES in COMMUNITY_DIMS:
                    dim = width - NUM_CLASSES
                else:
                    dim = width
            if self.expected_dim is not None and dim != self.expected_dim:
                raise DataError(f"{self.path}: expected object features of dim {self.expected_dim}, "
                                f"found dim {dim}")
            self._dim = dim
        return self._dim

    def __contains__(self, key: str | tuple[str, str]) -> bool:
        name = feature_key(*key) if isinstance(key, tuple) else key
        return name in self._f.file()

    def keys(self) -> Iterator[str]:
        yield from self._f.file().keys()

    def _empty(self) -> ObjectFeatures:
        z = np.zeros
        return ObjectFeatures(z((0, self.dim), np.float32), z(0, np.int64), z((0, 2), np.float32),
                              z((0, 2), np.float32), z((0, 4), np.float32), z(0, np.int64), [])

    def get(self, scan: str, vp: str) -> ObjectFeatures:
        key = feature_key(scan, vp)
        hit = self._f.cached(key)
        if hit is not None:
            return hit
        dim = self.dim
        h5 = self._f.file()
        if key not in h5:
            if self.strict:
                raise MissingFeatureError(f"{self.path} has no object features for key {key!r}")
            return self._empty()
        obj = h5[key]
        if isinstance(obj, h5py.Group):
            if "fts" not in obj:
                raise DataError(f"{self.path}: group {key!r} has no 'fts' dataset")
            raw = obj["fts"][()]
            meta = {k: obj[k][()] for k in list(_OBJ_FIELDS) + ["names"] if k in obj}
        else:
            raw = obj[()]
            meta = {k: v for k, v in obj.attrs.items()}
        raw = np.asarray(raw)
        _require_numbers(self.path, key, raw)
        if raw.ndim != 2 or raw.shape[1] not in (dim, dim + NUM_CLASSES):
            raise DataError(f"{self.path}: key {key!r} has shape {raw.shape}; expected (K, {dim}) "
                            f"or (K, {dim + NUM_CLASSES})")
        k = raw.shape[0]
        fts = np.ascontiguousarray(raw[:, :dim], dtype=np.float32)
        _require_finite(self.path, key, fts, "object(s)")

        def field(name: str, shape: tuple[int, ...], dtype: type, fill: float = 0) -> np.ndarray:
            if name not in meta:
                return np.full(shape, fill, dtype=dtype)
            src = np.asarray(meta[name])
            if src.dtype.kind == "f":  # before a cast to int, which would turn NaN into any number
                _require_finite(self.path, key, src, "object(s)", f"values of attribute {name!r}")
            try:
                arr = np.asarray(src, dtype=dtype)
            except (ValueError, TypeError, OverflowError):
                raise DataError(f"{self.path}: {key!r} attribute {name!r} holds {src.dtype} values that are not "
                                "numbers") from None
            _require_finite(self.path, key, arr, "object(s)", f"values of attribute {name!r}")
            if arr.size == 0 and k == 0:
                return np.zeros(shape, dtype)
            if arr.shape != shape:
                raise DataError(f"{self.path}: {key!r} attribute {name!r} has shape {arr.shape}, expected {shape}")
            return arr

        class_probs = softmax(raw[:, dim:]) if raw.shape[1] > dim else None
        if class_probs is not None:
            _require_finite(self.path, key, class_probs, "object(s)", "class probabilities (from its logits)")
        names = meta.get("names")
        value = ObjectFeatures(
            fts=fts,
            obj_ids=field("obj_ids", (k,), np.int64, -1),
            directions=field("directions", (k, 2), np.float32),
            sizes=field("sizes", (k, 2), np.float32),
            bboxes=field("bboxes", (k, 4), np.float32),
            view_ids=field("view_ids", (k,), np.int64, -1),
            names=_attr(np.asarray(names)) if names is not None else None,
            class_probs=class_probs,
        )
        self._f.remember(key, value)
        return value

    def cache_info(self) -> dict[str, int]:
        return {"size": self._f.cache_len(), "max": self._f.cache_size, "hits": self._f.hits,
                "misses": self._f.misses}

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> ObjectFeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- writers ---------------------------------------------------------------------------------------
class _GuardedFile(io.RawIOBase):
    """The file an HDF5 writer writes through (h5py's file-object driver).

    HDF5 copes badly with a failed write (a full disk): the errors surface in deallocators, where
    Python can only print them (thousands of lines of tracebacks), writing goes on, and closing the
    file can crash the process.  So the first failed write is recorded in :attr:`error`, it and every
    later write are reported to HDF5 as done (nothing more is written), and the writer checks
    :attr:`error` after each entry and stops with one clean error.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._f = open(path, "w+b", buffering=0)
        self.error: OSError | None = None
        self.size = 0  # bytes in the file (the highest offset written)

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._f.readinto(buffer)

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if self.error is None:
            try:
                pos = self._f.tell()
                written = 0
                while written < n:  # a raw write may be short
                    written += self._f.write(memoryview(data).cast("B")[written:])
                self.size = max(self.size, pos + n)
            except OSError as exc:
                self.error = exc
        return n

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def truncate(self, size: int | None = None) -> int:
        size = self._f.tell() if size is None else size
        if self.error is None:
            try:
                self._f.truncate(size)
            except OSError as exc:
                self.error = exc
        return size

    def flush(self) -> None:
        return None  # unbuffered; sync() makes the data durable

    def sync(self) -> None:
        if self.error is None:
            try:
                os.fsync(self._f.fileno())
            except OSError as exc:
                self.error = exc

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        super().close()


class _AtomicH5Writer:
    """Writes an HDF5 file beside ``path`` and renames it into place on a clean ``close()``.

    A failed write (disk full, read-only file system) stops the writer with one
    :class:`~minivln.paths.WriteError` naming ``path``, the cause and, when the disk is full, the space
    needed (``expected_bytes``, when the caller knows it) and left; the temporary file is removed and
    an existing ``path`` stays as it was.
    """

    def __init__(self, path: str | os.PathLike, attrs: dict[str, Any], expected_bytes: int | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self.expected_bytes = expected_bytes
        if self.path.is_dir():
            raise WriteError(f"cannot write {self.path}: it is a directory")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._raw = _GuardedFile(self.tmp)
        except OSError as exc:
            raise write_error(exc, self.path) from exc
        self.h5: h5py.File | None = None
        try:
            with self._writing():
                self.h5 = h5py.File(self._raw, "w")
                for k, v in attrs.items():
                    if v is not None:
                        self.h5.attrs[k] = v
        except BaseException:
            self.abort()
            raise
        self.count = 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Around every write: a failed write becomes one :class:`WriteError` (the file is dropped)."""
        try:
            yield
        except (OSError, RuntimeError):
            if self._raw.error is None:  # not a write that failed: a real error, reported as it is
                raise
        if self._raw.error is not None:
            raise self._failed()

    def _failed(self) -> WriteError:
        exc = self._raw.error
        written = self._raw.size
        self.abort()  # frees the space before it is measured
        code = error_number(exc)
        if code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)):
            free = free_bytes(self.path.parent)
            need = (f"it needs about {format_bytes(self.expected_bytes)}" if self.expected_bytes
                    else f"it had written {format_bytes(written)}")
            left = f", {format_bytes(free)} left" if free is not None else ""
            cause = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
            message = f"cannot write {self.path}: {cause} ({need}{left}); the temporary file was removed"
        else:
            message = f"cannot write {self.path}: {describe_os_error(exc, self.path.parent)}"
        return WriteError(message, code)

    def close(self) -> None:
        """Finish: flush, close and rename the temporary file to the target."""
        if self.h5:
            with self._writing():
                self.h5.close()
                self._raw.sync()
            self._raw.close()
            try:
                os.replace(self.tmp, self.path)
            except OSError as exc:
                self.tmp.unlink(missing_ok=True)
                raise write_error(exc, self.path) from exc

    def abort(self) -> None:
        """Drop everything written: the target is left as it was."""
        try:
            if self.h5:
                try:
                    self.h5.close()  # after a failed write the guard swallows what closing writes
                except (OSError, RuntimeError, ValueError):
                    self.h5 = None  # the file is being discarded: nothing of it is kept
        finally:
            self._raw.close()
            self.tmp.unlink(missing_ok=True)


class FeatureWriter(_AtomicH5Writer):
    """Write view features ``(36, dim)`` per viewpoint, atomically.

    ``class_layout``: "none"; "separate" (a ``class_probs/{key}`` dataset of probabilities, compact);
    or "concat" (the community 768+1000 layout: log-probabilities appended as logits).
    ``standin`` must be given explicitly: True for anything not computed from real images.
    ``compress``: store the features gzip-compressed (byte-shuffled, lossless; about 0.6x the size for
    stand-in features, whose empty views are zeros; reads go through h5py instead of one ``preadv``).
    """

    def __init__(self, path: str | os.PathLike, *, dim: int, standin: bool, description: str,
                 class_layout: str = "none", class_names: list[str] | None = None,
                 dtype: str = "float16", attrs: dict[str, Any] | None = None, expected_bytes: int | None = None,
                 compress: bool = False):
        if class_layout not in CLASS_LAYOUTS:
            raise ValueError(f"class_layout must be one of {CLASS_LAYOUTS}, got {class_layout!r}")
        if class_layout == "concat" and class_names is not None and len(class_names) != NUM_CLASSES:
            raise ValueError(f"the concat layout needs exactly {NUM_CLASSES} classes, got {len(class_names)}")
        self.dim = int(dim)
        self.class_layout = class_layout
        self.num_classes = len(class_names) if class_names is not None else NUM_CLASSES
        self.dtype = np.dtype(dtype)
        self.filters = {"compression": "gzip", "compression_opts": 1, "shuffle": True} if compress else {}
        base = {
            "standin": bool(standin),
            "description": description,
            "feature_dim": self.dim,
            "num_views": NUM_VIEWS,
            "class_layout": class_layout,
            "num_classes": self.num_classes if class_layout != "none" else 0,
            "class_names": np.array(class_names, dtype=h5py.string_dtype()) if class_names else None,
        }
        super().__init__(path, {**base, **(attrs or {})}, expected_bytes)
        self._classes = None
        if class_layout == "separate":
            with self._writing():
                self._classes = self.h5.create_group(CLASS_GROUP)

    def add(self, scan: str, vp: str, fts: np.ndarray, class_probs: np.ndarray | None = None) -> None:
        key = feature_key(scan, vp)
        fts = np.asarray(fts)
        if fts.shape != (NUM_VIEWS, self.dim):
            raise DataError(f"features for {key} have shape {fts.shape}; expected ({NUM_VIEWS}, {self.dim})")
        if not np.isfinite(fts).all():
            raise DataError(f"features for {key} are not finite")
        if self.class_layout != "none":
            if class_probs is None or class_probs.shape != (NUM_VIEWS, self.num_classes):
                got = None if class_probs is None else class_probs.shape
                raise DataError(f"class distribution for {key} has shape {got}; "
                                f"expected ({NUM_VIEWS}, {self.num_classes})")
        with self._writing():
            if self.class_layout == "concat":
                data = np.concatenate([fts.astype(np.float32), probs_to_logits(class_probs)], axis=1)
                self.h5.create_dataset(key, data=data.astype(self.dtype), **self.filters)
            else:
                self.h5.create_dataset(key, data=fts.astype(self.dtype), **self.filters)
            if self._classes is not None:
                self._classes.create_dataset(key, data=np.asarray(class_probs, np.float16), compression="lzf")
        self.count += 1

    @staticmethod
    def estimate_bytes(viewpoints: int, dim: int, class_layout: str = "separate", dtype: str = "float16") -> int:
        """About how large a file of ``viewpoints`` entries will be: the features exactly, the
        (compressed) class distributions and HDF5's own records estimated (about 5 KB per viewpoint
        with ``separate``; 4.7 KB in the real stand-in file)."""
        width = dim + (NUM_CLASSES if class_layout == "concat" else 0)
        per_vp = NUM_VIEWS * width * np.dtype(dtype).itemsize + 512 + (4608 if class_layout == "separate" else 0)
        return viewpoints * per_vp + 2**20


class ObjectFeatureWriter(_AtomicH5Writer):
    """Write per-viewpoint object features in the VLN-DUET REVERIE layout, atomically."""

    def __init__(self, path: str | os.PathLike, *, dim: int, standin: bool, description: str,
                 dtype: str = "float16", attrs: dict[str, Any] | None = None, expected_bytes: int | None = None):
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        base = {"standin": bool(standin), "description": description, "feature_dim": self.dim}
        super().__init__(path, {**base, **(attrs or {})}, expected_bytes)

    def add(self, scan: str, vp: str, objs: ObjectFeatures) -> None:
        key = feature_key(scan, vp)
        k = len(objs.obj_ids)
        if objs.fts.shape != (k, self.dim):
            raise DataError(f"object features for {key} have shape {objs.fts.shape}; expected ({k}, {self.dim})")
        with self._writing():
            ds = self.h5.create_dataset(key, data=np.asarray(objs.fts).astype(self.dtype))
            ds.attrs["obj_ids"] = np.asarray(objs.obj_ids, np.int64)
            ds.attrs["directions"] = np.asarray(objs.directions, np.float32).reshape(k, 2)
            ds.attrs["sizes"] = np.asarray(objs.sizes, np.float32).reshape(k, 2)
            ds.attrs["bboxes"] = np.asarray(objs.bboxes, np.float32).reshape(k, 4)
            ds.attrs["view_ids"] = np.asarray(objs.view_ids, np.int64)
            if objs.names is not None:
                ds.attrs["names"] = np.array(objs.names, dtype=h5py.string_dtype())
        self.count += 1
