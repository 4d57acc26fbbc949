"""``minivln download``: fetch the public navigation data into a data directory.

Sources (official locations of the public releases):

* connectivity graphs: the Matterport3DSimulator repository, folder ``connectivity/``;
* R2R: the files the simulator's ``tasks/R2R/data/download.sh`` fetches;
* REVERIE: the REVERIE repository, ``tasks/REVERIE/data_v2/`` (instructions) and
  ``tasks/REVERIE/data/BBox/`` (objects per viewpoint).

Every file is checked against the size and SHA-256 prefix recorded in ``manifest.json.gz`` and
written through a temporary file and a rename, so a data directory never holds a half-written or
unverified file.  Files already present and valid are skipped, so an interrupted download resumes.
``--mirror`` takes a URL prefix or a local directory with the same layout as a data directory.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from minivln.paths import DataError, atomic_write_bytes

MANIFEST = Path(__file__).with_name("manifest.json.gz")

_SIM = "https://raw.githubusercontent.com/peteanderson80/Matterport3DSimulator/master"
_R2R = "https://storage.googleapis.com/bringmeaspoon/R2Rdata"
_REVERIE = "https://raw.githubusercontent.com/YuankaiQi/REVERIE/master/tasks/REVERIE"

GROUPS = ("connectivity", "r2r", "reverie", "bbox")


def manifest_groups() -> list[tuple[str, str]]:
    """(group, glob pattern relative to the data directory) for every file we distribute."""
    return [
        ("connectivity", "connectivity/*"),
        ("r2r", "R2R/R2R_*.json"),
        ("reverie", "REVERIE/REVERIE_*.json"),
        ("bbox", "REVERIE/BBox/*.json"),
    ]


def official_url(rel: str) -> str:
    """Official download address of a file given its path inside the data directory."""
    name = rel.rsplit("/", 1)[-1]
    if rel.startswith("connectivity/"):
        return f"{_SIM}/connectivity/{name}"
    if rel.startswith("R2R/"):
        return f"{_R2R}/{name}"
    if rel.startswith("REVERIE/BBox/"):
        return f"{_REVERIE}/data/BBox/{name}"
    if rel.startswith("REVERIE/"):
        return f"{_REVERIE}/data_v2/{name}"
    raise ValueError(f"no official location for {rel}")


@dataclass(frozen=True)
class FileSpec:
    group: str
    rel: str
    size: int
    sha256_prefix: str

    def matches(self, data: bytes) -> bool:
        return len(data) == self.size and hashlib.sha256(data).hexdigest().startswith(self.sha256_prefix)


def load_manifest() -> list[FileSpec]:
    payload = json.loads(gzip.decompress(MANIFEST.read_bytes()))
    return [FileSpec(*row) for row in payload["files"]]


def _fetch(spec: FileSpec, mirror: str | None, timeout: float) -> bytes:
    if mirror and not mirror.startswith(("http://", "https://", "file://")):
        src = Path(mirror) / spec.rel
        if not src.is_file():
            raise DataError(f"{spec.rel}: not found in mirror {mirror}")
        return src.read_bytes()
    url = f"{mirror.rstrip('/')}/{spec.rel}" if mirror else official_url(spec.rel)
    req = urllib.request.Request(url, headers={"User-Agent": "minivln-download"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()
    except OSError as exc:
        raise DataError(f"{spec.rel}: download from {url} failed ({exc})") from exc


def _present_and_valid(path: Path, spec: FileSpec) -> bool:
    return path.is_file() and path.stat().st_size == spec.size and spec.matches(path.read_bytes())


def download(
    data_dir: str | os.PathLike,
    mirror: str | None = None,
    only: tuple[str, ...] = GROUPS,
    workers: int = 8,
    timeout: float = 60.0,
    progress: bool = True,
) -> dict[str, int]:
    """Fetch and verify every manifest file of the groups in ``only``; return counts."""
    unknown = set(only) - set(GROUPS)
    if unknown:
        raise DataError(f"unknown data group(s) {sorted(unknown)}; expected some of {GROUPS}")
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    specs = [s for s in load_manifest() if s.group in only]
    counts = {"fetched": 0, "present": 0, "failed": 0}
    errors: list[str] = []

    def work(spec: FileSpec) -> str:
        target = root / spec.rel
        if _present_and_valid(target, spec):
            return "present"
        data = _fetch(spec, mirror, timeout)
        if not spec.matches(data):
            raise DataError(
                f"{spec.rel}: checksum mismatch (got {len(data)} bytes, sha256 "
                f"{hashlib.sha256(data).hexdigest()[:16]}; expected {spec.size} bytes, {spec.sha256_prefix})"
            )
        atomic_write_bytes(target, data)
        return "fetched"

    bar = None
    if progress:

        bar = tqdm(total=len(specs), desc="download", unit="file")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(work, s) for s in specs]
        for fut in futures:
            try:
                counts[fut.result()] += 1
            except DataError as exc:
                counts["failed"] += 1
                errors.append(str(exc))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if errors:
        shown = "\n  ".join(errors[:10])
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DataError(f"{len(errors)} of {len(specs)} files failed (nothing invalid was written):\n  {shown}{more}")
    return counts


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="fetch and verify the public connectivity, R2R and REVERIE files")
    p.add_argument("--data-dir", required=True, help="directory to fill (created if needed)")
    p.add_argument("--mirror", default=None, help="URL prefix or directory with the data-directory layout")
    p.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS), help="file groups to fetch")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    counts = download(args.data_dir, args.mirror, tuple(args.only), args.workers, progress=not args.no_progress)
    print(f"{counts['fetched']} fetched, {counts['present']} already present and valid -> {args.data_dir}")
    return 0


__all__ = ["download", "load_manifest", "official_url", "FileSpec"]
