"""Execute the tutorial notebooks, stop at the first error, report the wall time of each.

    .venv/bin/python tutorials/run.py            # all notebooks, full settings
    .venv/bin/python tutorials/run.py --quick    # smaller slides, fewer genes and folds (a smoke test)
    .venv/bin/python tutorials/run.py 01 03      # only the notebooks whose names start with 01 or 03
    .venv/bin/python tutorials/run.py --write    # also store the outputs in the notebooks (for the docs)
    .venv/bin/python tutorials/run.py --out DIR  # save the executed notebooks in DIR instead

Each notebook runs in a fresh kernel of this Python, with the working directory ``tutorials/``, offline
(``HF_HUB_OFFLINE=1``, unless ``--download``) and with ``DBK_TUTORIAL_QUICK=1`` under ``--quick`` (the notebooks
read it). The her2st notebooks (02, 04) read the six her2st sections as HEST-1k samples (SPA137-SPA145) with
``dbk.datasets.hest``; offline they first build them with ``dbk.datasets.hest_from_her2st`` into
``dbk.settings.datasetdir / "hest"`` (once: a later run finds them there) from the her2st files in
the folder named by ``$DBK_HER2ST`` (a local copy of the six section folders, each with ``counts.tsv.gz``,
``spot_selection.tsv`` and the H&E ``.jpg``). Without it they are skipped, with a note, unless ``--download``: the
notebooks then run online, fetching the HEST samples from the hub (gated: accept HEST's terms, set ``HF_TOKEN``) and
the gene list from GitHub. Without ``--write`` the notebooks on disk are left untouched (git keeps the outputs of a
``--quick --write`` run, which the docs render). Exit status 1 if any notebook fails.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NEEDS_HER2ST = ("02_", "04_")  # notebooks that read the her2st sections


def her2st_dir() -> Path | None:
    """The local copy of the her2st sections: the folder ``$DBK_HER2ST`` names (``None`` when unset)."""
    value = os.environ.get("DBK_HER2ST")
    return Path(value).expanduser() if value else None


def main() -> int:
    """Run the selected notebooks; 0 if all ran (or were skipped), 1 if one failed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("only", nargs="*", help="run only notebooks whose file names start with these prefixes")
    ap.add_argument("--quick", action="store_true", help="small settings (DBK_TUTORIAL_QUICK=1)")
    ap.add_argument("--write", action="store_true", help="save the executed notebooks (with outputs) in place")
    ap.add_argument("--download", action="store_true",
                    help="run online: the her2st notebooks fetch the HEST samples from the hub (gated: HF_TOKEN) "
                         "into dbk.settings.datasetdir, and the gene list from GitHub")
    ap.add_argument("--out", type=Path, default=None, help="save the executed notebooks (with outputs) in this folder")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    ap.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: this Python's ipykernel)")
    args = ap.parse_args()

    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    if not args.download:  # offline, except for dbk.datasets' downloads under --download
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    if args.quick:
        os.environ["DBK_TUTORIAL_QUICK"] = "1"
    else:
        os.environ.pop("DBK_TUTORIAL_QUICK", None)

    notebooks = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [p for p in notebooks if p.name.startswith(tuple(args.only))]
    if not notebooks:
        print("No notebook selected.", file=sys.stderr)
        return 1
    local = her2st_dir()
    has_her2st = (local is not None and local.is_dir()) or args.download

    results: list[tuple[str, str, float]] = []
    failed = False
    start = time.perf_counter()
    for path in notebooks:
        if path.name.startswith(NEEDS_HER2ST) and not has_her2st:
            why = f" ({local} is no folder)" if local else ""
            print(f"{path.name}: skipped (no her2st data: set DBK_HER2ST to a local copy{why}, or pass --download)",
                  flush=True)
            results.append((path.name, "skipped", 0.0))
            continue
        print(f"{path.name}: running{' (quick)' if args.quick else ''} ...", flush=True)
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=args.timeout, kernel_name=args.kernel,
                                resources={"metadata": {"path": str(HERE)}})
        t0 = time.perf_counter()
        try:
            client.execute()
            status = "ok"
        except CellExecutionError as err:
            status = "FAILED"
            failed = True
            print(re.sub(r"\x1b\[[0-9;]*m", "", str(err))[-4000:], file=sys.stderr)  # without terminal colours
        elapsed = time.perf_counter() - t0
        results.append((path.name, status, elapsed))
        print(f"{path.name}: {status} in {elapsed:.0f} s", flush=True)
        if args.write and status == "ok":
            nbformat.write(nb, path)
        if args.out is not None:  # failed ones too, to see the error in context
            args.out.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, args.out / path.name)
        if failed:
            break

    width = max(len(name) for name, _, _ in results)
    print(f"\n{'notebook':<{width}}  status   wall time")
    for name, status, elapsed in results:
        print(f"{name:<{width}}  {status:<7}  {elapsed:7.0f} s" if status != "skipped" else
              f"{name:<{width}}  {status:<7}        -")
    print(f"total {time.perf_counter() - start:.0f} s{' (quick)' if args.quick else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
