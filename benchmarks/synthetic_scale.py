"""How dbk.datasets.synthetic scales: lazy build time, peak memory, one image chunk, one transcript partition.

Every measurement runs in its own Python process (peak RSS is that process's ``ru_maxrss``, imports included).

    python benchmarks/synthetic_scale.py                 # 2048 px (the default slide) and 40000 px
    python benchmarks/synthetic_scale.py --no-stream     # skip counting all transcripts by streaming
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _worker(task: str, side: int, include_cells: str) -> dict:
    t0 = time.perf_counter()
    import dbk

    out: dict = {"import_s": time.perf_counter() - t0, "rss_import_mb": _rss_mb()}
    dbk.settings.verbosity = 1
    inc = {"auto": "auto", "yes": True, "no": False}[include_cells]
    t0 = time.perf_counter()
    sdata = dbk.datasets.synthetic(shape=(side, side), include_cells=inc)
    out["build_s"] = time.perf_counter() - t0
    out["rss_build_mb"] = _rss_mb()
    truth = sdata.attrs["dbk_synthetic"]
    out["expected_cells"] = truth["expected_n_cells"]
    out["expected_transcripts"] = truth["expected_n_transcripts"]
    out["cells"] = len(sdata.shapes["cells"]) if "cells" in sdata.shapes else None
    image = sdata.images["he"]
    level0 = image["scale0"]["image"].data
    points = sdata.points["transcripts"]
    out["chunks"] = level0.numblocks[1] * level0.numblocks[2]
    out["partitions"] = points.npartitions
    if task == "chunk":
        j, i = level0.numblocks[1] // 2, level0.numblocks[2] // 2  # a chunk in the middle of the tissue
        t0 = time.perf_counter()
        level0.blocks[0, j, i].compute()
        out["chunk_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        part = points.partitions[j * level0.numblocks[2] + i].compute()
        out["partition_s"] = time.perf_counter() - t0
        out["partition_rows"] = len(part)
        coarsest = image[sorted(image.children, key=lambda k: int(k.removeprefix("scale")))[-1]]["image"]
        t0 = time.perf_counter()
        coarsest.data.compute()
        out["thumbnail_s"] = time.perf_counter() - t0
        out["thumbnail_shape"] = list(coarsest.shape[1:])
        out["rss_chunk_mb"] = _rss_mb()
    elif task == "stream":
        t0 = time.perf_counter()
        out["transcripts"] = int(points.map_partitions(len).compute().sum())
        out["stream_s"] = time.perf_counter() - t0
        out["rss_stream_mb"] = _rss_mb()
    return out


def _run(task: str, side: int, include_cells: str = "auto") -> dict:
    cmd = [sys.executable, __file__, "--worker", task, str(side), include_cells]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[2048, 40000])
    parser.add_argument("--no-stream", action="store_true", help="do not count all transcripts by streaming")
    parser.add_argument("--cells-at-full-size", action="store_true", help="also build the largest with cells")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        task, side, inc = args.worker
        print(json.dumps(_worker(task, int(side), inc)))
        return

    rows = []
    for side in args.sides:
        build = _run("build", side)
        chunk = _run("chunk", side)
        stream = None if args.no_stream else _run("stream", side)
        rows.append((f"{side} x {side}", "auto", build, chunk, stream))
    if args.cells_at_full_size:
        side = max(args.sides)
        rows.append((f"{side} x {side}", "yes", _run("build", side, "yes"), None, None))

    head = (
        f"{'slide (px, 0.5 µm/px)':>22} {'cells?':>6} {'build s':>8} {'RSS import':>10} {'RSS build':>10} "
        f"{'cells':>10} {'chunks':>7} {'chunk s':>8} {'partition s (rows)':>19} {'thumbnail s':>16} "
        f"{'RSS chunk':>10} {'expected tx':>12} {'streamed tx':>12} {'stream s':>9} {'RSS stream':>10}"
    )
    print(head)
    print("-" * len(head))
    for name, inc, b, c, s in rows:
        cells = b["cells"] if b["cells"] is not None else f"~{b['expected_cells']:,.0f}"
        cells = f"{cells:,}" if isinstance(cells, int) else cells
        part = "-" if c is None else f"{c['partition_s']:.2f} ({c['partition_rows']:,})"
        thumb = "-" if c is None else f"{c['thumbnail_s']:.1f} ({c['thumbnail_shape'][0]} px)"
        print(
            f"{name:>22} {inc:>6} {b['build_s']:>8.2f} {b['rss_import_mb']:>8.0f}MB {b['rss_build_mb']:>8.0f}MB "
            f"{cells:>10} {b['chunks']:>7} {_fmt(c and c['chunk_s'], '.2f'):>8} {part:>19} {thumb:>16} "
            f"{_fmt(c and c['rss_chunk_mb'], '.0f'):>8}MB {b['expected_transcripts']:>12,.0f} "
            f"{_fmt(s and s['transcripts'], ','):>12} {_fmt(s and s['stream_s']):>9} "
            f"{_fmt(s and s['rss_stream_mb'], '.0f'):>8}MB"
        )
    print(
        "\nbuild: synthetic() returning the lazy SpatialData (cells and table are eager when included); chunk: one "
        "1024 x 1024 level-0 image chunk in the middle of the slide; partition: the transcripts of the same square; "
        "thumbnail: the whole coarsest pyramid level (rendered directly, not from level 0); expected tx: estimated "
        "from the fields without drawing; streamed tx: exact count, every partition generated and counted "
        "(dask threads). RSS = peak resident memory of the process."
    )


if __name__ == "__main__":
    main()
