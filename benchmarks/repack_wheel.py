"""Repack a wheel without some of its directories (e.g. ray's ``ray/jars``, ~31 MiB of Java).

    python benchmarks/repack_wheel.py WHEEL --drop ray/jars [--drop PREFIX ...] [-o OUT_DIR]

Copies every other entry unchanged (data, timestamps, permissions: ray's binaries stay
executable), drops the dropped files' lines from ``*.dist-info/RECORD``, and checks that each kept
file's sha256 still matches its RECORD line, so pip installs the result as a valid wheel. Writes to
``OUT_DIR`` (default: replace WHEEL in place, through a temp file).
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import sys
import tempfile
import zipfile


def _record_name(names: list[str]) -> str:
    records = [n for n in names if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
    if len(records) != 1:
        raise SystemExit(f"expected one top-level *.dist-info/RECORD, found {records}")
    return records[0]


def _dropped(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p.rstrip("/") + "/") for p in prefixes)


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _new_record(text: str, prefixes: list[str]) -> tuple[str, dict[str, str], int]:
    """RECORD without the dropped paths; the kept paths' hashes; how many lines were dropped."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    hashes: dict[str, str] = {}
    dropped = 0
    for row in csv.reader(io.StringIO(text)):
        if not row:
            continue
        if _dropped(row[0], prefixes):
            dropped += 1
            continue
        writer.writerow(row)
        if len(row) > 1 and row[1]:
            hashes[row[0]] = row[1]
    return out.getvalue(), hashes, dropped


def repack(wheel: str, prefixes: list[str], out_dir: str | None = None) -> str:
    """Write the wheel without ``prefixes``; returns the new path."""
    with zipfile.ZipFile(wheel) as src:
        infos = src.infolist()
        record = _record_name([i.filename for i in infos])
        text, hashes, n_dropped = _new_record(src.read(record).decode(), prefixes)
        target_dir = out_dir or os.path.dirname(os.path.abspath(wheel))
        os.makedirs(target_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".whl", dir=target_dir)
        os.close(fd)
        os.chmod(tmp, 0o644)
        kept = 0
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as dst:
                for info in infos:
                    if _dropped(info.filename, prefixes):
                        continue
                    data = text.encode() if info.filename == record else src.read(info)
                    want = hashes.get(info.filename)
                    if want is not None and want != _digest(data):
                        raise SystemExit(f"{info.filename}: sha256 does not match RECORD")
                    info.compress_type = zipfile.ZIP_DEFLATED
                    dst.writestr(info, data)
                    kept += 1
            path = os.path.join(target_dir, os.path.basename(wheel))
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    print(f"repacked {os.path.basename(wheel)}: dropped {n_dropped} files under {', '.join(prefixes)}, kept {kept}",
          file=sys.stderr)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("wheel")
    ap.add_argument("--drop", action="append", required=True, help="a path prefix inside the wheel (repeatable)")
    ap.add_argument("-o", "--out-dir", default=None, help="where to write (default: in place)")
    args = ap.parse_args()
    print(repack(args.wheel, args.drop, args.out_dir))


if __name__ == "__main__":
    main()
