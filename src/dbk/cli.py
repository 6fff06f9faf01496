"""The ``dbk`` command: ``dbk demo`` (and, as the model lands, fit / predict / benchmark)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _table(rows: list[tuple], header: tuple) -> str:
    cols = list(zip(header, *rows, strict=False)) if rows else [(h,) for h in header]
    widths = [max(len(str(v)) for v in col) for col in cols]
    line = "  ".join(f"{h:<{w}}" for h, w in zip(header, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(f"{v!s:<{w}}" for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, sep, *body])


def demo(out: str | Path = "dbk_demo_output", *, size: int = 4096, random_state: int = 0) -> dict:
    """Run the pipeline on a synthetic slide: tissue -> tiles -> pseudo-bulk -> checks -> figures + zarr.

    Returns a dict with the stage timings and checks (also printed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from tqdm.auto import tqdm

    import dbk
    from dbk._constants import QV_COL, TILES_TABLE_KEY
    from dbk.pp._binning import TileLookup

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    verbosity = dbk.settings.verbosity
    dbk.settings.verbosity = 1  # warnings only: the progress bar and the tables below tell the story
    timings: list[tuple] = []
    stages = ["synthetic slide", "tissue mask", "tiles", "pseudo-bulk", "exactness check", "figures", "write zarr"]
    bar = tqdm(total=len(stages), desc="dbk demo", unit="stage")

    def stage(name, fn):
        bar.set_postfix_str(name)
        t = time.perf_counter()
        res = fn()
        timings.append((name, f"{time.perf_counter() - t:.2f}"))
        bar.update(1)
        return res

    sdata = stage("synthetic slide", lambda: dbk.datasets.synthetic(shape=(size, size), random_state=random_state))
    stage("tissue mask", lambda: dbk.pp.tissue_mask(sdata))
    stage("tiles", lambda: dbk.pp.make_tiles(sdata, tile_size_um=112.0))
    stage("pseudo-bulk", lambda: dbk.pp.pseudobulk(sdata, source="transcripts"))
    adata = sdata.tables[TILES_TABLE_KEY]

    def exact():
        # independent count: load the (small) demo transcripts and count, per tile, those inside its bounds
        df = sdata.points["transcripts"].compute()
        keep = ~df["feature_name"].astype(str).map(dbk.pp.is_control_probe).to_numpy()
        if QV_COL in df.columns:
            keep &= df[QV_COL].to_numpy() >= 20
        b = dbk.pp.tile_bounds(sdata)
        p, _ = TileLookup.build(b).assign(df["x"].to_numpy()[keep], df["y"].to_numpy()[keep])
        brute = 0
        x, y = df["x"].to_numpy()[keep], df["y"].to_numpy()[keep]
        for x0, y0, x1, y1 in b:
            brute += int(((x >= x0) & (x < x1) & (y >= y0) & (y < y1)).sum())
        return len(df), int(keep.sum()), brute, int(adata.layers["counts"].sum()), len(p)

    n_all, n_kept, brute, table_total, _ = stage("exactness check", exact)

    def figures():
        markers = [g for g in ("ERBB2", "KRT5", "PTPRC", "COL1A1") if g in adata.var_names]
        genes = markers[:2] or list(adata.var_names[:2])
        paths = []
        for color in ["n_transcripts", *genes]:
            p = out / f"tiles_{color}.png"
            dbk.pl.tiles(sdata, color, show=False, save=str(p))
            paths.append(p)
        import matplotlib.pyplot as plt

        plt.close("all")
        return paths

    figs = stage("figures", figures)

    def write():
        return dbk.io.write_zarr(sdata, out / "demo.zarr")

    zarr_path = stage("write zarr", write)
    bar.close()

    summary = [
        ("tiles", adata.n_obs),
        ("genes", adata.n_vars),
        ("transcripts (all)", f"{n_all:,}"),
        ("transcripts kept (genes, qv>=20)", f"{n_kept:,}"),
        ("in tiles, brute force", f"{brute:,}"),
        ("in tiles, pseudo-bulk table", f"{table_total:,}"),
        ("exact", "yes" if brute == table_total else "NO"),
        ("median transcripts / tile", f"{np.median(adata.obs['n_transcripts']):.0f}"),
    ]
    print("\nStage timings (s)")
    print(_table(timings, ("stage", "seconds")))
    print("\nPseudo-bulk checks")
    print(_table(summary, ("metric", "value")))
    print(f"\nFigures: {', '.join(str(p) for p in figs)}")
    print(f"SpatialData: {zarr_path}")
    print("(Model stages -- fit_diffbulk, predict, evaluate -- join this demo as they land.)")
    dbk.settings.verbosity = verbosity
    if brute != table_total:
        raise SystemExit("pseudo-bulk total differs from the brute-force count")
    return {"timings": timings, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dbk`` command."""
    parser = argparse.ArgumentParser(prog="dbk", description="DiffBulk: spatial expression from H&E.")
    parser.add_argument("--version", action="store_true", help="print the dbk version and exit")
    sub = parser.add_subparsers(dest="command")
    p_demo = sub.add_parser("demo", help="run the pipeline on a built-in synthetic slide (no download)")
    p_demo.add_argument("--out", default="dbk_demo_output", help="output folder (figures, demo.zarr)")
    p_demo.add_argument("--size", type=int, default=4096, help="synthetic slide side in pixels (0.5 µm/px)")
    p_demo.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    if args.version:
        import dbk

        print(dbk.__version__)
        return 0
    if args.command == "demo":
        if args.size < 512:
            parser.error("--size must be at least 512 pixels")
        demo(args.out, size=args.size, random_state=args.seed)
        return 0
    parser.print_help()
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
