"""Write minivln/data/manifest.json.gz: size and sha256 prefix of every public data file.

Run on a verified copy of the public release:  python scripts/make_manifest.py ../shared/data
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

from minivln.data.download import MANIFEST, manifest_groups


def main(root: str) -> None:
    base = Path(root)
    files = []
    for group, pattern in manifest_groups():
        for path in sorted(base.glob(pattern)):
            data = path.read_bytes()
            files.append([group, str(path.relative_to(base)), len(data), hashlib.sha256(data).hexdigest()[:16]])
    payload = json.dumps({"version": 1, "files": files}, separators=(",", ":")).encode()
    MANIFEST.write_bytes(gzip.compress(payload, mtime=0))
    print(f"{len(files)} files -> {MANIFEST}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
