"""Selection at corpus scale: eager step vs one read, speed-up over submodlib, lazy wall time vs N.

Prints, in one run:

1. ``eager``: the time of one eager greedy step (the fused ``G @ [u, g]`` pass plus the score
   update) against the time of one read of the sketch matrix (one ``G @ v``), at ``--eager-n`` rows
   (goal: ≤ 2×);
2. ``submodlib``: our log-det greedy (λ = 0; lazy and eager) against submodlib-py's
   ``LogDeterminantFunction`` + ``NaiveGreedy`` (dense kernel ``α G Gᵀ``, ``lambdaVal = 1``, the same
   objective) at ``--sub-n`` × d, budget ``--sub-k``, checking the picks are identical;
3. ``scaling``: the wall time of SPICE (λ = 0.1, 10% budget, lazy) at each of ``--sizes`` rows, with
   the eager time for the same run extrapolated from ``--eager-steps`` measured eager steps;
4. ``device`` (not in the default parts): the same SPICE runs with the block engine
   (:mod:`spice_ray.select.device_engine`: whole greedy steps on the device, one host round trip
   per block) on ``--device`` (default ``cuda``; ``cpu`` = CPU torch), picks checked against the
   numpy lazy engine up to ``--check-n``;
5. ``engine`` (not in the default parts): one of them alone (``--engine block|per-step``), for
   whole-process A/B timing;
6. ``engines`` (not in the default parts): at ``--engines-n`` × ``--d``, budget ``--engines-k``, the
   block engine against the per-step torch engine (``EagerTorch``: one host round trip per step)
   on ``--device``, both with the same picks as the numpy lazy engine (also timed); the per-step
   engine runs ``--old-steps`` steps (0: all) and its total is extrapolated from them.

Data: float32 "sketch-like" rows (a shared direction, a decaying spectrum, log-normal norms).
Usage: ``python benchmarks/select_scaling.py [--sizes 100000,300000,1000000] [--sub-n 10000]
[--sub-k 1000] [--skip-submodlib]``; the device engines: ``--parts engines --device cpu
--engines-n 20000 --engines-k 2000`` (or ``--device cuda``), ``--parts device --device cuda
--sizes 1000000``. Timings on a shared machine vary with its load, which is
printed alongside.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import numpy as np

from spice_ray.select import CandidateShard, select


def sketch_like(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spec = (1.0 + np.arange(d)) ** -0.6
    Q = np.linalg.qr(rng.normal(size=(d, d)))[0]
    mean = rng.normal(size=d)
    mean /= np.linalg.norm(mean)
    G = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, 1 << 16):
        m = min(n, a + (1 << 16)) - a
        X = (rng.normal(size=(m, d)) * spec) @ Q + 0.3 * mean
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        X *= rng.lognormal(0.0, 0.5, size=(m, 1))
        G[a : a + m] = X
    return G


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load avg {one:.1f}/{five:.1f} on {os.cpu_count()} cpus"


def _median_time(f, reps: int) -> float:
    f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_read(G: np.ndarray, reps: int = 7) -> tuple[float, str]:
    """The fastest of one ``G @ v`` (BLAS's own threading) and the same read in 512-row slices
    spread over the eager pass's threads: the baseline is the best read this machine manages now."""
    from concurrent.futures import ThreadPoolExecutor

    from spice_ray.select.engines import num_threads

    v = np.random.default_rng(1).normal(size=G.shape[1]).astype(G.dtype)
    out = np.empty(G.shape[0], dtype=G.dtype)
    blas = _median_time(lambda: G @ v, reps)
    threads = num_threads()

    def part(lo: int) -> None:
        for a in range(lo, min(G.shape[0], lo + (1 << 15)), 512):
            np.matmul(G[a : a + 512], v, out=out[a : a + 512])

    with ThreadPoolExecutor(threads) as pool:
        sliced = _median_time(lambda: list(pool.map(part, range(0, G.shape[0], 1 << 15))), reps)
    return (blas, "G @ v") if blas <= sliced else (sliced, f"G @ v in slices on {threads} threads")


def eager_step_times(G: np.ndarray, steps: int, lam: float, k: int) -> list[float]:
    """Seconds per eager step (best + update) for steps 1..steps (step 0 reads nothing)."""
    shard = CandidateShard(G, alpha=1.0, lam=lam, max_updates=k, lazy=False)
    w = shard.best()
    shard.update(w.u, w.g, w.q, w.index)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        w = shard.best()
        shard.update(w.u, w.g, w.q, w.index)
        times.append(time.perf_counter() - t)
    return times


def bench_eager(n: int, d: int, steps: int) -> None:
    G = sketch_like(n, d, seed=1)
    read, how = time_read(G)
    per = statistics.median(eager_step_times(G, steps, lam=0.1, k=max(steps + 1, n // 10)))
    print(f"[eager] N={n:,} d={d} float32: one read ({how}) {read * 1e3:.1f} ms, "
          f"one eager step {per * 1e3:.1f} ms (median of {steps}) -> {per / read:.2f}x a read  ({load()})", flush=True)


def bench_submodlib(n: int, d: int, k: int, skip: bool) -> None:
    G = sketch_like(n, d, seed=2)
    alpha = 1.0
    t = time.perf_counter()
    lazy = select(G, k, method="logdet", alpha=alpha, lazy=True, diagnostics=False)
    t_lazy = time.perf_counter() - t
    t = time.perf_counter()
    eager = select(G, k, method="logdet", alpha=alpha, lazy=False, diagnostics=False)
    t_eager = time.perf_counter() - t
    same = lazy.indices.tolist() == eager.indices.tolist()
    print(f"[submodlib] N={n:,} d={d} k={k:,}: ours lazy {t_lazy:.2f} s, eager {t_eager:.2f} s "
          f"(lazy == eager picks: {same})", flush=True)
    if skip:
        return
    try:
        from submodlib import LogDeterminantFunction
    except ImportError:
        print("[submodlib] submodlib-py not installed (pip install -e .[dev]); skipped", flush=True)
        return
    G64 = G.astype(np.float64)
    t = time.perf_counter()
    f = LogDeterminantFunction(n=n, mode="dense", lambdaVal=1, sijs=alpha * (G64 @ G64.T))
    res = f.maximize(budget=k, optimizer="NaiveGreedy", stopIfZeroGain=False, stopIfNegativeGain=False,
                     show_progress=False)
    t_sub = time.perf_counter() - t
    picks = [int(i) for i, _ in res]
    same_sub = picks == lazy.indices.tolist()
    first_diff = next((i for i, (a, b) in enumerate(zip(picks, lazy.indices.tolist())) if a != b), None)
    print(f"[submodlib] submodlib NaiveGreedy {t_sub:.1f} s (kernel build included) -> speed-up "
          f"{t_sub / t_lazy:.0f}x (lazy), {t_sub / t_eager:.0f}x (eager); identical picks: {same_sub}"
          + ("" if same_sub else f" (first difference at step {first_diff})") + f"  ({load()})", flush=True)


def bench_scaling(sizes: list[int], d: int, lam: float, eager_steps: int) -> None:
    for n in sizes:
        G = sketch_like(n, d, seed=3)
        k = n // 10
        t = time.perf_counter()

        def progress(step: int, index: int, k: int = k, t0: float = t) -> None:
            if (step + 1) % max(1, k // 10) == 0:
                print(f"  [scaling] N={n:,}: {step + 1:,}/{k:,} picks after {time.perf_counter() - t0:.0f} s  ({load()})",
                      flush=True)

        sel = select(G, k, lam=lam, lazy=True, on_step=progress)
        wall = time.perf_counter() - t
        per = statistics.median(eager_step_times(G, eager_steps, lam=lam, k=k))
        diag = sel.diagnostics
        print(f"[scaling] N={n:,} d={d} k={k:,} lambda={lam}: lazy wall {wall:.1f} s "
              f"({sel.stats['seconds']:.1f} s greedy, {sel.stats['scored'] / k:.0f} rows scored/step); "
              f"eager ~{per * k:.0f} s (extrapolated: {per * 1e3:.0f} ms/step x {k:,}) -> lazy "
              f"{per * k / wall:.0f}x faster; logdet {sel.logdet:.1f}, conflict-gain spearman "
              f"{diag.get('conflict_gain_spearman')}, eps bound holds {diag.get('eps_bound_holds')}  ({load()})",
              flush=True)
        del G


def bench_device(sizes: list[int], d: int, lam: float, device: str, check_n: int) -> None:
    """The block engine on a torch device (whole steps there, one host round trip per block);
    picks checked against the numpy lazy engine for N <= check_n."""
    import torch

    for n in sizes:
        G = sketch_like(n, d, seed=3)
        k = n // 10
        select(G[:1000], 10, lam=lam, lazy=False, device=device, diagnostics=False)  # CUDA context, kernels
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        sel = select(G, k, lam=lam, lazy=False, device=device, diagnostics=False)
        wall = time.perf_counter() - t
        st = sel.stats
        line = (f"[{device}] N={n:,} d={d} k={k:,} lambda={lam}: block engine wall {wall:.1f} s "
                f"({wall / k * 1e3:.2f} ms/step; {st.get('blocks')} blocks, {st.get('rollbacks')} rollbacks, "
                f"CUDA graph {st.get('cuda_graph')}), logdet {sel.logdet:.1f}")
        if n <= check_n:
            t = time.perf_counter()
            ref = select(G, k, lam=lam, lazy=True, diagnostics=False)
            line += (f"; numpy lazy {time.perf_counter() - t:.1f} s, identical picks: "
                     f"{ref.indices.tolist() == sel.indices.tolist()}")
        print(line + f"  ({load()})", flush=True)
        del G


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def per_step_torch(G: np.ndarray, k: int, lam: float, device: str, steps: int) -> tuple[list[int], float]:
    """The per-step torch engine (``EagerTorch``, decisions on the host every step): its first
    ``steps`` picks and the seconds they took."""
    from spice_ray.select import LocalShards

    shard = CandidateShard(G, alpha=1.0, lam=lam, max_updates=k, lazy=False, device=device)
    group = LocalShards([shard])
    picks = []
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        w = group.best()
        group.update(w)
        picks.append(w.index)
    _sync(device)
    return picks, time.perf_counter() - t


def bench_engines(n: int, d: int, k: int, lam: float, device: str, old_steps: int, block: int) -> None:
    """Block engine vs per-step torch engine (and numpy lazy, the picks' reference) on one problem."""
    import torch

    from spice_ray.select import factory as factory_mod
    from spice_ray.select.device_engine import DeviceGreedy

    G = sketch_like(n, d, seed=4)
    where = f"{device} (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    select(G[:2000], 20, lam=lam, lazy=False, device=device, diagnostics=False)  # warm-up: kernels, context
    factory_mod.DeviceGreedy = functools.partial(DeviceGreedy, block=block)
    _sync(device)
    t = time.perf_counter()
    new = select(G, k, lam=lam, lazy=False, device=device, diagnostics=False)
    _sync(device)
    t_new = time.perf_counter() - t
    steps = k if old_steps <= 0 else min(k, old_steps)
    old_picks, t_old = per_step_torch(G, k, lam, device, steps)
    t_old_total = t_old / steps * k
    t = time.perf_counter()
    ref = select(G, k, lam=lam, lazy=True, device="numpy", diagnostics=False)
    t_np = time.perf_counter() - t
    same = new.indices.tolist() == ref.indices.tolist() and old_picks == ref.indices.tolist()[:steps]
    st = new.stats
    print(f"[engines] N={n:,} d={d} k={k:,} lambda={lam} on {where}: block engine {t_new:.2f} s "
          f"({t_new / k * 1e3:.2f} ms/step; block {st['block']}, {st['blocks']} blocks, {st['rollbacks']} rollbacks, "
          f"CUDA graph {st['cuda_graph']}); per-step EagerTorch {t_old_total:.2f} s "
          f"({t_old / steps * 1e3:.2f} ms/step over {steps:,} steps{'' if steps == k else ', extrapolated'}) "
          f"-> block engine {t_old_total / t_new:.2f}x faster; numpy lazy {t_np:.2f} s; "
          f"identical picks: {same}  ({load()})", flush=True)


def bench_one_engine(n: int, d: int, k: int, lam: float, device: str, engine: str, block: int) -> None:
    """One engine's greedy alone (for whole-process A/B timing of ``block`` vs ``per-step``)."""
    from spice_ray.select import factory as factory_mod
    from spice_ray.select.device_engine import DeviceGreedy

    G = sketch_like(n, d, seed=4)
    t = time.perf_counter()
    if engine == "block":
        factory_mod.DeviceGreedy = functools.partial(DeviceGreedy, block=block)
        picks = select(G, k, lam=lam, lazy=False, device=device, diagnostics=False).indices.tolist()
    else:
        picks, _ = per_step_torch(G, k, lam, device, k)
    _sync(device)
    wall = time.perf_counter() - t
    print(f"[engine] {engine} N={n:,} d={d} k={k:,} on {device}: {wall:.2f} s ({wall / k * 1e3:.2f} ms/step), "
          f"last pick {picks[-1]}  ({load()})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--eager-n", type=int, default=1_000_000)
    ap.add_argument("--eager-steps", type=int, default=10)
    ap.add_argument("--sub-n", type=int, default=10_000)
    ap.add_argument("--sub-k", type=int, default=1_000)
    ap.add_argument("--skip-submodlib", action="store_true", help="time only our side of the comparison")
    ap.add_argument("--sizes", default="100000,300000", help="comma-separated N for the scaling runs")
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--parts", default="eager,submodlib,scaling",
                    help="also: device (the block engine on --device), engines (block vs per-step torch engine), "
                         "engine (one of them alone: --engine)")
    ap.add_argument("--device", default="cuda", help="torch device of the `device` part")
    ap.add_argument("--check-n", type=int, default=100_000, help="device part: compare picks with numpy up to this N")
    ap.add_argument("--engines-n", type=int, default=20_000, help="engines part: rows")
    ap.add_argument("--engines-k", type=int, default=2_000, help="engines part: budget")
    ap.add_argument("--old-steps", type=int, default=0, help="engines part: steps of the per-step engine (0: all)")
    ap.add_argument("--block", type=int, default=32, help="engines part: steps per host round trip")
    ap.add_argument("--engine", default="block", choices=["block", "per-step"], help="engine part: which one")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    print(f"# select_scaling: python {platform.python_version()}, numpy {np.__version__}, {platform.processor() or platform.machine()}, {load()}", flush=True)
    if "eager" in parts:
        bench_eager(args.eager_n, args.d, args.eager_steps)
    if "submodlib" in parts:
        bench_submodlib(args.sub_n, args.d, args.sub_k, args.skip_submodlib)
    if "scaling" in parts:
        bench_scaling([int(x) for x in args.sizes.split(",") if x], args.d, args.lam, args.eager_steps)
    if "device" in parts:
        bench_device([int(x) for x in args.sizes.split(",") if x], args.d, args.lam, args.device, args.check_n)
    if "engines" in parts:
        bench_engines(args.engines_n, args.d, args.engines_k, args.lam, args.device, args.old_steps, args.block)
    if "engine" in parts:
        bench_one_engine(args.engines_n, args.d, args.engines_k, args.lam, args.device, args.engine, args.block)


if __name__ == "__main__":
    main()
