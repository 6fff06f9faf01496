"""Pseudo-bulk throughput: dbk vs spatialdata.aggregate vs HEST-style dense pooling vs the parquet read floor.

Each method runs in its own process, from a Xenium/HEST-like ``transcripts.parquet`` on disk, and reports wall time
(from opening the file to the tiles x genes table, imports excluded), CPU seconds over the same window (user +
system, all threads: less sensitive than wall time to other load on the machine), transcripts/s, peak RSS of the
process (``VmHWM``) and the total it counted. Modules a method imports on first use (dbk's lazily loaded modules,
scipy.ndimage) are imported before its timer starts. The expected total -- non-control transcripts with qv >= 20 inside
the tiles -- is computed independently with pyarrow; "exact" says whether a method's total equals it.

    python benchmarks/pp_throughput.py                       # 1 M, 10 M, 50 M (files cached in benchmarks/_data)
    python benchmarks/pp_throughput.py --sizes 1e6 --methods dbk,floor
    python benchmarks/pp_throughput.py --sizes 1e7 --repeat 3    # median of 3 fresh processes per method

Methods
- floor: stream the four needed columns (he_x, he_y, feature_name, qv) with pyarrow, doing nothing else.
- floor-dict: the same with feature_name read dictionary-encoded (as dbk reads it), so no gene strings are built.
- dbk: dask.read_parquet -> PointsModel -> SpatialData with a lazy image -> dbk.pp.make_tiles -> dbk.pp.pseudobulk,
  all timed (the public path, SpatialData in, table out); the note gives the make_tiles and pseudobulk calls alone
  and how pseudobulk read the points ("parquet": row groups straight from the file, "dask": partition by partition).
  make_tiles reads no transcripts (pseudobulk counts those in tiles its tissue filter dropped, in its own pass).
- dbk-dask (not run by default): dbk with its direct parquet reader switched off, i.e. the general path that
  computes the points partition by partition with dask (used for in-memory or computed points).
- aggregate: spatialdata.aggregate(values="transcripts", by=the dbk tiles, value_key="feature_name", agg_func="count")
  after filtering qv and control probes; only up to --aggregate-max transcripts.
- hest: HEST-style pooling (as in HEST's pool_transcripts_xenium): load the whole table with pandas, floor-divide
  coordinates into a grid aligned with the dbk tiles, np.add.at into a dense uint16 (tiles x genes) grid.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

COLS = ["he_x", "he_y", "feature_name", "qv"]
CONTROL_PREFIXES = ("NegControlProbe_", "NegControlCodeword_", "BLANK_", "UnassignedCodeword_",
                    "DeprecatedCodeword_", "Intergenic_Region_", "antisense_")


def _peak_rss_mb() -> float:
    """Peak RSS of this process. ``VmHWM`` where there is /proc: ``ru_maxrss`` carries over the parent's peak at fork
    (Linux keeps it across exec), which made every method look as large as the harness that computed the total."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    """CPU seconds (user + system) of this process so far, all threads."""
    return time.process_time()


def expected_total(path: str, width: int) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    total = 0
    for b in pq.ParquetFile(path).iter_batches(columns=COLS, batch_size=1 << 20):
        ok = pc.greater_equal(b["qv"], 20)
        name = b["feature_name"]
        for p in CONTROL_PREFIXES:
            ok = pc.and_(ok, pc.invert(pc.starts_with(name, p)))
        for c in ("he_x", "he_y"):
            ok = pc.and_(ok, pc.and_(pc.greater_equal(b[c], 0), pc.less(b[c], width)))
        total += int(pc.sum(pc.cast(ok, "int64")).as_py() or 0)
    return total


def w_floor(path: str, width: int) -> dict:
    import pyarrow.parquet as pq

    t, c = time.perf_counter(), _cpu()
    n = 0
    f = pq.ParquetFile(path, pre_buffer=False)  # row group by row group (iter_batches buffers ~1 GB at 50 M)
    for i in range(f.metadata.num_row_groups):
        n += f.read_row_group(i, columns=COLS).num_rows
    return {"wall": time.perf_counter() - t, "cpu": _cpu() - c, "total": None, "rows": n}


def w_floor_dict(path: str, width: int) -> dict:
    import pyarrow.parquet as pq

    t, c = time.perf_counter(), _cpu()
    n = 0
    # the same, with the gene column read dictionary-encoded (int32 codes + one small dictionary per row group, as
    # dbk reads it): the floor for a reader that never materialises the gene strings
    f = pq.ParquetFile(path, pre_buffer=False, read_dictionary=["feature_name"])
    for i in range(f.metadata.num_row_groups):
        n += f.read_row_group(i, columns=COLS).num_rows
    return {"wall": time.perf_counter() - t, "cpu": _cpu() - c, "total": None, "rows": n}


def _image(width: int):
    import dask.array as da
    import numpy as np

    from dbk.io import image_element

    # a lazy blank slide with a pyramid (like a real whole-slide TIFF), so tissue detection reads a small level
    levels = [da.zeros((3, width >> k, width >> k), dtype=np.uint8, chunks=(3, 4096, 4096)) for k in range(0, 7)]
    return image_element(levels)


def _sdata(path: str, width: int, image, times: dict | None = None):
    import dask.dataframe as dd
    from spatialdata import SpatialData
    from spatialdata.models import PointsModel

    import dbk

    ddf = dd.read_parquet(path, columns=COLS, split_row_groups=True).rename(columns={"he_x": "x", "he_y": "y"})
    points = PointsModel.parse(ddf, sort=True)  # sort=True: skip reading every partition to check the index order
    sdata = SpatialData(images={"he": image}, points={"transcripts": points})
    dbk.io.set_pixel_size(sdata, "he", pixel_size_um=0.5, elements=["transcripts"])
    t = time.perf_counter()
    dbk.pp.make_tiles(sdata, tile_size_um=112.0, min_tissue_fraction=0.0)
    if times is not None:
        times["make_tiles_s"] = time.perf_counter() - t
    return sdata


def _warm_imports() -> None:
    """Import, before the timer, the modules the timed window would import on first use (dbk's lazily loaded
    ``dbk.pp`` modules, scipy.ndimage for the tissue mask): the timings exclude imports, as for the other methods."""
    import dbk

    for name in ("make_tiles", "tissue_mask", "pseudobulk"):
        getattr(dbk.pp, name)


def w_dbk(path: str, width: int, reader: str = "auto") -> dict:
    import dbk

    dbk.settings.verbosity = 1
    dbk.settings.progress = False
    _warm_imports()
    image = _image(width)  # the slide's image exists before; timing starts at the transcripts file
    t, c = time.perf_counter(), _cpu()
    times: dict = {}
    sdata = _sdata(path, width, image, times)  # the whole public path: read_parquet -> PointsModel -> make_tiles
    t1 = time.perf_counter()
    dbk.pp.pseudobulk(sdata, reader=reader)  # ... -> pseudobulk -> sdata.tables["dbk_table"]
    table = sdata.tables["dbk_table"]
    return {"wall": time.perf_counter() - t, "cpu": _cpu() - c, "total": int(table.layers["counts"].sum()),
            "tiles": table.n_obs, "pseudobulk_s": time.perf_counter() - t1, **times,
            "reader": table.uns["dbk"]["pseudobulk"].get("reader")}


def w_dbk_dask(path: str, width: int) -> dict:
    return w_dbk(path, width, reader="dask")  # the general path (partition by partition through dask), for comparison


def w_aggregate(path: str, width: int) -> dict:
    import dask.dataframe as dd
    import spatialdata as sd
    from spatialdata.models import PointsModel

    import dbk

    dbk.settings.verbosity = 1
    _warm_imports()
    image = _image(width)
    t, c = time.perf_counter(), _cpu()
    sdata = _sdata(path, width, image)
    pts = sdata.points["transcripts"]
    pts = pts[pts["qv"] >= 20]
    pts = pts[~pts["feature_name"].str.startswith(CONTROL_PREFIXES)]
    pts = pts.assign(feature_name=pts["feature_name"].astype("category"))
    pts = dd.from_pandas(pts.compute(), npartitions=max(1, pts.npartitions))
    from spatialdata.transformations import get_transformation

    sdata.points["transcripts"] = PointsModel.parse(
        pts, feature_key="feature_name",
        transformations=dict(get_transformation(sdata.points["transcripts"], get_all=True)),
    )
    out = sd.aggregate(values_sdata=sdata, values="transcripts", by=sdata["dbk_tiles"],
                       value_key="feature_name", agg_func="count", target_coordinate_system="global")
    table = out.tables["table"]
    return {"wall": time.perf_counter() - t, "cpu": _cpu() - c, "total": int(table.X.sum()), "tiles": table.n_obs}


def w_hest(path: str, width: int) -> dict:
    import numpy as np
    import pandas as pd

    t, c = time.perf_counter(), _cpu()
    df = pd.read_parquet(path, columns=COLS)
    df = df[(df["qv"] >= 20) & ~df["feature_name"].str.startswith(CONTROL_PREFIXES)]
    size = 224.0
    n = int(np.ceil(width / size))
    a = np.floor(df["he_x"].to_numpy() / size).astype(int)
    b = np.floor(df["he_y"].to_numpy() / size).astype(int)
    features = pd.Index(df["feature_name"].unique())
    cols = features.get_indexer(df["feature_name"])
    grid = np.zeros((n * n, len(features)), dtype=np.uint16)  # HEST's dtype: wraps past 65,535 per bin and gene
    np.add.at(grid, (b * n + a, cols), 1)
    return {"wall": time.perf_counter() - t, "cpu": _cpu() - c, "total": int(grid.sum(dtype=np.int64)), "tiles": n * n}


WORKERS = {"floor": w_floor, "floor-dict": w_floor_dict, "dbk": w_dbk, "dbk-dask": w_dbk_dask, "aggregate": w_aggregate,
           "hest": w_hest}


def run_worker(method: str, path: str, width: int, timeout: float, threads: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--file", path, "--width", str(width)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout:.0f} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1][:80]
        return {"error": f"failed (rc {out.returncode}): {tail}"}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 5e7])
    ap.add_argument("--methods", default="floor,floor-dict,dbk,aggregate,hest")
    ap.add_argument("--data", default=str(HERE / "_data"))
    ap.add_argument("--aggregate-max", type=float, default=1e7, help="largest size to run spatialdata.aggregate on")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per method (each in a fresh process, the methods taking turns); the run with the median "
                         "wall time is shown, with the ratios of the medians (dbk to floor, aggregate to dbk)")
    ap.add_argument("--threads", type=int, default=None,
                    help="limit every method to this many CPU cores (sched_setaffinity of the worker process)")
    ap.add_argument("--worker")
    ap.add_argument("--file")
    ap.add_argument("--width", type=int)
    args = ap.parse_args()
    if args.worker:
        if args.threads and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
        res = WORKERS[args.worker](args.file, args.width)  # wall and CPU over the same window, imports excluded
        res["rss_mb"] = _peak_rss_mb()
        print(json.dumps(res))
        return

    import _transcripts_file as tf

    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    rows = []
    for size in args.sizes:
        n = int(size)
        side, width = tf.layout(n)
        path = data / f"transcripts_{n}.parquet"
        if not path.exists():
            print(f"writing {path} ({n:,} transcripts) ...", flush=True)
            tf.write(path, n)
        expected = expected_total(str(path), width)
        todo = [m for m in methods if not (m == "aggregate" and n > args.aggregate_max)]
        runs: dict[str, list[dict]] = {m: [] for m in todo}
        for _ in range(max(1, args.repeat)):  # round robin: every method sees the same (changing) load on the machine
            for m in todo:
                runs[m].append(run_worker(m, str(path), width, args.timeout, args.threads))
        median = {m: sorted(q, key=lambda r: r["wall"])[len(q) // 2] for m, q in runs.items()
                  if not any("error" in r for r in q)}
        for m in methods:
            if m not in runs:
                note = f"> --aggregate-max {args.aggregate_max:.0e}"
                rows.append((f"{n:,}", side * side, m, "not run", "", "", "", "", note, ""))
                continue
            if m not in median:
                error = next(r["error"] for r in runs[m] if "error" in r)
                rows.append((f"{n:,}", side * side, m, "-", "-", "-", "-", "-", error, ""))
                continue
            r = median[m]
            total = r.get("total")
            exact = "-" if total is None else ("yes" if total == expected else f"no ({total - expected:+,})")
            if any(q.get("total") != total for q in runs[m]):
                exact += " (runs differ!)"
            walls = "/".join(f"{q['wall']:.2f}" for q in sorted(runs[m], key=lambda q: q["wall"]))
            note = f"walls {walls}" if len(runs[m]) > 1 else ""
            if "pseudobulk_s" in r:
                tiles = f"make_tiles {r['make_tiles_s']:.2f} s, " if "make_tiles_s" in r else ""
                ratio = f"{r['wall'] / median['floor']['wall']:.2f}x floor, " if "floor" in median else ""
                note = (f"{ratio}{tiles}pseudobulk {r['pseudobulk_s']:.2f} s, reader {r['reader']}"
                        + (f"; {note}" if note else ""))
            elif m == "aggregate" and "dbk" in median:
                note = f"{r['wall'] / median['dbk']['wall']:.1f}x dbk" + (f"; {note}" if note else "")
            rows.append((f"{n:,}", side * side, m, f"{r['wall']:.2f}", f"{r['cpu']:.2f}", f"{n / r['wall'] / 1e6:.1f}",
                         f"{r['rss_mb']:.0f}", "-" if total is None else f"{total:,}", exact, note))
            print(rows[-1], flush=True)
        rows.append((f"{n:,}", side * side, "(expected)", "", "", "", "", f"{expected:,}", "", ""))
    header = ("transcripts", "tiles", "method", "wall s", "CPU s", "M tx/s", "peak RSS MB", "counted", "exact", "note")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print()
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(f"{v!s:>{w}}" for v, w in zip(r, widths, strict=True)).rstrip())


if __name__ == "__main__":
    main()
