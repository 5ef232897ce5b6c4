"""Repack a wheel with only the native libraries whose names match a pattern (tools/gpu_wheelhouse.sh).

bitsandbytes ships one CUDA library per CUDA release (~40 MB compressed); the GPU image runs CUDA 13, so
the others only weigh down the carry to the device. The RECORD is rewritten for what is kept.

    python tools/slim_wheel.py IN.whl OUT_DIR 'libbitsandbytes_(cpu|cuda13)'
"""

import base64
import hashlib
import re
import sys
import zipfile
from pathlib import Path


def slim(src: Path, out_dir: Path, keep: str) -> Path:
    pattern = re.compile(keep)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / src.name
    kept, dropped, rows, record = [], [], [], None
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            name = info.filename
            if name.endswith(".dist-info/RECORD"):
                record = name
                continue
            if name.endswith(".so"):
                (kept if pattern.search(name) else dropped).append(name)
                if not pattern.search(name):
                    continue
            data = zin.read(name)
            zout.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{name},sha256={digest},{len(data)}")
        if record is None:
            raise SystemExit(f"{src}: no .dist-info/RECORD: not a wheel")
        if not kept:
            raise SystemExit(f"{src}: no native library matches {keep!r}; kept none of {len(dropped)}")
        zout.writestr(record, "\n".join(rows + [f"{record},,"]) + "\n")
    print(f"{dst.name}: {src.stat().st_size / 2**20:.1f} -> {dst.stat().st_size / 2**20:.1f} MiB; "
          f"kept {', '.join(Path(k).name for k in kept)}; dropped {len(dropped)} libraries")
    return dst


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    slim(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
