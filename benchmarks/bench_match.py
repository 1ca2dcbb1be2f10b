"""Benchmark: jwst_wiimatch.match_lsq against wiimatch 0.3.2 on the same inputs.

Each measurement runs in a fresh subprocess which builds the inputs, resets
its peak-RSS counter (Linux ``/proc/self/clear_refs``), runs one matcher and
reports wall time, peak memory above the inputs, and the coefficients. Ours
is timed as the best of 5 runs (it takes well under a second, so one run is at
the mercy of anything else the machine does); the reference runs once.

Usage::

    pip install ".[bench]"
    python benchmarks/bench_match.py            # the full table (~4 minutes)
    python benchmarks/bench_match.py --quick    # ours only, no reference
    python benchmarks/bench_match.py --threads-world   # issue 7's ratios only
    python benchmarks/bench_match.py --contention      # the machine's 2-thread ceiling

``--threads-world`` runs the four cases of a degree (image / world, 1 / 2
threads) interleaved in one process, so that the machine's drift hits them
alike, and prints the ratios of the best times and the median of each
round's own ratios.

The full table and ``--quick`` print the time of robust matching (``robust='clip'``) against plain least
squares on the same inputs, run after run (issue 8's target: at most 3x).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.abspath(__file__)


def make_inputs(nimages, size, seed=0, dims=2):
    """Float32 images with plane+offset backgrounds, each valid on an offset square."""
    rng = np.random.default_rng(seed)
    shape = (size,) * dims
    side = int(round(size * 0.4 ** (1 / dims)))
    ind = np.indices(shape, dtype=np.float32)
    images, masks, sigmas = [], [], []
    for _ in range(nimages):
        lo = rng.integers(0, size - side + 1, dims)
        mask = np.zeros(shape, dtype=bool)
        mask[tuple(slice(a, a + side) for a in lo)] = True
        bkg = np.float32(rng.normal(10, 2))
        for k in range(dims):
            bkg = bkg + np.float32(rng.normal(0, 1e-3)) * ind[k]
        sig = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        img = (bkg + sig * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        images.append(img)
        masks.append(mask)
        sigmas.append(sig)
    return images, masks, sigmas


def world(x, y):
    """A mildly non-linear 'image to world' map (degrees, a TAN-like field)."""
    ra = 150.0 + 3e-5 * x + 1e-11 * x * y
    dec = 2.0 + 3e-5 * y - 1e-11 * x * x
    return ra, dec


def _mem_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def worker(impl, degree, nimages, size, use_world, seed, repeat, threads=None, robust=None):
    import gc

    images, masks, sigmas = make_inputs(nimages, size, seed)
    kwargs = {}
    if use_world:
        kwargs = dict(image2world=world)
    if robust:
        kwargs["robust"] = robust
    if threads:  # match_lsq takes the engine's thread count from the environment
        os.environ["JWST_WIIMATCH_THREADS"] = str(threads)
    if impl == "ours":
        from jwst_wiimatch.match import match_lsq
    else:
        from wiimatch.match import match_lsq
    gc.collect()
    inputs_bytes = sum(a.nbytes for a in images + masks + sigmas)
    _mem_reset()
    base = _status("VmRSS")
    times = []
    for _ in range(repeat):
        if threads:  # thread speed-ups: only while the other CPUs are idle
            wait_quiet(limit=20.0)
        t0 = time.perf_counter()
        coef = match_lsq(images, masks, sigmas, degree=degree, solver="RLU", **kwargs)
        times.append(time.perf_counter() - t0)
    dt = min(times)
    peak = _status("VmHWM")
    print(json.dumps(dict(time=dt, extra_mb=(peak - base) / 2**20,
                          inputs_mb=inputs_bytes / 2**20, coef=coef.tolist())))


def run(impl, degree, nimages=10, size=2048, use_world=False, seed=0, repeat=None,
        threads=0, robust=None):
    if repeat is None:
        repeat = 5 if impl == "ours" else 1
    cmd = [sys.executable, HERE, "--worker", impl, str(degree), str(nimages), str(size),
           str(int(use_world)), str(seed), str(repeat), str(threads), robust or "none"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    res["coef"] = np.array(res["coef"])
    return res


def _cpu_busy_elsewhere(seconds=0.25):
    """CPUs (out of all) busy during ``seconds`` according to /proc/stat; None if unknown."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4], sum(v)
    try:
        b0, a0 = sample()
        time.sleep(seconds)
        b1, a1 = sample()
    except OSError:
        return None
    return (b1 - b0) / max(1, a1 - a0) * (os.cpu_count() or 1)


def wait_quiet(limit=60.0, busy=0.15):
    """Wait (at most ``limit`` s) until other processes leave the CPUs idle.

    Thread speed-ups measured while someone else uses a core mean nothing.
    Returns the busy CPUs last seen (None where /proc/stat is missing).
    """
    end = time.time() + limit
    seen = _cpu_busy_elsewhere()
    while seen is not None and seen > busy and time.time() < end:
        seen = _cpu_busy_elsewhere()
    return seen


TW_CASES = ((False, 1), (False, 2), (True, 1), (True, 2))  # (world?, threads)


def threads_world_worker(degree, rounds):
    """The four cases of one degree interleaved, ``rounds`` times, in this process.

    Each round runs image/world x 1/2 threads once (in a rotating order, each
    run after waiting for idle CPUs); prints every time. Interleaving makes the
    machine's drift hit every case alike, and each round's ratios pair runs a
    few seconds apart.
    """
    from jwst_wiimatch.match import match_lsq

    images, masks, sigmas = make_inputs(10, 2048, 0)
    times = {c: [] for c in TW_CASES}
    busy = []
    for r in range(rounds + 1):  # round 0 warms up
        for i in range(len(TW_CASES)):
            use_world, th = TW_CASES[(i + r) % len(TW_CASES)]
            os.environ["JWST_WIIMATCH_THREADS"] = str(th)
            b = wait_quiet(limit=10.0)
            if b is not None and r:
                busy.append(b)
            t0 = time.perf_counter()
            match_lsq(images, masks, sigmas, degree=degree, solver="RLU",
                      image2world=world if use_world else None)
            if r:
                times[use_world, th].append(time.perf_counter() - t0)
    print(json.dumps(dict(times=[times[c] for c in TW_CASES],
                          busy=max(busy) if busy else None)))


def threads_world(degrees=(1, 2), rounds=7):
    """Issue 7's figures: world/image time ratio and 2-thread speed-up, same run.

    One subprocess per degree runs the four cases interleaved (see
    :func:`threads_world_worker`). Printed: the best time of each case and
    the ratios of the bests, and the median over rounds of each round's own
    ratios (the steadier figure on a machine whose speed drifts).
    """
    print(f"threads and coordinates, ours, N=10 float32 2048^2, ~40% coverage, sigmas, "
          f"RLU (the four cases of a degree interleaved, {rounds} rounds)")
    print(f"{'degree':>6} {'image s (1/2 thr)':>18} {'world s (1/2 thr)':>18} "
          f"{'world/image':>12} {'2-thread speed-up':>18} {'busy CPUs':>9}")
    out = {}
    for deg in degrees:
        cmd = [sys.executable, HERE, "--tw-worker", str(deg), str(rounds)]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True)
                         .stdout.strip().splitlines()[-1])
        t = {c: np.array(v) for c, v in zip(TW_CASES, res["times"])}
        best = {c: float(v.min()) for c, v in t.items()}
        ratio = (best[True, 1] / best[False, 1], best[True, 2] / best[False, 2])
        speed = (best[False, 1] / best[False, 2], best[True, 1] / best[True, 2])
        med_ratio = (float(np.median(t[True, 1] / t[False, 1])),
                     float(np.median(t[True, 2] / t[False, 2])))
        med_speed = (float(np.median(t[False, 1] / t[False, 2])),
                     float(np.median(t[True, 1] / t[True, 2])))
        busy = res["busy"]
        print(f"{deg:>6} {best[False, 1]:8.3f} / {best[False, 2]:.3f} {best[True, 1]:8.3f} / "
              f"{best[True, 2]:.3f} {ratio[0]:6.2f} / {ratio[1]:.2f} "
              f"{speed[0]:7.2f}x / {speed[1]:.2f}x "
              f"{float('nan') if busy is None else busy:9.2f}")
        label = "median of the rounds' own ratios:"
        print(f"{'':>6} {label:>37} "
              f"{med_ratio[0]:6.2f} / {med_ratio[1]:.2f} "
              f"{med_speed[0]:7.2f}x / {med_speed[1]:.2f}x")
        out[deg] = dict(best=best, ratio=ratio, speedup=speed, median_ratio=med_ratio,
                        median_speedup=med_speed)
    print("(world/image: 1 thread / 2 threads; speed-up: image / world; busy CPUs: the "
          "most other processes used just before a run)")
    return out


def contention_worker(mode, start, degree=1, runs=10):
    """One-thread matches (N=10, 2048^2) from ``start`` (epoch s): ``mode`` 'one' runs
    them in this thread, 'threads' in two threads at once; prints the seconds."""
    os.environ["JWST_WIIMATCH_THREADS"] = "1"
    from concurrent.futures import ThreadPoolExecutor

    from jwst_wiimatch.match import match_lsq

    images, masks, sigmas = make_inputs(10, 2048, 0)

    def work(_=None):
        for _ in range(runs):
            match_lsq(images, masks, sigmas, degree=degree)

    import resource

    work()  # warm
    time.sleep(max(0.0, start - time.time()))
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if mode == "threads":
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(work, range(2)))
    else:
        work()
    t = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps(dict(time=t, user=r1.ru_utime - r0.ru_utime,
                          sys=r1.ru_stime - r0.ru_stime,
                          switches=r1.ru_nvcsw - r0.ru_nvcsw)))


def contention(degree=1, runs=10):
    """How far the machine lets two one-thread matches run side by side.

    Throughput of two concurrent one-thread matches, against one alone: in
    two processes (no interpreter lock shared: what the caches and memory
    allow) and in two threads of one process (what the engine's threads can
    reach at best).
    """
    def launch(mode, copies):
        start = time.time() + 25.0  # after both have built their inputs
        # one BLAS thread from the start: the engine limits BLAS with
        # threadpoolctl around each match, and two matches in two threads
        # of a process would set and restore that limit under each other
        # (leaving BLAS threads busy-waiting beside the other match)
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, HERE, "--contention-worker", mode,
                                   repr(start), str(degree), str(runs)],
                                  stdout=subprocess.PIPE, text=True, env=env)
                 for _ in range(copies)]
        return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]

    wait_quiet()
    one = launch("one", 1)[0]
    wait_quiet()
    two = launch("one", 2)
    wait_quiet()
    thr = launch("threads", 1)[0]
    alone, procs, threads = one["time"], max(r["time"] for r in two), thr["time"]

    def per_match(rs, key, matches):
        return sum(r[key] if key == "switches" else r["user"] + r["sys"] for r in rs) / matches

    print(f"two one-thread matches at once (degree {degree}, N=10 2048^2, {runs} runs "
          f"each): one alone {alone:.2f} s, {per_match([one], 'cpu', runs):.3f} CPU s "
          f"per match")
    print(f"  in two processes: {procs:.2f} s, throughput {2 * alone / procs:.2f}x one; "
          f"{per_match(two, 'cpu', 2 * runs):.3f} CPU s per match")
    print(f"  in two threads of one process: {threads:.2f} s, throughput "
          f"{2 * alone / threads:.2f}x one; {per_match([thr], 'cpu', 2 * runs):.3f} CPU s "
          f"and {per_match([thr], 'switches', 2 * runs):.0f} voluntary context switches "
          f"per match")
    return dict(alone=alone, processes=procs, threads=threads)


def rel_diff(c1, c2):
    return float(np.max(np.abs(c1 - c2)) / np.max(np.abs(c2)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="ours only, no reference runs")
    p.add_argument("--threads-world", action="store_true",
                   help="only the world/image ratios and 2-thread speed-ups (issue 7)")
    p.add_argument("--contention", action="store_true",
                   help="only: two one-thread matches side by side, in two processes "
                        "and in two threads (the ceiling of the 2-thread speed-up)")
    p.add_argument("--worker", nargs=9, help=argparse.SUPPRESS)
    p.add_argument("--contention-worker", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--tw-worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tw_worker:
        threads_world_worker(int(args.tw_worker[0]), int(args.tw_worker[1]))
        return
    if args.contention_worker:
        mode, start, deg, runs = args.contention_worker
        contention_worker(mode, float(start), int(deg), int(runs))
        return
    if args.worker:
        impl, deg, n, size, w, seed, repeat, threads, robust = args.worker
        worker(impl, int(deg), int(n), int(size), bool(int(w)), int(seed), int(repeat),
               int(threads), None if robust == "none" else robust)
        return

    import jwst_wiimatch

    print(f"jwst_wiimatch {jwst_wiimatch.__version__}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs")
    if args.threads_world:
        threads_world()
        return
    if args.contention:
        contention()
        return
    print("\nN=10 float32 images 2048x2048, masks = offset squares (40% of the grid), "
          "float32 sigmas, RLU")
    print(f"{'degree':>6} {'wiimatch s':>11} {'ours s':>8} {'speed-up':>9} "
          f"{'ref MB':>7} {'ours MB':>8} {'max rel coef diff':>18}")
    for deg in (0, 1, 2):
        ours = run("ours", deg)
        if args.quick:
            print(f"{deg:>6} {'-':>11} {ours['time']:8.3f} {'-':>9} {'-':>7} "
                  f"{ours['extra_mb']:8.1f}")
            continue
        ref = run("ref", deg)
        print(f"{deg:>6} {ref['time']:11.2f} {ours['time']:8.3f} "
              f"{ref['time'] / ours['time']:8.0f}x {ref['extra_mb']:7.0f} "
              f"{ours['extra_mb']:8.1f} {rel_diff(ours['coef'], ref['coef']):18.2e}")
    print("(MB: peak resident memory above the inputs, "
          f"inputs {ours['inputs_mb']:.0f} MB)")

    print("\nrobust matching (robust='clip'), ours, N=10, 2048^2 (best of 5 each; the plain "
          "time measured again in the same run)")
    print(f"{'degree':>6} {'coords':>7} {'plain s':>8} {'clip s':>8} {'ratio':>6} "
          f"{'clip MB':>8}")
    for deg in (0, 1, 2):
        for use_world in (False, True):
            plain = run("ours", deg, use_world=use_world)
            rob = run("ours", deg, use_world=use_world, robust="clip")
            print(f"{deg:>6} {'world' if use_world else 'image':>7} {plain['time']:8.3f} "
                  f"{rob['time']:8.3f} {rob['time'] / plain['time']:5.2f}x "
                  f"{rob['extra_mb']:8.1f}")

    print()
    threads_world()

    print("\nscaling with N (ours, degree 1, 2048^2)")
    for n in (10, 20, 40):
        r = run("ours", 1, nimages=n)
        print(f"N={n:3d}: {r['time']:.3f} s, extra memory {r['extra_mb']:.1f} MB")
    print("\nscaling with grid size (ours, degree 1, N=10)")
    for size in (512, 1024, 2048, 4096):
        r = run("ours", 1, size=size)
        print(f"{size}x{size}: {r['time']:.3f} s, extra memory {r['extra_mb']:.1f} MB")


if __name__ == "__main__":
    main()
