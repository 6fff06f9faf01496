"""Stage-1 training throughput on this machine: images/s, share of step time waiting for data, peak memory.

Trains a few dozen steps of the diffusion pretrainer on a synthetic slide (112 µm tiles from
``dbk.datasets.synthetic``) and prints one row per setting:

- ``memory``: tiles read once into RAM (the default when they fit), batches gathered in the training process;
- ``stream``: tiles cropped from the slide for every batch by DataLoader worker processes (what large corpora
  use), to see whether the workers keep up.

Run: ``python benchmarks/stage1_throughput.py [--presets cpu-small tiny] [--steps 40] [--threads 2]``.
Timings on a shared machine are noisy; compare rows of one run.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _slide(shape: int, seed: int):
    import dbk

    sd = dbk.datasets.synthetic(shape=(shape, shape), n_genes=100, random_state=seed)
    dbk.pp.make_tiles(sd, tile_size_um=112)
    dbk.pp.pseudobulk(sd)
    return sd


def run(preset: str, mode: str, sdata, steps: int, warmup: int, workers: int, batch_size: int | None) -> dict:
    import torch

    import dbk

    stamps: list[float] = []

    def clock(model, rec):
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    # preload_max_bytes=0 streams the tiles with DataLoader workers; None reads them into memory when they fit
    model = dbk.tl.fit_pretrainer(sdata, preset=preset, max_steps=steps, batch_size=batch_size,
                                  random_state=0, accelerator="cpu", callbacks=[clock],
                                  num_workers=workers if mode == "stream" else 0, log_every=1,
                                  preload_max_bytes=0 if mode == "stream" else None)
    total = time.perf_counter() - t0
    step_s = np.diff(stamps[warmup:])
    # history "data_wait" is the share of training time (since the first step) spent waiting for the next batch
    waits = np.array([h["data_wait"] * h["time"] for h in model.history])
    wait_s = np.diff(waits[warmup:])
    bsz = batch_size or model.preset.batch_size
    n_params = sum(p.numel() for p in model.net.parameters())
    return {
        "preset": preset,
        "mode": mode + (f" ({workers} workers)" if mode == "stream" else ""),
        "px": model.image_size,
        "params_M": n_params / 1e6,
        "batch": bsz,
        "step_ms": 1000 * float(np.median(step_s)),
        "min_step_ms": 1000 * float(np.min(step_s)),
        "img_per_s": bsz / float(np.median(step_s)),
        "data_wait_%": 100 * float(wait_s.sum() / step_s.sum()),
        "setup_s": total - (stamps[-1] - stamps[0]),
        "peak_rss_MiB": _rss_mib(),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["cpu-small"])
    ap.add_argument("--modes", nargs="+", default=["memory", "stream"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--shape", type=int, default=4096, help="side of the synthetic slide in px (0.5 µm/px)")
    args = ap.parse_args()

    import torch

    import dbk

    torch.set_num_threads(args.threads)
    dbk.settings.progress = False
    dbk.settings.verbosity = 1
    t = time.perf_counter()
    sdata = _slide(args.shape, 0)
    n_tiles = sdata.tables["dbk_table"].n_obs
    print(f"synthetic slide {args.shape}^2 px, {n_tiles} tiles of 112 µm x 100 genes, built in "
          f"{time.perf_counter() - t:.1f} s; peak RSS so far {_rss_mib():.0f} MiB; torch {torch.__version__}, "
          f"{args.threads} threads")
    rows = []
    for preset in args.presets:
        for mode in args.modes:
            rows.append(run(preset, mode, sdata, args.steps, args.warmup, args.workers, args.batch_size))
            r = rows[-1]
            print(f"  done {r['preset']} {r['mode']}: {r['img_per_s']:.1f} img/s", flush=True)
    cols = list(rows[0])
    fmt = {"params_M": "{:.2f}", "step_ms": "{:.0f}", "min_step_ms": "{:.0f}", "img_per_s": "{:.1f}",
           "data_wait_%": "{:.1f}",
           "setup_s": "{:.1f}", "peak_rss_MiB": "{:.0f}"}
    cells = [[fmt.get(c, "{}").format(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print()
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    print("\nstep_ms / img_per_s: median over steps after the warm-up (min_step_ms: the fastest step, closest to an "
          "unshared CPU); data_wait_%: time blocked on the next batch "
          "over step time; setup_s: slide reading, model build, accelerator; peak RSS: whole process so far.")


if __name__ == "__main__":
    main()
