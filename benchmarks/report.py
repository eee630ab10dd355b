"""Render benchmark results (the JSON written by run_all) as markdown tables and a PNG plot.

    python -m benchmarks.report benchmarks/results/<device>.json
"""
from __future__ import annotations

import json
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
    out = [f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; "
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
        head = ["case"] + [f"{n} (us)" for n in names] + [f"{g} vs eager" for g in gen] + \
               [f"{g} vs compile" for g in gen] + ["max err"]
        extra = None
        if any("frac_of_copy_bw" in v for r in frows for v in r["variants"].values()):
            extra = "frac_of_copy_bw"
            head += [f"{g} % of copy BW" for g in gen]
        elif any("TFLOP/s" in v for r in frows for v in r["variants"].values()):
            extra = "TFLOP/s"
            head += [f"{g} TFLOP/s" for g in gen]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in frows:
            v = r["variants"]
            cells = [r["case"]]
            cells += [f"{v[n]['median_ms'] * 1e3:.1f}" if n in v else "" for n in names]
            cells += [f"{v[g]['speedup_vs_eager']:.2f}x" if g in v and "speedup_vs_eager" in v[g] else "" for g in gen]
            cells += [f"{v[g]['speedup_vs_compile']:.2f}x" if g in v and "speedup_vs_compile" in v[g] else "" for g in gen]
            cells.append(f"{max(x['max_abs_err'] for x in v.values()):.1e}")
            if extra == "frac_of_copy_bw":
                cells += [f"{100 * v[g]['frac_of_copy_bw']:.0f}%" if "frac_of_copy_bw" in v.get(g, {}) else ""
                          for g in gen]
            elif extra == "TFLOP/s":
                cells += [f"{v[g]['TFLOP/s']:.1f}" if "TFLOP/s" in v.get(g, {}) else "" for g in gen]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
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


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        res = json.load(f)
    print(markdown(res))
