"""Quantizer speed and memory: vqtok's VectorQuantizer against the lecture's, a library's, and
the bare distance GEMM + argmin (the limit), at several codebook sizes.

    python benchmarks/quantizer.py [--ks 512 8192 65536] [--n 65536] [--dim 64] [--reps 5]
        [--threads T] [--out runs/quantizer-bench]

Each candidate does one training step of the quantizer: forward on z (N/64, D, 8, 8) with
requires_grad, then backward from an upstream gradient on the quantized output plus the
loss (``torch.autograd.backward((quantized, loss), (g, 1))``), so no extra ops are timed.
The limit is forward only: ``addmm(||e||^2, z, e^T, alpha=-2)`` + argmin over the flat
(N, D) input, once as one big block (where it fits in 2 GiB) and once in cache-sized row
blocks; the faster of the two is the limit. Candidates are timed interleaved in one process
(the order rotates every repetition); the table reports medians of wall-clock and of CPU
time, and the ratios use the clock ``--clock`` names.

Candidates: ``vqtok`` with ``ema=False`` (codebook loss, gradient to the codebook) and with
the defaults (EMA, dead-code restart bookkeeping; k-means initialisation off, as it runs
once on the first batch and not per step); the lecture's quantizer (benchmarks/lecture_vq.py:
full distance matrix, one-hot scatter, one-hot matmul); and ``vector_quantize_pytorch``'s
``VectorQuantize`` (EMA decay 0.99, commitment 0.25, plain straight-through: rotation trick
off; ``pip install 'vqtok[bench]'``).

With ``--family`` the candidates are the quantizer family instead, each against vqtok's vq
(EMA) at the same K (column ``x vq``): codebook_dim 8, codebook_dim 8 + l2, the rotation
trick, rvq depth 4 (with and without codebook_dim 8; its ``x vq`` is per stage, since it
does depth searches) and fsq with prod(levels) = K reached through fsq_mlp's maps from and to D
(``FSQ_LEVELS``). Issue 13's targets: ``x vq`` <= 1.5 at every K, peak extra <= 300 MiB at
K = 65,536 for vq and rvq with and without codebook_dim.

    python benchmarks/quantizer.py --family --threads 2 --out runs/quantizer-family

Peak extra memory: each (candidate, K) runs in a fresh subprocess that builds its inputs,
runs one small warm-up step (so lazily initialised library state is not counted), resets the
kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``), runs one full step and reports
VmHWM - VmRSS(before). RSS counts every page torch's CPU allocator touched (tracemalloc sees
none of them); the extra includes the step's outputs and z's gradient (3 x N x D x 4 bytes =
48 MiB at N = 65536, D = 64). Where ``clear_refs`` is not writable, the peak is
``ru_maxrss`` after the step, which can only over-state the extra. Each probe runs twice:
as glibc is by default, and with its mmap threshold fixed (``FIXED_MMAP_THRESHOLD``, shown in
brackets), which tells the tensors alive at once from the heap glibc keeps. The lecture's and the
library's quantizers are not run where a lower bound on their need (the N x K tensors they
must hold at once, ``analytic_requirement``) exceeds 60 % of the available memory; the table
shows that bound instead, and the JSON also a straight-line extrapolation in K of the
extras measured at the smaller sizes.
Last line: one JSON object, also written to OUT/quantizer.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lecture_vq import LectureQuantizer
from vqtok.tokenizer.model import LEAKY_SLOPE
from vqtok.tokenizer.quantizers import (
    FiniteScalarQuantizer,
    QuantizerOutput,
    ResidualVectorQuantizer,
)
from vqtok.tokenizer.quantizers.vq import CPU_BLOCK_BYTES, CPU_MIN_BLOCK_ROWS, VectorQuantizer

CANDIDATES = ("limit", "vqtok-noema", "vqtok-ema", "lecture", "vqlib")
#: The quantizer family (``--family``), each timed against vqtok-ema at the same K.
FAMILY = ("vqtok-cdim8", "vqtok-cdim8-l2", "vqtok-rotation", "vqtok-rvq4", "vqtok-rvq4-cdim8",
          "fsq")
LABELS = {
    "limit": "GEMM + argmin (limit)",
    "vqtok-noema": "vqtok, ema=False",
    "vqtok-ema": "vqtok, EMA (default)",
    "lecture": "lecture",
    "vqlib": "vector-quantize-pytorch",
    "vqtok-cdim8": "vq, codebook_dim 8",
    "vqtok-cdim8-l2": "vq, codebook_dim 8 + l2",
    "vqtok-rotation": "vq, rotation trick",
    "vqtok-rvq4": "rvq, depth 4",
    "vqtok-rvq4-cdim8": "rvq, depth 4, cdim 8",
    "fsq": "fsq (+ mlp maps 64->d->64)",
}
#: fsq levels with prod(levels) = K, for the Ks this benchmark is run at.
FSQ_LEVELS = {512: [8, 8, 8], 8192: [8, 8, 8, 4, 4], 65536: [8, 8, 8, 8, 4, 4]}
STAGES = {"vqtok-rvq4": 4, "vqtok-rvq4-cdim8": 4}  # work per step is per stage: ratios too
TARGETS = {"vs_limit_at_512": 1.3, "speedup_vs_lecture_at_512": 2.5, "extra_mib_at_65536": 300,
           "family_x_vq": 1.5}
MIB = 2**20
FULL_BLOCK_LIMIT = 2 * 2**30
GRID = 8  # z is (N / 64, D, 8, 8)

Step = Callable[[], None]


# --- candidates -------------------------------------------------------------------------------


def _inputs(n: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n // (GRID * GRID), dim, GRID, GRID, generator=g).requires_grad_()
    upstream = torch.randn(z.shape, generator=g)
    return z, upstream


def _limit_step(z: torch.Tensor, codes: torch.Tensor, rows: int) -> Step:
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).contiguous()
    code_sq = (codes * codes).sum(dim=1)
    out = torch.empty(flat.shape[0], dtype=torch.long)

    def step() -> None:
        for r0 in range(0, flat.shape[0], rows):
            dist = torch.addmm(code_sq, flat[r0 : r0 + rows], codes.t(), alpha=-2.0)
            torch.argmin(dist, dim=1, out=out[r0 : r0 + rows])

    return step


def _limit_blocked_rows(k: int) -> int:
    return max(CPU_MIN_BLOCK_ROWS, CPU_BLOCK_BYTES // (4 * k))


def _module(name: str, k: int, dim: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "vqtok-noema":
        return VectorQuantizer(k, dim, ema=False, kmeans_init=False).train()
    if name == "vqtok-ema":
        return VectorQuantizer(k, dim, kmeans_init=False).train()
    if name == "lecture":
        return LectureQuantizer(k, dim).train()
    family = {"vqtok-cdim8": {"codebook_dim": 8},
              "vqtok-cdim8-l2": {"codebook_dim": 8, "l2_normalize": True},
              "vqtok-rotation": {"rotation_trick": True}}
    if name in family:
        return VectorQuantizer(k, dim, kmeans_init=False, **family[name]).train()
    if name in STAGES:
        options = {"codebook_dim": 8} if name.endswith("cdim8") else {}
        return ResidualVectorQuantizer(k, dim, depth=STAGES[name], kmeans_init=False,
                                       **options).train()
    if name == "fsq":
        return _ProjectedFSQ(dim, FSQ_LEVELS[k]).train()
    if name == "vqlib":
        from vector_quantize_pytorch import VectorQuantize

        return VectorQuantize(dim=dim, codebook_size=k, decay=0.99, commitment_weight=0.25,
                              rotation_trick=False, accept_image_fmap=True).train()
    raise ValueError(name)


class _ProjectedFSQ(torch.nn.Module):
    """FSQ reached from D-wide vectors the way a model with ``fsq_mlp`` (the default)
    reaches it (an activation and a 1x1 conv to len(levels), a 1x1 conv back and an
    activation), so it takes and gives what the other candidates do."""

    def __init__(self, dim: int, levels: list[int]) -> None:
        super().__init__()
        self.down = torch.nn.Sequential(torch.nn.LeakyReLU(LEAKY_SLOPE),
                                        torch.nn.Conv2d(dim, len(levels), 1))
        self.fsq = FiniteScalarQuantizer(levels)
        self.up = torch.nn.Sequential(torch.nn.Conv2d(len(levels), dim, 1),
                                      torch.nn.LeakyReLU(LEAKY_SLOPE))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        out = self.fsq(self.down(z))
        return QuantizerOutput(self.up(out.quantized), out.indices, out.loss,
                               out.codebook_loss, out.commitment_loss)


def _train_step(name: str, module: torch.nn.Module, z: torch.Tensor,
                upstream: torch.Tensor) -> Step:
    one = torch.ones(())

    def step() -> None:
        z.grad = None
        out = module(z)
        if name == "vqlib":
            quantized, _, loss = out
        else:
            quantized, loss = out.quantized, out.loss
        if loss.requires_grad:
            torch.autograd.backward((quantized, loss), (upstream, one))
        else:  # fsq: no codebook or commitment loss
            quantized.backward(upstream)

    return step


def make_step(name: str, k: int, n: int, dim: int) -> Step:
    z, upstream = _inputs(n, dim)
    if name.startswith("limit"):
        codes = torch.randn(k, dim, generator=torch.Generator().manual_seed(1))
        rows = n if name == "limit-full" else _limit_blocked_rows(k)
        return _limit_step(z, codes, rows)
    return _train_step(name, _module(name, k, dim), z, upstream)


# --- memory (one subprocess per configuration) ------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_here(name: str, k: int, n: int, dim: int) -> dict[str, Any]:
    """Peak RSS growth of one full step (run inside a fresh process)."""
    make_step(name, k, min(n, 1024), dim)()  # warm-up: library state, thread pools
    step = make_step(name, k, n, dim)
    gc.collect()
    before = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (upper bound)"
    step()
    if method.startswith("VmHWM"):
        peak = _status_kib("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"extra_bytes": max(0, peak - before) * 1024, "method": method}


# glibc raises its mmap threshold (to at most 32 MiB) each time a large block is freed, so
# later N x D temporaries come from the heap and stay in RSS after they are freed. A fixed
# threshold turns that off: the probe run again this way says how much of the peak is the
# allocator's keeping rather than tensors alive at once.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def measure_memory(name: str, k: int, n: int, dim: int, threads: int | None) -> dict[str, Any]:
    command = [sys.executable, __file__, "--memory-probe", name, "--ks", str(k), "--n", str(n),
               "--dim", str(dim)] + (["--threads", str(threads)] if threads else [])
    result: dict[str, Any] = {}
    for key, extra_env in (("", {}), ("fixed_mmap_", FIXED_MMAP_THRESHOLD)):
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, **extra_env})
        if done.returncode:
            return {"error": (done.stderr.strip().splitlines() or ["killed"])[-1][:200]}
        probe = json.loads(done.stdout.strip().splitlines()[-1])
        result.update({f"{key}{field}": value for field, value in probe.items()})
    return result


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def analytic_requirement(name: str, k: int, n: int, dim: int) -> tuple[int, str]:
    """A lower bound from the tensors the method must hold at once, and how it is counted."""
    nk = n * k * 4
    if name == "lecture":
        # (||z||^2 + ||e||^2), z e^T and 2 z e^T are live together in the distance expression;
        # then the distance matrix and the one-hot (both N x K fp32).
        return 3 * nk, "3 x N x K x 4 B: three N x K fp32 temporaries in the distance sum"
    if name == "vqlib":
        # cdist keeps x.y and 2 x.y and their sum; then an int64 one-hot and its fp32 copy.
        return nk + 2 * nk + nk, "N x K fp32 distances + N x K int64 one-hot + fp32 one-hot"
    return nk, "N x K x 4 B"


# --- timing -----------------------------------------------------------------------------------


def time_interleaved(steps: dict[str, Step], reps: int) -> dict[str, dict[str, list[float]]]:
    """Wall-clock and CPU seconds of each step, the candidates alternating every repetition.

    CPU time (all threads of this process) does not count time the process waited for a core,
    so on a machine shared with other work it is the steadier of the two.
    """
    names = list(steps)
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    for name in names:  # warm-up
        steps[name]()
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            steps[name]()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def run_k(k: int, n: int, dim: int, reps: int, threads: int | None,
          memory: bool, names: list[str], clock_key: str) -> dict[str, Any]:
    result: dict[str, Any] = {"k": k, "candidates": {}}
    runnable = []
    for name in names:
        entry: dict[str, Any] = {}
        need, how = analytic_requirement(name, k, n, dim)
        entry["analytic_bytes"], entry["analytic_rule"] = need, how
        budget = 0.6 * available_bytes()
        if name in ("lecture", "vqlib") and need > budget:
            entry["skipped"] = (f"needs >= {need / 2**30:.0f} GiB ({how}); "
                                f"{available_bytes() / 2**30:.0f} GiB available")
        result["candidates"][name] = entry
        if "skipped" in entry:
            continue
        if memory and name != "limit":
            entry.update(measure_memory(name, k, n, dim, threads))
            if "error" in entry:
                entry["skipped"] = f"memory probe failed: {entry['error']}"
                continue
        runnable.append(name)
    steps: dict[str, Step] = {}
    for name in runnable:
        if name == "limit":
            steps["limit-blocked"] = make_step("limit-blocked", k, n, dim)
            if n * k * 4 <= FULL_BLOCK_LIMIT:
                steps["limit-full"] = make_step("limit-full", k, n, dim)
        else:
            steps[name] = make_step(name, k, n, dim)
    times = time_interleaved(steps, reps)
    med = {name: {clock: statistics.median(ts[clock]) for clock in ts}
           for name, ts in times.items()}
    limits = {name: m for name, m in med.items() if name.startswith("limit")}
    if limits:
        best = min(limits, key=lambda name: limits[name][clock_key])
        result["candidates"]["limit"].update(
            seconds=limits[best]["wall"], cpu_seconds=limits[best]["cpu"], variant=best,
            variants=limits, times=times[best])
    for name in runnable:
        if name != "limit":
            result["candidates"][name].update(seconds=med[name]["wall"],
                                              cpu_seconds=med[name]["cpu"], times=times[name])
    key = {"wall": "seconds", "cpu": "cpu_seconds"}[clock_key]
    limit = result["candidates"].get("limit", {}).get(key)
    lecture = result["candidates"].get("lecture", {}).get(key)
    vq = result["candidates"].get("vqtok-ema", {}).get(key)
    for name, entry in result["candidates"].items():
        if key in entry and limit:
            entry["x_limit"] = entry[key] / limit
        if key in entry and lecture:
            entry["speedup_vs_lecture"] = lecture / entry[key]
        if key in entry and vq and name in FAMILY:
            entry["x_vq"] = entry[key] / vq / STAGES.get(name, 1)
    return result


def extrapolate(results: list[dict[str, Any]]) -> None:
    """For a skipped candidate, the line through its two largest measured (K, extra) points."""
    for r in results:
        for name, entry in r["candidates"].items():
            if "skipped" not in entry:
                continue
            points = sorted((o["k"], o["candidates"][name]["extra_bytes"]) for o in results
                            if "extra_bytes" in o["candidates"].get(name, {}))
            if len(points) >= 2:
                (k0, m0), (k1, m1) = points[-2:]
                entry["extrapolated_bytes"] = int(m1 + (m1 - m0) / (k1 - k0) * (r["k"] - k1))


def _fmt_memory(entry: dict[str, Any]) -> str:
    if "extra_bytes" in entry:
        fixed = entry.get("fixed_mmap_extra_bytes")
        return f"{entry['extra_bytes'] / MIB:,.0f} MiB" + (
            f" ({fixed / MIB:,.0f})" if fixed is not None else "")
    if "extrapolated_bytes" in entry:
        return f"~{entry['extrapolated_bytes'] / 2**30:,.0f} GiB (not run)"
    if "skipped" in entry:
        return f">= {entry['analytic_bytes'] / 2**30:,.0f} GiB (not run)"
    return "-"


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"\n{'K':>6}  {'quantizer':<28}{'wall ms':>10}{'CPU ms':>10}{'x limit':>9}"
          f"{'vs lecture':>12}{'x vq':>7}{'peak extra (fixed mmap)':>26}")
    for r in results:
        for name, e in r["candidates"].items():
            ms = f"{e['seconds'] * 1000:,.1f}" if "seconds" in e else "not run"
            cpu = f"{e['cpu_seconds'] * 1000:,.1f}" if "cpu_seconds" in e else "-"
            xl = f"{e['x_limit']:.2f}" if "x_limit" in e else "-"
            vs = f"{e['speedup_vs_lecture']:.2f}x" if "speedup_vs_lecture" in e else "-"
            xv = f"{e['x_vq']:.2f}" if "x_vq" in e else "-"
            label = LABELS[name] + (" (fwd)" if name == "limit" else "")
            mem = "-" if name == "limit" else _fmt_memory(e)
            print(f"{r['k']:>6}  {label:<28}{ms:>10}{cpu:>10}{xl:>9}{vs:>12}{xv:>7}{mem:>26}")
    for r in results:
        for name, e in r["candidates"].items():
            if "skipped" in e:
                line = f"K={r['k']} {LABELS[name]}: not run, {e['skipped']}"
                if "extrapolated_bytes" in e:
                    line += (f"; the extras measured at smaller K extrapolate to "
                             f"{e['extrapolated_bytes'] / 2**30:.1f} GiB")
                print(line)


def check_targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    by_k = {r["k"]: r["candidates"] for r in results}
    met: dict[str, Any] = {}
    if 512 in by_k:
        for name in ("vqtok-noema", "vqtok-ema"):
            e = by_k[512].get(name, {})
            if "x_limit" in e:
                met[f"{name}_vs_limit_at_512"] = e["x_limit"] <= TARGETS["vs_limit_at_512"]
            if "speedup_vs_lecture" in e:
                met[f"{name}_speedup_vs_lecture_at_512"] = (
                    e["speedup_vs_lecture"] >= TARGETS["speedup_vs_lecture_at_512"])
    if 65536 in by_k:
        for name in ("vqtok-noema", "vqtok-ema", "vqtok-cdim8", "vqtok-rvq4",
                     "vqtok-rvq4-cdim8"):
            e = by_k[65536].get(name, {})
            if "extra_bytes" in e:
                met[f"{name}_extra_mib_at_65536"] = (
                    e["extra_bytes"] / MIB <= TARGETS["extra_mib_at_65536"])
    for k, candidates in by_k.items():  # issue 13: every kind within 1.5x of vq (per stage)
        for name in FAMILY:
            e = candidates.get(name, {})
            if "x_vq" in e:
                met[f"{name}_x_vq_at_{k}"] = e["x_vq"] <= TARGETS["family_x_vq"]
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[512, 8192, 65536])
    parser.add_argument("--n", type=int, default=65536, help="vectors per step")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES),
                        choices=CANDIDATES + FAMILY)
    parser.add_argument("--family", action="store_true", help="time the quantizer family "
                        "(fsq, rvq, codebook_dim, l2, rotation trick) against vqtok's vq: "
                        "the candidates become vqtok-ema and " + ", ".join(FAMILY))
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="which median the ratios use (cpu: steadier on a shared machine)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", default="runs/quantizer-bench")
    parser.add_argument("--memory-probe", choices=CANDIDATES[1:] + FAMILY,
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n % (GRID * GRID):
        parser.error(f"--n must be a multiple of {GRID * GRID}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(measure_memory_here(args.memory_probe, args.ks[0], args.n, args.dim)))
        return
    if args.family:
        args.candidates = ["vqtok-ema", *FAMILY]
    names = [c for c in CANDIDATES + FAMILY if c in args.candidates]
    if "vqlib" in names:
        try:
            import vector_quantize_pytorch  # noqa: F401
        except ImportError:
            print("vector_quantize_pytorch not installed (pip install 'vqtok[bench]'); "
                  "skipping it", file=sys.stderr)
            names.remove("vqlib")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for k in args.ks:
        reps = args.reps if k <= 8192 else max(2, args.reps // 2)
        print(f"K = {k}: {'memory probes, then ' if not args.skip_memory else ''}{reps} "
              "interleaved repetitions ...", flush=True)
        results.append(run_k(k, args.n, args.dim, reps, args.threads, not args.skip_memory,
                             names, args.clock))
    extrapolate(results)
    print_table(results)
    summary = {
        "n": args.n, "dim": args.dim, "threads": torch.get_num_threads(), "clock": args.clock,
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "results": results,
        "targets": TARGETS, "met": check_targets(results),
    }
    (out / "quantizer.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
