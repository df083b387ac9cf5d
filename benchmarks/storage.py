"""Storage benchmark: how many bits a token costs on disk, and how fast a whole grid loads.

    python benchmarks/storage.py [--out DIR] [--tokens PATH.npy] [--codebook-size K]

Without --tokens it uses a seeded, skewed synthetic stream: 10,000 x 7 x 7 codes, K = 512,
drawn from a Zipf(s=1) distribution over a random permutation of the codebook (real VQ
codebooks have no reason to put frequent codes at small indices, and that matters to
byte-wise coders). Targets from the issue: Parquet <= 1.15x the order-0 entropy in bits per
token, and load_grid <= 2x np.load of the same uint16 array.

The candidates (codes encoding x zstd level x row-group size for Parquet, gzip level for
HDF5) pick the writers' defaults: the smallest file among those that write at least
--min-write-mtok million tokens per second (the fastest writer when none does). The floor is
high because an incremental update rewrites every shard it touches, kept rows and all, on
every scheduled run: the writer must cost little next to encoding the few new images.
The last line printed is one JSON object with every figure; OUT/storage_benchmark.json too.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from vqtok.storage import HDF5TokenWriter, ParquetTokenWriter, TokenMeta, load_grid
from vqtok.storage.hdf5 import DEFAULT_GZIP_LEVEL
from vqtok.storage.parquet import (
    CODES_LEAF,
    DEFAULT_ROW_GROUP_TOKENS,
    DEFAULT_ZSTD_LEVEL,
    parquet_write_options,
)

ENCODINGS = ("dictionary", "byte_stream_split", "plain")
ZSTD_LEVELS = (1, 3, 6, 9, 12, 16, 19)
ROW_GROUPS = (1024, 4096, 16384)
GZIP_LEVELS = (1, 4, 6, 9)
SHORT = {"dictionary": "dict", "byte_stream_split": "bss", "plain": "plain"}


@dataclass
class Candidate:
    """One way of writing the same tokens, and what it measured."""

    fmt: str
    label: str
    options: dict[str, Any]
    path: Path | None = None
    bytes: int = 0
    bits_per_token: float = 0.0
    x_entropy: float = 0.0
    codes_bits_per_token: float | None = None
    row_groups: int | None = None
    encoding_used: str | None = None
    write_mtok_s: float = 0.0
    load_ms: list[float] = field(default_factory=list)

    @property
    def load_median(self) -> float:
        return statistics.median(self.load_ms)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        del data["path"]
        data["load_ms"] = round(self.load_median, 3) if self.load_ms else None
        for key in ("bits_per_token", "x_entropy", "codes_bits_per_token", "write_mtok_s"):
            if data[key] is not None:
                data[key] = round(data[key], 4)
        return data


@dataclass
class Tokens:
    codes: np.ndarray
    labels: np.ndarray
    codebook: int
    source: str

    @property
    def count(self) -> int:
        return int(self.codes.size)


def synthetic_tokens(rows: int, codebook: int, zipf_s: float, seed: int) -> Tokens:
    rng = np.random.default_rng(seed)
    probs = 1.0 / np.arange(1, codebook + 1) ** zipf_s
    probs /= probs.sum()
    order = rng.permutation(codebook)
    codes = order[rng.choice(codebook, size=(rows, 7, 7), p=probs)].astype(np.int64)
    labels = rng.integers(0, 10, rows)  # MNIST-like class labels: they cost bits too
    return Tokens(codes, labels, codebook, f"synthetic permuted Zipf(s={zipf_s}) seed {seed}")


def real_tokens(path: Path, codebook: int | None) -> Tokens:
    codes = np.load(path)
    if codes.ndim != 3 or not np.issubdtype(codes.dtype, np.integer):
        raise SystemExit(
            f"{path}: expected an (N, h, w) integer array, got {codes.shape} {codes.dtype}"
        )
    codes = codes.astype(np.int64)
    return Tokens(codes, np.full(len(codes), -1), codebook or int(codes.max()) + 1, str(path))


def order0_entropy(codes: np.ndarray) -> float:
    counts = np.bincount(codes.reshape(-1))
    probs = counts[counts > 0] / codes.size
    return float(-(probs * np.log2(probs)).sum())


def column_bytes(path: Path) -> dict[str, int]:
    """Compressed bytes per column over all row groups, plus footer and magic."""
    metadata = pq.ParquetFile(path).metadata
    sizes: dict[str, int] = {}
    for group in range(metadata.num_row_groups):
        for index in range(metadata.num_columns):
            chunk = metadata.row_group(group).column(index)
            name = chunk.path_in_schema
            sizes[name] = sizes.get(name, 0) + chunk.total_compressed_size
    sizes["footer+magic"] = path.stat().st_size - sum(sizes.values())
    return sizes


def write_candidate(cand: Candidate, work: Path, meta: TokenMeta, tokens: Tokens, H: float) -> None:
    suffix = ".parquet" if cand.fmt == "parquet" else ".h5"
    cand.path = work / f"{cand.fmt}-{len(list(work.iterdir()))}{suffix}"
    writer_cls = ParquetTokenWriter if cand.fmt == "parquet" else HDF5TokenWriter
    ids = np.arange(len(tokens.codes))
    seconds = []
    for _ in range(3):  # best of three: the machine is shared, the minimum is the cost
        start = time.perf_counter()
        with writer_cls(cand.path, meta, **cand.options) as writer:
            for first in range(0, len(ids), 1000):
                rows = slice(first, first + 1000)
                writer.write(tokens.codes[rows], ids[rows], tokens.labels[rows], "train")
        seconds.append(time.perf_counter() - start)
    cand.write_mtok_s = tokens.count / min(seconds) / 1e6
    cand.bytes = cand.path.stat().st_size
    cand.bits_per_token = cand.bytes * 8 / tokens.count
    cand.x_entropy = cand.bits_per_token / H
    if cand.fmt == "parquet":
        cand.codes_bits_per_token = column_bytes(cand.path)[CODES_LEAF] * 8 / tokens.count
        cand.row_groups = pq.ParquetFile(cand.path).metadata.num_row_groups
        cand.encoding_used = writer.codes_encoding_used


def interleaved(loaders: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Each repetition runs every loader once, so drift on a shared machine hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for load in loaders.values():
        load()  # warm the page cache
    gc.collect()
    gc.disable()
    try:
        for _ in range(reps):
            for name, load in loaders.items():
                start = time.perf_counter()
                load()
                times[name].append((time.perf_counter() - start) * 1000)
    finally:
        gc.enable()
    return times


def pick(cands: list[Candidate], min_write: float) -> Candidate:
    """Smallest file among those fast enough to write; exact ties go to the faster writer.

    Load time is no criterion: every Parquet option loads within noise of the others (the
    table shows it), and a noisy tie-break would make the pick jump between runs.
    """
    fast = [c for c in cands if c.write_mtok_s >= min_write]
    if not fast:
        return max(cands, key=lambda c: c.write_mtok_s)
    return min(fast, key=lambda c: (round(c.bits_per_token, 3), -c.write_mtok_s))


def flat_codes_bits(codes: np.ndarray, encoding: str, work: Path) -> float:
    """The codes as a flat uint16 column: the difference to the list column is its levels."""
    path = work / "flat.parquet"
    options = parquet_write_options(encoding, DEFAULT_ZSTD_LEVEL)
    options["use_dictionary"] = ["c"] if encoding == "dictionary" else []
    options["column_encoding"] = (
        {"c": "BYTE_STREAM_SPLIT"} if encoding == "byte_stream_split" else {}
    )
    # Parquet also cuts pages at 20k rows: 20k tokens for a flat column, 20k grids for the list
    # column. Lift the cap so both get ~1 MB pages and only the levels differ.
    options["max_rows_per_page"] = codes.size
    table = pa.table({"c": pa.array(codes.reshape(-1).astype(np.uint16))})
    try:
        pq.write_table(table, path, row_group_size=codes.size, **options)
    except TypeError:  # a pyarrow without max_rows_per_page
        del options["max_rows_per_page"]
        pq.write_table(table, path, row_group_size=codes.size, **options)
    return path.stat().st_size * 8 / codes.size


def uncompressed_copy(path: Path, work: Path) -> Path:
    """The same table, uncompressed and PLAIN: what any Parquet read costs at least."""
    floor = work / "floor.parquet"
    pq.write_table(pq.read_table(path), floor, compression="none", use_dictionary=False)
    return floor


def parquet_candidates(
    args: argparse.Namespace, work: Path, meta: TokenMeta, tokens: Tokens, H: float
):
    # Stage A: encoding x zstd level, at most 16k rows a row group.
    cands = [
        Candidate(
            "parquet",
            f"{enc} zstd-{lvl} rg{ROW_GROUPS[-1]}",
            {"codes_encoding": enc, "compression_level": lvl, "row_group_size": ROW_GROUPS[-1]},
        )
        for enc in ENCODINGS
        for lvl in ZSTD_LEVELS
    ]
    for cand in cands:
        write_candidate(cand, work, meta, tokens, H)
    # Stage B: smaller row groups for the smallest fast-enough stage-A setting.
    best = pick(cands, args.min_write_mtok)
    for group in ROW_GROUPS[:-1]:
        options = dict(best.options, row_group_size=group)
        label = f"{options['codes_encoding']} zstd-{options['compression_level']} rg{group}"
        cands.append(Candidate("parquet", label, options))
        write_candidate(cands[-1], work, meta, tokens, H)
    return cands


def auto_check(work: Path, rows: int, seed: int) -> list[dict[str, Any]]:
    """Why "auto": dictionary wins when <= 256 codes are in use, byte-stream-split otherwise."""
    results = []
    for used in (200, 512):
        rng = np.random.default_rng(seed + used)
        probs = 1.0 / np.arange(1, used + 1)
        probs /= probs.sum()
        values = rng.permutation(512)[:used]
        codes = values[rng.choice(used, size=(rows, 7, 7), p=probs)]
        tokens = Tokens(codes, np.full(rows, -1), 512, f"{used} of 512 codes used")
        H = order0_entropy(codes)
        meta = TokenMeta(512, 7, 7, "bench", "-", "-", "bench", created_at="0")
        row: dict[str, Any] = {"codes_used": used, "entropy_bits": round(H, 4)}
        for enc in ("dictionary", "byte_stream_split", "auto"):
            cand = Candidate("parquet", enc, {"codes_encoding": enc})
            write_candidate(cand, work, meta, tokens, H)
            row[enc] = round(cand.x_entropy, 4)
            if enc == "auto":
                row["auto_chose"] = cand.encoding_used
        results.append(row)
    return results


def print_table(rows: list[Candidate], winners: list[Candidate]) -> None:
    widths = [44, 8, 8, 6, 9, 6, 5, 10, 8]
    head = [
        "candidate",
        "bytes",
        "bits/tok",
        "x H0",
        "codes b/t",
        "groups",
        "enc",
        "write Mt/s",
        "load ms",
    ]

    def line(cells: list[Any]) -> str:
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(line(head))
    for c in rows:
        codes = "-" if c.codes_bits_per_token is None else f"{c.codes_bits_per_token:.3f}"
        print(
            line(
                [
                    f"{c.fmt} {c.label}{' *' if c in winners else ''}",
                    c.bytes,
                    f"{c.bits_per_token:.3f}",
                    f"{c.x_entropy:.3f}",
                    codes,
                    c.row_groups or "-",
                    SHORT.get(c.encoding_used or "", "-"),
                    f"{c.write_mtok_s:.2f}",
                    f"{c.load_median:.2f}",
                ]
            )
        )
    print("  * = smallest file at or above the write floor; x H0 = bits/token over the entropy\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"), help="JSON goes here")
    parser.add_argument("--tokens", type=Path, help="real tokens: an (N, h, w) integer .npy")
    parser.add_argument("--codebook-size", type=int, help="K for --tokens (default: max + 1)")
    parser.add_argument("--rows", type=int, default=10_000, help="synthetic rows")
    parser.add_argument("--zipf-s", type=float, default=1.0, help="synthetic skew")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reps", type=int, default=31, help="interleaved load repetitions")
    parser.add_argument("--min-write-mtok", type=float, default=20.0, help="write floor, Mtok/s")
    args = parser.parse_args(argv)

    if args.tokens:
        tokens = real_tokens(args.tokens, args.codebook_size)
    else:
        tokens = synthetic_tokens(args.rows, 512, args.zipf_s, args.seed)
    rows, grid_h, grid_w = tokens.codes.shape
    H = order0_entropy(tokens.codes)
    distinct = int(np.unique(tokens.codes).size)
    meta = TokenMeta(tokens.codebook, grid_h, grid_w, "bench", "-", "-", "bench", created_at="0")
    default_rows = max(1, DEFAULT_ROW_GROUP_TOKENS // (grid_h * grid_w))

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        work = Path(tmp)
        npy16, npy64 = work / "tokens_uint16.npy", work / "tokens_int64.npy"
        np.save(npy16, tokens.codes.astype(meta.codes_dtype))
        np.save(npy64, tokens.codes)

        parquet = parquet_candidates(args, work, meta, tokens, H)
        hdf5 = [
            Candidate("hdf5", f"gzip-{lvl} shuffle chunk1024", {"compression_level": lvl})
            for lvl in GZIP_LEVELS
        ]
        for cand in hdf5:
            write_candidate(cand, work, meta, tokens, H)
        default_pq = Candidate(
            "parquet", f"DEFAULT auto zstd-{DEFAULT_ZSTD_LEVEL} rg{default_rows}", {}
        )
        default_h5 = Candidate("hdf5", f"DEFAULT gzip-{DEFAULT_GZIP_LEVEL} shuffle chunk1024", {})
        for cand in (default_pq, default_h5):
            write_candidate(cand, work, meta, tokens, H)

        everything = [*parquet, *hdf5]
        loaders = {str(i): (lambda c=c: load_grid(c.path)) for i, c in enumerate(everything)}
        times = interleaved({"npy": lambda: np.load(npy16), **loaders}, max(5, args.reps // 4))
        for i, cand in enumerate(everything):
            cand.load_ms = times[str(i)]

        floor = uncompressed_copy(default_pq.path, work)
        main_times = interleaved(
            {
                "np.load uint16 .npy": lambda: np.load(npy16),
                "load_grid parquet": lambda: load_grid(default_pq.path),
                "load_grid hdf5": lambda: load_grid(default_h5.path),
                "pq.read_table parquet": lambda: pq.read_table(default_pq.path),
                "pq.read_table no-zstd": lambda: pq.read_table(floor),
            },
            args.reps,
        )
        default_pq.load_ms = main_times["load_grid parquet"]
        default_h5.load_ms = main_times["load_grid hdf5"]
        columns = column_bytes(default_pq.path)
        flat_bits = flat_codes_bits(tokens.codes, default_pq.encoding_used or "plain", work)
        auto = auto_check(work, rows, args.seed)
        npy_bytes = {"int64": npy64.stat().st_size, "uint16": npy16.stat().st_size}

    winner_pq = pick(parquet, args.min_write_mtok)
    winner_h5 = pick(hdf5, args.min_write_mtok)
    medians = {name: statistics.median(values) for name, values in main_times.items()}
    base = medians["np.load uint16 .npy"]
    per_token = {k: v * 8 / tokens.count for k, v in npy_bytes.items()}

    print(f"tokens: {tokens.source}; N={rows} grid={grid_h}x{grid_w} K={tokens.codebook}")
    print(f"distinct codes: {distinct}; order-0 entropy: {H:.4f} bits/token")
    print(
        f".npy int64: {per_token['int64']:.3f} bits/token ({npy_bytes['int64']} B); "
        f".npy uint16: {per_token['uint16']:.3f} bits/token ({npy_bytes['uint16']} B)"
    )
    print(
        f"write floor for picking defaults: {args.min_write_mtok} Mtok/s; loads from page cache\n"
    )
    print_table([*parquet, default_pq, *hdf5, default_h5], [winner_pq, winner_h5])

    print(f"where the bits of the default Parquet file go ({default_pq.bytes} B):")
    for name, size in columns.items():
        print(f"  {name:20s} {size:8d} B  {size * 8 / tokens.count:7.4f} bits/token")
    codes_bits = columns[CODES_LEAF] * 8 / tokens.count
    print(
        f"  codes as a flat uint16 column instead: {flat_bits:.4f} bits/token "
        f"(list levels cost {codes_bits - flat_bits:+.4f} bits/token)\n"
    )

    print(f"'auto' codes encoding at the default level, x entropy ({rows} x 7x7 Zipf tokens):")
    for row in auto:
        print(
            f"  {row['codes_used']:3d} of 512 codes used: dictionary {row['dictionary']:.3f}x, "
            f"byte_stream_split {row['byte_stream_split']:.3f}x, auto {row['auto']:.3f}x "
            f"(chose {row['auto_chose']})"
        )
    print()

    print(f"whole ({rows}, {grid_h}, {grid_w}) grid, median of {args.reps} interleaved loads:")
    for name, value in medians.items():
        print(f"  {name:24s} {value:8.3f} ms  {value / base:6.2f}x np.load")

    pq_x, load_x = default_pq.x_entropy, medians["load_grid parquet"] / base
    h5_load_x = medians["load_grid hdf5"] / base
    result = {
        "tokens": {
            "source": tokens.source,
            "rows": rows,
            "grid": [grid_h, grid_w],
            "codebook_size": tokens.codebook,
            "distinct": distinct,
            "entropy_bits": round(H, 4),
        },
        "npy_bits_per_token": {k: round(v, 4) for k, v in per_token.items()},
        "candidates": [c.summary() for c in everything],
        "default": {"parquet": default_pq.summary(), "hdf5": default_h5.summary()},
        "winner": {"parquet": winner_pq.label, "hdf5": winner_h5.label},
        "default_matches_winner": {
            "parquet": (default_pq.encoding_used, DEFAULT_ZSTD_LEVEL, default_pq.row_groups)
            == (
                winner_pq.encoding_used,
                winner_pq.options["compression_level"],
                winner_pq.row_groups,
            ),
            "hdf5": winner_h5.options["compression_level"] == DEFAULT_GZIP_LEVEL,
        },
        "auto_encoding_check": auto,
        "parquet_column_bytes": columns,
        "codes_flat_bits_per_token": round(flat_bits, 4),
        "load_ms_median": {k: round(v, 3) for k, v in medians.items()},
        "load_x_np_load": {k: round(v / base, 2) for k, v in medians.items()},
        "targets": {
            "parquet_x_entropy": round(pq_x, 4),
            "parquet_x_entropy_ok": pq_x <= 1.15,
            "hdf5_x_entropy": round(default_h5.x_entropy, 4),
            "load_parquet_x_np_load": round(load_x, 2),
            "load_parquet_ok": load_x <= 2.0,
            "load_hdf5_x_np_load": round(h5_load_x, 2),
            "load_hdf5_ok": h5_load_x <= 2.0,
        },
    }
    verdict = {True: "met", False: "MISSED"}
    print(
        f"\ntargets: parquet {pq_x:.3f}x entropy (<= 1.15 {verdict[pq_x <= 1.15]}); "
        f"load_grid parquet {load_x:.2f}x np.load (<= 2 {verdict[load_x <= 2]}); "
        f"hdf5 {h5_load_x:.2f}x ({verdict[h5_load_x <= 2]})"
    )
    (args.out / "storage_benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, separators=(",", ":")))
    return result


if __name__ == "__main__":
    main()
