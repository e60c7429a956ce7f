"""Ingest at scale, cold and incremental (issue 20, item 4).

    .venv/bin/python benchmarks/ingest_scale.py                 # 1,000,000 rows in 20 files
    .venv/bin/python benchmarks/ingest_scale.py --rows 50000    # a quick check
    .venv/bin/python benchmarks/ingest_scale.py --check         # and a full ingest without the cache

Corpus: the 73,889 records of ../shared/data/*.jsonl repeated until ``--rows``; copy c > 0 of a
record gets ``-r<c>`` appended to its ``id`` and `` (v<c>)`` to its ``instruction``, so every copy
is a new uid and a new id. Written as ``--files`` JSON-lines files of equal size into a temporary
folder (``--tmp``; removed at the end unless ``--keep``), never into the repository.

Phases, each in a fresh Python process (so each peak RSS is its own), all with the pipeline's
tokenizer (the built-in tiny Llama's) and ``CorpusConfig(max_tokens=--max-tokens)``:

1. ``cold``: ingest with an empty ingest cache (every file read, tokenized and cached);
2. ``warm``: the same corpus again (every file hashed, none read);
3. ``grown``: one more file of ``rows / files`` new records (one file read);
4. ``scratch`` (``--check`` only): the grown corpus without a cache; its records.parquet and
   quarantine.parquet must be byte for byte those of ``grown``.

Prints one row per phase: files read / reused, rows in and kept, wall seconds, the process's
peak RSS (``resource.getrusage``, MiB) and its RSS before ingest started (imports and tokenizer),
then the sizes of the corpus, the cache and records.parquet, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("cold", "warm", "grown")


def _rss_mib() -> float:
    """This process's peak RSS so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _source_rows(data: Path) -> list[bytes]:
    rows = [line for path in sorted(data.glob("*.jsonl")) for line in path.read_bytes().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"no *.jsonl rows under {data} (set --data or SPICE_SHARED)")
    return rows


def _copies(source: list[bytes], start: int, n: int) -> Iterator[bytes]:
    """Rows ``start`` .. ``start + n`` of the endless sequence of source copies."""
    for i in range(start, start + n):
        line = source[i % len(source)]
        c = i // len(source)
        if c == 0:
            yield line
            continue
        row = json.loads(line)
        if isinstance(row.get("id"), str | int):
            row["id"] = f"{row['id']}-r{c}"
        if isinstance(row.get("instruction"), str):
            row["instruction"] = f"{row['instruction']} (v{c})"
        yield json.dumps(row, ensure_ascii=False).encode()


def _write_file(path: Path, rows: Iterator[bytes]) -> None:
    with path.open("wb") as fh:
        for line in rows:
            fh.write(line + b"\n")


def build_corpus(data: Path, folder: Path, rows: int, files: int) -> int:
    """``files`` files of ``rows`` rows in all into ``folder``; returns the rows per file."""
    source = _source_rows(data)
    folder.mkdir(parents=True)
    per_file = -(-rows // files)
    for f in range(files):
        start = f * per_file
        _write_file(folder / f"part-{f:03d}.jsonl", _copies(source, start, max(0, min(per_file, rows - start))))
    return per_file


def grow_corpus(data: Path, folder: Path, rows: int, files: int, per_file: int) -> None:
    _write_file(folder / f"part-{files:03d}.jsonl", _copies(_source_rows(data), rows, per_file))


# ------------------------------------------------------------------------------------ one phase


def run_phase(args: argparse.Namespace) -> None:
    """One ingest in this process; prints its figures as one JSON line."""
    from spice_ray.config import CorpusConfig
    from spice_ray.corpus import ingest
    from spice_ray.corpus.ingest_cache import IngestCache
    from spice_ray.models import load_tokenizer, tokenizer_fingerprint

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tokenizer = load_tokenizer(args.tokenizer)
    cache = None if args.phase == "scratch" else IngestCache(args.cache, tokenizer_fingerprint(args.tokenizer))
    before = _rss_mib()
    start = time.perf_counter()
    result = ingest(CorpusConfig(max_tokens=args.max_tokens), tokenizer, args.out, inputs=[args.corpus], cache=cache)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "phase": args.phase, "files_read": result.files_read, "files_reused": result.files_reused,
        "n_in": result.n_in, "n_kept": result.n_kept, "reasons": result.reasons, "seconds": round(seconds, 2),
        "peak_rss_mib": round(_rss_mib()), "rss_before_mib": round(before),
    }))


# ------------------------------------------------------------------------------------------ driver


def _phase(args: argparse.Namespace, phase: str, tmp: Path, tokenizer: Path) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--corpus", str(tmp / "corpus"), "--cache", str(tmp / "cache"),
           "--out", str(tmp / f"out-{phase}"), "--tokenizer", str(tokenizer), "--max-tokens", str(args.max_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{proc.stderr[-3000:]}")
    sys.stderr.write(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _size_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def _same_outputs(a: Path, b: Path) -> bool:
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in ("records.parquet", "quarantine.parquet"))


def _print_table(rows: list[dict]) -> None:
    print(f"{'phase':<8} {'read':>5} {'reused':>6} {'rows in':>10} {'kept':>10} {'seconds':>8} {'peak RSS':>9} {'before':>7}")
    for r in rows:
        print(f"{r['phase']:<8} {r['files_read']:>5} {r['files_reused']:>6} {r['n_in']:>10,} {r['n_kept']:>10,} "
              f"{r['seconds']:>8.1f} {r['peak_rss_mib']:>5} MiB {r['rss_before_mib']:>3} MiB")


def drive(args: argparse.Namespace) -> None:
    from spice_ray.models import materialize_builtin

    tmp = Path(tempfile.mkdtemp(prefix="ingest-scale-", dir=args.tmp))
    try:
        tokenizer = materialize_builtin("builtin:tiny-llama", tmp / "tokenizer")
        start = time.perf_counter()
        per_file = build_corpus(args.data, tmp / "corpus", args.rows, args.files)
        print(f"corpus: {args.rows:,} rows in {args.files} files of {per_file:,}, {_size_mib(tmp / 'corpus'):.0f} MiB, "
              f"built in {time.perf_counter() - start:.1f}s under {tmp}; load average {os.getloadavg()[0]:.2f}",
              flush=True)
        rows = [_phase(args, "cold", tmp, tokenizer), _phase(args, "warm", tmp, tokenizer)]
        grow_corpus(args.data, tmp / "corpus", args.rows, args.files, per_file)
        rows.append(_phase(args, "grown", tmp, tokenizer))
        if args.check:
            rows.append(_phase(args, "scratch", tmp, tokenizer))
        _print_table(rows)
        sizes = {"corpus_mib": round(_size_mib(tmp / "corpus")), "cache_mib": round(_size_mib(tmp / "cache")),
                 "records_mib": round(_size_mib(tmp / "out-grown" / "records.parquet"))}
        print(f"sizes: corpus {sizes['corpus_mib']} MiB, ingest cache {sizes['cache_mib']} MiB, "
              f"records.parquet {sizes['records_mib']} MiB; load average {os.getloadavg()[0]:.2f}")
        if args.check:
            same = _same_outputs(tmp / "out-grown", tmp / "out-scratch")
            print(f"grown (incremental) == scratch (no cache), byte for byte: {same}")
            if not same:
                raise SystemExit(1)
        print(json.dumps({"rows": args.rows, "files": args.files, "phases": rows, **sizes}))
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    from spice_ray.testing import SHARED_DATA

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--data", type=Path, default=SHARED_DATA)
    p.add_argument("--tmp", default=None, help="parent folder of the temporary corpus, cache and outputs")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--check", action="store_true", help="also ingest the grown corpus without a cache and compare")
    p.add_argument("--phase", choices=(*PHASES, "scratch"), help=argparse.SUPPRESS)
    for name in ("--corpus", "--cache", "--out", "--tokenizer"):
        p.add_argument(name, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        run_phase(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
