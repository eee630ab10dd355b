"""Render benchmark results (the JSON written by run_all) as markdown tables and a PNG plot, and
the one-screen summary of a GPU run (benchmarks/gpu_suite.sh).

    python -m benchmarks.report benchmarks/results/<device>.json
    python -m benchmarks.report --summary RESULTS.json [--build ok|failed] [--tests-log LOG]
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys


def _variants(rows):
    names = []
    for r in rows:
        for n in r["variants"]:
            if n not in names:
                names.append(n)
    return names


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    wino = f"; Winograd k4/k5 s2 {meta['cpu_winograd']}" if meta.get("cpu_winograd") else ""
    wino += f"; tap product {meta['cpu_tap_gemm']}" if meta.get("cpu_tap_gemm") else ""
    wino += f"; linear backward GEMM {meta['cpu_linear_gemm']}" if meta.get("cpu_linear_gemm") else ""
    cpu = f" ({meta['cpu']}; row-layout GEMM {meta.get('cpu_row_gemm', 'n/a')}{wino})" if meta.get("cpu") else ""
    out = [f"Device: {meta['device']}{cpu}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; "
           f"commit {meta['commit'][:10]}, {meta['date']}; copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s.", ""]
    families = []
    for r in rows:
        if r["family"] not in families:
            families.append(r["family"])
    for fam in families:
        frows = [r for r in rows if r["family"] == fam]
        names = _variants(frows)
        gen = [n for n in names if n.startswith("genfast")]
        out.append(f"### {fam}")
        out.append("")
        # Each variant's max abs error against the reference (eager), in its own column: one
        # column for all of them showed torch.compile's float32 reduction error under genfast's.
        checked = [n for n in names if any(r.get("reference", "eager") != n for r in frows)]
        head = ["case"] + [f"{n} (us)" for n in names] + [f"{g} vs eager" for g in gen] + \
               [f"{g} vs compile" for g in gen] + [f"{n} max err" for n in checked]
        extra = None
        if any("frac_of_copy_bw" in v for r in frows for v in r["variants"].values()):
            extra = "frac_of_copy_bw"
            head += [f"{g} % of copy BW" for g in gen]
        elif any("TFLOP/s" in v for r in frows for v in r["variants"].values()):
            extra = "TFLOP/s"
            # GFLOP/s where no case reaches 1 TFLOP/s (CPUs): 0.0 TFLOP/s says nothing
            scale = 1e3 if max(v.get("TFLOP/s", 0.0) for r in frows
                               for v in r["variants"].values()) < 1.0 else 1.0
            head += [f"{g} {'GFLOP/s' if scale > 1 else 'TFLOP/s'}" for g in gen]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in frows:
            v = r["variants"]
            cells = [r["case"]]
            cells += [f"{v[n]['median_ms'] * 1e3:.1f}" if n in v else "" for n in names]
            cells += [f"{v[g]['speedup_vs_eager']:.2f}x" if g in v and "speedup_vs_eager" in v[g] else "" for g in gen]
            cells += [f"{v[g]['speedup_vs_compile']:.2f}x" if g in v and "speedup_vs_compile" in v[g] else "" for g in gen]
            cells += [f"{v[n]['max_abs_err']:.1e}" if n in v else "" for n in checked]
            if extra == "frac_of_copy_bw":
                cells += [f"{100 * v[g]['frac_of_copy_bw']:.0f}%" if "frac_of_copy_bw" in v.get(g, {}) else ""
                          for g in gen]
            elif extra == "TFLOP/s":
                cells += [f"{v[g]['TFLOP/s'] * scale:.1f}" if "TFLOP/s" in v.get(g, {}) else ""
                          for g in gen]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def tests_line(log_text: str) -> str:
    """pytest's final counts line ("3 failed, 120 passed, 4 skipped in 61.2s"), or a note."""
    lines = [ln.strip("= ") for ln in log_text.splitlines()
             if re.search(r"\b\d+ (passed|failed|error|errors|skipped|deselected)\b", ln)]
    if not lines:
        return "no pytest summary (did not run or was killed)"
    interrupted = "KeyboardInterrupt" in log_text or "Interrupted" in log_text
    return lines[-1] + (" (stopped at its time budget)" if interrupted else "")


def _gmean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summary(result: dict, build: str = "?", tests: str = "?") -> str:
    """One screen: build, tests, then per family and genfast backend the largest parity error,
    the speed-up over eager and over torch.compile (geometric mean, min..max over the cases) and
    the launches per call where the benchmark counted them; then what the budget cut."""
    meta, rows = result["meta"], result["rows"]
    out = [f"genfast benchmark run on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}, "
           f"CUDA {meta['cuda']}, commit {meta['commit'][:10]})",
           f"build: {build}", f"tests: {tests}", ""]
    families = []
    for r in rows:
        if r["family"] not in families:
            families.append(r["family"])
    head = f"{'family':<15}{'variant':<16}{'cases':>5}  {'max err':>8}  {'vs eager (min..max)':>22}  " \
           f"{'vs compile (min..max)':>22}  launches"
    out.append(head)
    for fam in families:
        frows = [r for r in rows if r["family"] == fam]
        for name in [n for n in _variants(frows) if n.startswith("genfast")]:
            vs = [r["variants"][name] for r in frows if name in r["variants"]]
            err = max(v["max_abs_err"] for v in vs)
            cells = []
            for key in ("speedup_vs_eager", "speedup_vs_compile"):
                xs = [v[key] for v in vs if key in v]
                g = _gmean(xs)
                cells.append(f"{g:.2f}x ({min(xs):.2f}..{max(xs):.2f})" if g else "-")
            launches = sorted({v["launches"] for v in vs if v.get("launches") is not None})
            eager_l = sorted({r["variants"]["eager"].get("launches") for r in frows
                              if r["variants"].get("eager", {}).get("launches") is not None})
            lcell = (",".join(map(str, launches)) + (f" (eager {','.join(map(str, eager_l))})" if eager_l else "")
                     if launches else "-")
            out.append(f"{fam:<15}{name:<16}{len(vs):>5}  {err:>8.1e}  {cells[0]:>22}  {cells[1]:>22}  {lcell}")
    b = result.get("budget") or {}
    if b.get("stopped_families"):
        out.append("")
        out.append(f"BUDGET: {b['budget_s']:.0f} s reached after {b['elapsed_s']:.0f} s; first case not started: "
                   f"{b['first_not_started']}; families cut short: {', '.join(b['stopped_families'])}")
    elif b:
        out.append("")
        out.append(f"benchmarks: {len(rows)} cases in {b['elapsed_s']:.0f} s"
                   + (f" of a {b['budget_s']:.0f} s budget" if b.get("budget_s") else "")
                   + (" (--quick)" if b.get("quick") else ""))
    return "\n".join(out)


def plot(result: dict, path: str):
    """Horizontal bars: speedup over eager per case and variant. Returns the path, or None when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    if not rows:
        return None
    names = [n for n in _variants(rows) if n != "eager"]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.35 * len(rows) * max(1, len(names)) / 2 + 1.5)))
    h = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        ys = [j + i * h for j in range(len(rows))]
        xs = [r["variants"].get(n, {}).get("speedup_vs_eager", 0.0) for r in rows]
        ax.barh(ys, xs, height=h, label=n)
    ax.set_yticks([j + 0.4 - h / 2 for j in range(len(rows))])
    ax.set_yticklabels([f"[{r['family']}] {r['case']}" for r in rows], fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over PyTorch eager (higher is better)")
    ax.set_title(f"genfast on {result['meta']['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("--summary", action="store_true", help="the one-screen summary instead of the tables")
    p.add_argument("--build", default="?", help="build status line for the summary")
    p.add_argument("--tests-log", default=None, help="pytest output whose counts go into the summary")
    args = p.parse_args(argv)
    with open(args.json) as f:
        res = json.load(f)
    if args.summary:
        tests = "?"
        if args.tests_log:
            try:
                with open(args.tests_log) as f:
                    tests = tests_line(f.read())
            except FileNotFoundError:
                tests = "not run"
        print(summary(res, args.build, tests))
    else:
        print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
