"""Run every benchmark family on the device present; write benchmarks/results/<device>.json,
a markdown table (<device>.md) and a plot (<device>.png), and print the tables.

    python -m benchmarks.run_all [--full] [--families batchnorm_act,losses] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import re
import subprocess
import sys

import torch

import genfast
from benchmarks import harness, report

FAMILIES = ["batchnorm_act", "losses", "conv_transpose", "end_to_end"]


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": harness.device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "genfast": genfast.__version__,
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_GBps": harness.measure_copy_bandwidth(device) / 1e9,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="all cases (default: quick set on CPU)")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = device.type == "cpu" and not args.full
    meta = metadata(device)
    print(f"genfast benchmarks on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}); "
          f"copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s", flush=True)
    rows = []
    for fam in args.families.split(","):
        try:
            mod = importlib.import_module(f"benchmarks.bench_{fam}")
        except ModuleNotFoundError as exc:
            if exc.name != f"benchmarks.bench_{fam}":
                raise
            print(f"(no benchmark for {fam} yet)")
            continue
        rows += mod.run(device, quick)
    os.makedirs(args.out, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", meta["device"])
    result = {"meta": meta, "rows": rows}
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = report.markdown(result)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(md)
    png = report.plot(result, os.path.join(args.out, f"{stem}.png"))
    print()
    print(md)
    print(f"results: {os.path.join(args.out, stem)}.json / .md" + (" / .png" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
