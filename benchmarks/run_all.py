"""Run every benchmark family on the device present; write benchmarks/results/<device>.json,
a markdown table (<device>.md) and a plot (<device>.png), and print the tables.

    python -m benchmarks.run_all [--full] [--quick] [--budget-s S] [--dry-run]
                                 [--families batchnorm_act,losses] [--out DIR]

--quick runs one shape per family (both dtypes where the family benchmarks two) and the DCGAN
training step; --budget-s stops starting new cases once the next one would not fit (torch.compile
warm-up and autotuning included) and says which cases did not run.
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
import time

import torch

import genfast
from benchmarks import harness, report

FAMILIES = ["batchnorm_act", "losses", "conv_transpose", "conv_act", "end_to_end"]
# --quick: the cases kept per family (regular expressions over the case names of bench_<family>).
QUICK = {
    "batchnorm_act": r"^fwd_bwd_train 128x64x32x32 \w+ nchw$",
    "losses": r"^gan D\+G bce fwd\+bwd 128x1$",
    "conv_transpose": r"^fwd_bwd dcgan2 .* b128 \w+ nchw$",
    "conv_act": r"^conv\+BN\+LeakyReLU fwd_bwd dcgan D2 .* b128 \w+ nchw$",
    "end_to_end": r"^GAN step dcgan64 batch 128$",
}


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
        **({"cpu": harness.cpu_model(), "cpu_row_gemm": _row_gemm_state(), "cpu_winograd": _winograd_state(),
             "cpu_tap_gemm": _tap_gemm_state(), "cpu_linear_gemm": _linear_gemm_state()}
           if device.type == "cpu" else {}),
    }


def _row_gemm_state() -> str:
    """The CPU transposed convolution's row-layout GEMM setting and whether it runs here."""
    ext = genfast.backend.extension()
    if ext is None:
        return "n/a"
    mode = ext.cpu_row_gemm()
    return "auto (row layout where KH*KW <= 4*SH*SW or from a 1x1 input; ATen's product above)" \
        if mode == "auto" else mode


def _winograd_state() -> str:
    """The CPU k4 s2 p1 / k5 s2 p2 convolutions' Winograd setting (genfast.backend.set_cpu_winograd)."""
    ext = genfast.backend.extension()
    if ext is None or not hasattr(ext, "cpu_winograd"):
        return "n/a"
    mode = ext.cpu_winograd()
    return ("auto (k4: F(4x4, 2x2) for maps of multiples of 4, from 64 input and 32 output channels, 64 tiles "
            "with 4 per image or 16 in one, scratch within 64 MB + 32 MB per image; k5: F(4x4, 3x3), the same "
            "channels, from 64 tiles with 4 per image)" if mode == "auto" else mode)


def _tap_gemm_state() -> str:
    """The CPU transposed convolution's tap-product setting (genfast.backend.set_cpu_tap_gemm)."""
    ext = genfast.backend.extension()
    if ext is None or not hasattr(ext, "cpu_tap_gemm"):
        return "n/a"
    mode = ext.cpu_tap_gemm()
    return ("auto (AVX2 CPUs without AVX-512, where at most 90% of the (pixel, tap) pairs land in the output, "
            "a 16-channel block per thread)" if mode == "auto" else mode)


def _linear_gemm_state() -> str:
    """The CPU Linear layer's backward GEMM setting (genfast.backend.set_cpu_linear_gemm)."""
    ext = genfast.backend.extension()
    if ext is None or not hasattr(ext, "cpu_linear_gemm"):
        return "n/a"
    mode = ext.cpu_linear_gemm()
    return ("auto (AVX2 CPUs without AVX-512, more than one thread, 16 to 128 rows, from 128 input and "
            "output features)" if mode == "auto" else mode)


def main(argv=None, clock=None) -> int:
    """`clock` (seconds, monotonic) replaces time.monotonic for the budget (tests)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="all cases (default: quick set on CPU)")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--quick", action="store_true",
                   help="one shape per family and the DCGAN training step (QUICK), on any device")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget: no case starts once the next one would not fit")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    families = args.families.split(",")
    filters = {f: QUICK[f] for f in families if f in QUICK} if args.quick else {}
    if args.dry_run:
        print(f"benchmarks: families {','.join(families)}; budget "
              f"{'none' if args.budget_s is None else f'{args.budget_s:.0f} s'}; "
              f"{'quick' if args.quick else 'all cases'}")
        for f in families:
            print(f"  {f}: {'cases matching ' + filters[f] if f in filters else 'every case'}")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or (device.type == "cpu" and not args.full)
    plan = harness.configure(args.budget_s, filters, clock or time.monotonic)
    meta = metadata(device)
    print(f"genfast benchmarks on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}); "
          f"copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s"
          + (f"; budget {args.budget_s:.0f} s" if args.budget_s is not None else ""), flush=True)
    stopped = []
    for fam in families:
        try:
            mod = importlib.import_module(f"benchmarks.bench_{fam}")
        except ModuleNotFoundError as exc:
            if exc.name != f"benchmarks.bench_{fam}":
                raise
            print(f"(no benchmark for {fam} yet)")
            continue
        try:
            mod.run(device, quick)
        except harness.BudgetExhausted as exc:
            stopped.append(fam)
            print(f"[{fam}] stopped: {exc}", flush=True)
    rows = list(plan.rows)
    budget = {"budget_s": args.budget_s, "elapsed_s": plan.elapsed(), "quick": bool(args.quick),
              "stopped_families": stopped, "not_started": plan.skipped,
              "first_not_started": plan.exhausted_at}
    if stopped:
        print(f"BUDGET: {args.budget_s:.0f} s reached; not started: {plan.exhausted_at} and the rest of "
              f"{', '.join(stopped)}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", meta["device"])
    result = {"meta": meta, "rows": rows, "budget": budget}
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
