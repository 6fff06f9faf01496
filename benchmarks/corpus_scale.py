"""Corpus preparation (dbk.tl.prepare_corpus): per-slide time and peak memory of each step, and 1 vs 2 dask workers.

    python benchmarks/corpus_scale.py                                   # all three parts (~12 min on 2 cores)
    python benchmarks/corpus_scale.py --sizes 4096 8192 --full 40000 --scale-size 2048 --scale-slides 4

Part 1 ("per slide"): a synthetic slide of each ``--sizes`` side (0.5 µm/px) is written to a zarr store first (not
timed), then prepared from that store by the worker function of ``dbk.tl.prepare_corpus`` (``prepare_one``: read ->
tissue -> tiles -> pseudo-bulk -> embeddings -> atomic write), in a fresh process, with 2 torch / dask threads,
112 µm tiles and EfficientNet-Lite0 at 224 px. Peak RSS is sampled every 20 ms during each step (absolute RSS of
the process, not a high-water mark carried over from earlier steps).

Part 2 ("full size"): a ``--full`` x ``--full`` px synthetic slide (~55 M transcripts at 40,000 px) through the
steps that stream (read = lazy build, tissue, tiles, pseudo-bulk, which draws the transcripts as it counts them),
measured; embeddings and write are EXTRAPOLATED from the largest part-1 slide (per tile and per pixel), because
rendering and writing 1.6 G synthetic pixels takes far longer than this benchmark's budget on 2 cores.

Part 3 ("workers"): ``--scale-slides`` slides of ``--scale-size`` px, from zarr stores, prepared by
``dbk.tl.prepare_corpus`` in this process (``client=None``, 2 threads), on a LocalCluster of 1 worker (2 threads per
slide) and of 2 workers (1 thread each); each configuration in a fresh process, cluster start-up timed apart.

No assertions: the script prints tables (markdown) for docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

TILE_UM, FM, FM_SIZE_PX = 112.0, "efficientnet_lite0", 224
STEPS = ("read", "tissue", "tiles", "pseudobulk", "embed", "write")


def _settings() -> dict:
    return {"tile_size_um": TILE_UM, "fm": FM, "fm_size_px": FM_SIZE_PX, "tiles_key": "dbk_tiles",
            "table_key": "dbk_table"}


class PeakRSS:
    """A ``step_hook``: the peak RSS (MB) of this process during each step, sampled every 20 ms."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.mb: dict[str, float] = {}

    @contextmanager
    def __call__(self, step: str):
        peak = [self.proc.memory_info().rss]
        stop = threading.Event()

        def sample():
            while not stop.wait(0.02):
                peak[0] = max(peak[0], self.proc.memory_info().rss)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            yield
        finally:
            stop.set()
            th.join()
            self.mb[step] = max(peak[0], self.proc.memory_info().rss) / 2**20


def _quiet():
    import dbk

    dbk.settings.progress = False
    dbk.settings.verbosity = 1
    return dbk


def _result(obj) -> None:
    print("RESULT " + json.dumps(obj), flush=True)


def _child(*args) -> dict:
    """Run this script with ``args`` in a fresh process; its RESULT line."""
    res = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if res.returncode or line is None:
        raise RuntimeError(f"{args} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


# ---- children --------------------------------------------------------------------------------------------------------


def make_input(size: int, path: str, seed: int = 0) -> None:
    dbk = _quiet()
    t = time.perf_counter()
    sd = dbk.datasets.synthetic(shape=(size, size), random_state=seed)
    n_tx = float(sd.attrs["dbk_synthetic"]["expected_n_transcripts"])
    dbk.io.write_zarr(sd, path)
    _result({"size": size, "path": path, "seconds": time.perf_counter() - t, "expected_n_transcripts": n_tx})


def one_slide(size: int, src: str, dest: str, threads: int) -> None:
    _quiet()
    import spatialdata  # noqa: F401 - imported once per worker process, not per slide: not timed
    import torch  # noqa: F401

    import dbk.tl._embed  # noqa: F401
    from dbk.tl._corpus import prepare_one

    hook = PeakRSS()
    baseline = hook.proc.memory_info().rss / 2**20
    row = prepare_one(("path", src), f"synthetic{size}", dest, settings=_settings(), threads=threads,
                      accelerator="cpu", step_hook=hook)
    if row["status"] != "done":
        raise SystemExit(f"{row['error']}\n{row['traceback']}")
    _result({"size": size, "row": row, "peak_mb": hook.mb, "baseline_mb": baseline})


def full_slide(size: int, threads: int) -> None:
    """The streamed steps of prepare_one on a lazy full-size slide (embeddings and write are extrapolated)."""
    dbk = _quiet()
    import dask
    import spatialdata  # noqa: F401 - not timed in "read"
    import torch

    from dbk.pp import prepare_slide

    torch.set_num_threads(threads)
    hook = PeakRSS()
    secs, holder = {}, {}

    def step(name, fn):
        t = time.perf_counter()
        with hook(name), dask.config.set(scheduler="threads", num_workers=threads):
            fn()
        secs[name] = time.perf_counter() - t
        print(f"{name}: {secs[name]:.1f} s, {hook.mb[name]:.0f} MB", file=sys.stderr, flush=True)

    step("read", lambda: holder.setdefault("sd", dbk.datasets.synthetic(shape=(size, size), random_state=0)))
    sd = holder["sd"]
    step("tissue", lambda: dbk.pp.tissue_mask(sd))
    step("tiles", lambda: prepare_slide(sd, tile_size_um=TILE_UM, need_table=False, name="full"))
    step("pseudobulk", lambda: prepare_slide(sd, tile_size_um=TILE_UM, need_table=True, name="full"))
    t = sd.tables["dbk_table"]
    _result({"size": size, "seconds": secs, "peak_mb": hook.mb, "n_tiles": int(t.n_obs),
             "n_counted": int(t.layers["counts"].sum()),
             "expected_n_transcripts": float(sd.attrs["dbk_synthetic"]["expected_n_transcripts"])})


def scale_run(mode: str, inputs: list[str], out: str) -> None:
    """``dbk.tl.prepare_corpus`` of the inputs: mode ``none`` (this process), ``1`` or ``2`` LocalCluster workers."""
    dbk = _quiet()
    import resource

    threads = 2 if mode in ("none", "1") else 1
    t = time.perf_counter()
    if mode == "none":
        client, startup = None, 0.0
    else:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=int(mode), threads_per_worker=1, processes=True, dashboard_address=":0")
        client = Client(cluster)
        startup = time.perf_counter() - t
    t = time.perf_counter()
    rep = dbk.tl.prepare_corpus(inputs, out=out, tile_size_um=TILE_UM, fm=FM, fm_size_px=FM_SIZE_PX,
                                client=client, threads=threads, accelerator="cpu")
    wall = time.perf_counter() - t
    if client is None:
        peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
    else:
        peaks = list(client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024).values())
        client.close()
        cluster.close()
    _result({"mode": mode, "threads": threads, "startup": startup, "wall": wall, "status": rep["status"].tolist(),
             "slide_seconds": rep["seconds"].tolist(), "n_tiles": rep["n_tiles"].astype(int).tolist(),
             "worker_peak_mb": peaks})


# ---- the parent ------------------------------------------------------------------------------------------------------


def _md(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


MARKER = ".dbk_corpus_scale"  # written into the scratch folder: the folder's contents are this script's


def _scratch(given: str | None) -> tuple[Path, bool]:
    """The scratch folder and whether it is the script's own (made by it, or marked by an earlier run).

    A folder that holds anything this script did not write is refused, never emptied.
    """
    import tempfile

    if given is None:
        work, owned = Path(tempfile.mkdtemp(prefix="dbk_corpus_scale_")), True
    else:
        work = Path(given).expanduser()
        owned = (work / MARKER).is_file() or not work.exists()
        if not owned and (not work.is_dir() or any(work.iterdir())):
            raise SystemExit(f"--work {work} exists and holds files this benchmark did not write: give a new or an "
                             "empty folder (nothing in it is deleted).")
        if (work / MARKER).is_file():  # an earlier run's (--keep) files: the script's own, written again
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("scratch folder of benchmarks/corpus_scale.py; removed at the end unless --keep\n")
    return work, owned


def _clean(work: Path, owned: bool) -> None:
    """Remove what the script wrote: the folder when it is its own, else (a user's empty folder) its contents."""
    if owned:
        shutil.rmtree(work, ignore_errors=True)
        return
    for child in work.iterdir():  # the folder was empty when the run began: everything in it is the script's
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[4096, 8192], help="part 1 slide sides (px)")
    ap.add_argument("--full", type=int, default=40_000, help="part 2 slide side (px); 0 skips part 2")
    ap.add_argument("--scale-size", type=int, default=2048, help="part 3 slide side (px)")
    ap.add_argument("--scale-slides", type=int, default=4, help="part 3 slides; 0 skips part 3")
    ap.add_argument("--threads", type=int, default=2, help="torch / dask threads of a slide in parts 1 and 2")
    ap.add_argument("--work", default=None,
                    help="scratch folder: a new one, an empty one or one this script made (default: a new temporary "
                         "folder); what the script writes there is removed at the end unless --keep")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        kind, *rest = args.child
        if kind == "make":
            make_input(int(rest[0]), rest[1], int(rest[2]))
        elif kind == "one":
            one_slide(int(rest[0]), rest[1], rest[2], int(rest[3]))
        elif kind == "full":
            full_slide(int(rest[0]), int(rest[1]))
        elif kind == "scale":
            scale_run(rest[0], rest[2:], rest[1])
        return

    work, owned = _scratch(args.work)
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)", flush=True)
    t_all = time.perf_counter()

    # ---- part 1
    per_slide = []
    for size in args.sizes:
        made = _child("--child", "make", size, work / f"in{size}.zarr", 0)
        res = _child("--child", "one", size, work / f"in{size}.zarr", work / f"out{size}.zarr", args.threads)
        res["expected_n_transcripts"] = made["expected_n_transcripts"]
        res["input_seconds"] = made["seconds"]
        per_slide.append(res)
        r = res["row"]
        print(f"{size} px: {r['seconds']:.1f} s, {r['n_tiles']} tiles (input written in {made['seconds']:.0f} s)",
              flush=True)
        shutil.rmtree(work / f"in{size}.zarr")
        shutil.rmtree(work / f"out{size}.zarr")

    if per_slide:
        print(f"\n## Per slide, by step (threads={args.threads}, 112 µm tiles, {FM} at {FM_SIZE_PX} px)\n")
        head = ["step"] + [f"{r['size']:,}² px: s / peak RSS MB" for r in per_slide]
        rows = [[s] + [f"{r['row'][f'{s}_s']:.1f} / {r['peak_mb'][s]:,.0f}" for r in per_slide] for s in STEPS]
        rows.append(["**total**"] + [f"**{r['row']['seconds']:.1f}** / {max(r['peak_mb'].values()):,.0f}"
                                     for r in per_slide])
        rows.append(["RSS before the slide (imports)"] + [f"{r['baseline_mb']:,.0f} MB" for r in per_slide])
        rows.append(["tiles / ~transcripts"] + [f"{r['row']['n_tiles']:,} / {r['expected_n_transcripts'] / 1e6:.2f} M"
                                                 for r in per_slide])
        print(_md(head, rows))

    # ---- part 2
    if args.full:
        big = _child("--child", "full", args.full, args.threads)
        ref = per_slide[-1] if per_slide else None
        px_ratio = (args.full / ref["size"]) ** 2 if ref else float("nan")
        est = dict(big["seconds"])
        if ref:
            est["embed"] = ref["row"]["embed_s"] / ref["row"]["n_tiles"] * big["n_tiles"]
            est["write"] = ref["row"]["write_s"] * px_ratio
        print(f"\n## Full size: {args.full:,}² px, {big['n_tiles']:,} tiles, "
              f"~{big['expected_n_transcripts'] / 1e6:.1f} M transcripts ({big['n_counted']:,} counted in tiles)\n")
        rows = []
        for s in STEPS:
            if s in big["seconds"]:
                rows.append([s, f"{big['seconds'][s]:.1f}", f"{big['peak_mb'][s]:,.0f}", "measured"])
            elif ref:
                how = (f"ESTIMATE: {ref['row']['embed_s'] / ref['row']['n_tiles'] * 1000:.0f} ms/tile at "
                       f"{ref['size']:,}² px x {big['n_tiles']:,} tiles" if s == "embed" else
                       f"ESTIMATE: {ref['row']['write_s']:.1f} s at {ref['size']:,}² px x {px_ratio:.1f} (pixels)")
                rows.append([s, f"{est[s]:.0f}", "(see part 1)", how])
        rows.append(["**total**", f"**{sum(est.values()):.0f}**", "", "measured + ESTIMATE"])
        print(_md(["step", "seconds", "peak RSS MB", "how"], rows))
        _result({"full": big, "estimate_seconds": est})

    # ---- part 3
    if args.scale_slides:
        inputs = []
        for i in range(args.scale_slides):
            p = work / "scale_in" / f"slide{i}.zarr"
            _child("--child", "make", args.scale_size, p, i)
            inputs.append(str(p))
        runs = []
        for mode in ("none", "1", "2"):
            out = work / f"scale_out_{mode}"
            runs.append(_child("--child", "scale", mode, out, *inputs))
            print(f"mode {mode}: {runs[-1]['wall']:.1f} s {runs[-1]['status']}", flush=True)
            shutil.rmtree(out)
        base = runs[1]["wall"]
        print(f"\n## Workers: {args.scale_slides} slides of {args.scale_size:,}² px "
              f"({sum(runs[0]['n_tiles']):,} tiles in all)\n")
        names = {"none": "in-process (client=None)", "1": "LocalCluster, 1 worker", "2": "LocalCluster, 2 workers"}
        rows = [[names[r["mode"]], r["threads"], f"{r['startup']:.1f}", f"{r['wall']:.1f}",
                 f"{r['wall'] / len(r['status']):.1f}", f"{base / r['wall']:.2f}x",
                 " / ".join(f"{m:,.0f}" for m in r["worker_peak_mb"]), ", ".join(sorted(set(r["status"])))]
                for r in runs]
        print(_md(["run", "threads per slide", "cluster start s", "wall s", "s per slide", "speed-up vs 1 worker",
                   "peak RSS MB per worker", "status"], rows))
    print(f"\nbenchmark wall time {time.perf_counter() - t_all:.0f} s; load average at end: "
          f"{os.getloadavg()[0]:.2f}")
    if not args.keep:
        _clean(work, owned)


if __name__ == "__main__":
    main()
