"""Shared benchmark harness: parity first, then interleaved timing in one process.

Every row: each variant's output is compared with the reference variant's (max abs error), then
all variants are timed in interleaved rounds and the median is kept (CUDA events through
triton.testing.do_bench on a GPU; perf_counter on the CPU). The forward+backward rows through a
ReLU or LeakyReLU zero dy where the activation's input lies at the kink within float64 noise
(kink_free_grad)."""
from __future__ import annotations

import gc
import re
import statistics
import time
from typing import Callable, Optional

import torch

import genfast

# Measured device-to-device copy bandwidth (bytes read + written per second) per device name
# prefix, used as the memory-bound ceiling. Filled in at run time by measure_copy_bandwidth().
_COPY_BW: dict[str, float] = {}
# Dense bf16 / tf32 matmul peaks (FLOP/s) from the device's datasheet, for the compute ceiling.
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}


class BudgetExhausted(RuntimeError):
    """Raised by measure() (or should_run()) when the next case would not finish in the budget."""


class _Plan:
    """Which cases run: an optional wall-clock budget and an optional per-family case filter.

    Past the budget no new case starts: a case starts only while elapsed + the longest case so
    far fits in the budget. Every row measured (or skipped) is kept in `rows` / `skipped`, so a
    caller still has them when a family stops early."""

    def __init__(self, budget_s: Optional[float] = None, filters: Optional[dict] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.budget_s = budget_s
        self.filters = filters or {}
        self.clock = clock
        self.start = clock()
        self.longest = 0.0
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.exhausted_at: Optional[str] = None
        self.current: Optional[tuple[str, str]] = None   # the case running now, and since when
        self.current_start = 0.0

    def elapsed(self) -> float:
        return self.clock() - self.start

    def wanted(self, family: str, case: str) -> bool:
        pat = self.filters.get(family)
        return pat is None or re.search(pat, case) is not None

    def fits(self) -> bool:
        return self.budget_s is None or self.elapsed() + self.longest <= self.budget_s


PLAN = _Plan()


def configure(budget_s: Optional[float] = None, filters: Optional[dict] = None,
              clock: Callable[[], float] = time.monotonic) -> _Plan:
    """Start a run: budget in seconds from now (None: no limit), and {family: regex} case filters
    (a family not named runs every case). Returns the plan, which collects rows and skips."""
    global PLAN
    PLAN = _Plan(budget_s, filters, clock)
    return PLAN


def should_run(family: str, case: str) -> bool:
    """False for a case the filter excludes; raises BudgetExhausted (the case recorded as
    skipped) when the
    budget leaves no room for another case. Benchmarks call it before a case's set-up (compile
    warm-up, launch counting) so that skipped cases cost nothing."""
    if not PLAN.wanted(family, case):
        return False
    if PLAN.current == (family, case):
        return True
    now = PLAN.clock()
    if PLAN.current is not None:  # the previous case, set-up included, ended here
        PLAN.longest = max(PLAN.longest, now - PLAN.current_start)
    PLAN.current = None
    if not PLAN.fits():
        if PLAN.exhausted_at is None:
            PLAN.exhausted_at = f"[{family}] {case}"
        PLAN.skipped.append({"family": family, "case": case, "reason": "budget"})
        raise BudgetExhausted(f"time budget of {PLAN.budget_s:.0f} s reached after {PLAN.elapsed():.0f} s: "
                              f"not starting [{family}] {case}")
    PLAN.current, PLAN.current_start = (family, case), now
    return True


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    # the vector ISA torch dispatches to is part of the name: results of an AVX2 and an AVX-512
    # CPU must not overwrite each other (they differ 2-3x in FLOP/s and in which form wins)
    isa = torch.backends.cpu.get_cpu_capability().lower()
    return f"cpu-{platform.machine()}-{isa}-{torch.get_num_threads()}threads"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else platform.processor()) and the vector ISA torch's
    kernels dispatch to: CPU timings are only comparable on the same kind of CPU (the CI VM has
    been a CPU with AVX-512 and an AMD EPYC with AVX2 only, under the same device name)"""
    import platform

    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def genfast_backends(device: torch.device, family: str) -> list[str]:
    """The genfast backends that can run `family` on `device` (not the reference)."""
    names = ["cuda", "triton"] if device.type == "cuda" else ["cpu"]
    out = []
    for n in names:
        if genfast.backend.available(n, device, family)[0] and genfast.backend.family_supports(family, n):
            out.append(n)
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return []


KINK_BAND = 1e-4


def kink_free_grad(dy: torch.Tensor, pre: torch.Tensor, band: float = KINK_BAND) -> torch.Tensor:
    """dy with zeros where the float64 pre-activation `pre` lies within band * max|pre| of 0, the
    kink of ReLU and LeakyReLU. For an output that close to 0, which side float32 rounding puts
    it on differs between correct products (one flipped output of the DCGAN 4x4 -> 8x8
    ConvT + BatchNorm + ReLU block moved grad_weight by 15, and eager's float32 flips some
    against float64 too); with dy 0 there, dz is 0 on both sides, so a fwd_bwd row's parity
    column measures the products' rounding and not a coin toss. A few dozen of ~10^5 values."""
    p = pre.detach().to(device=dy.device, dtype=torch.float64)
    near = p.abs() <= band * p.abs().amax() if p.numel() else torch.zeros_like(p, dtype=torch.bool)
    return dy.clone().masked_fill_(near, 0)  # dy's layout kept


def max_error(a, b) -> float:
    ta, tb = _flatten(a), _flatten(b)
    if len(ta) != len(tb):
        raise AssertionError(f"variant returned {len(ta)} tensors, reference {len(tb)}")
    err = 0.0
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            raise AssertionError(f"shape {tuple(x.shape)} vs reference {tuple(y.shape)}")
        if x.numel():
            err = max(err, (x.double() - y.double()).abs().max().item())
    return err


def _time_once(fn: Callable, device: torch.device, reps: int) -> float:
    """Milliseconds per call."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=max(reps, 20), return_mode="median"))
    # As timeit does: Python's cyclic garbage collector is off while a round runs, so that a full
    # collection - tens of ms once torch.compile has loaded its modules - is not charged to
    # whichever variant happened to allocate the triggering object.
    # Each call is timed on its own and the round reports the median call: on a shared CPU (the
    # 2-core CI machine is a VM) single calls stall for up to tens of ms now and then, and a mean
    # over the round charged those stalls to whichever variant was running.
    enabled = gc.isenabled()
    gc.disable()
    try:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3
    finally:
        if enabled:
            gc.enable()


STEAL_LIMIT = 0.02
STEAL_RETRIES = 4


def _cpu_ticks() -> Optional[tuple[int, int]]:
    """(steal, total) jiffies of all CPUs since boot, from /proc/stat (None where absent)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (vals[7] if len(vals) > 7 else 0), sum(vals[:8])


def _steal_fraction(before, after) -> Optional[float]:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def _timed_rounds(variants, device, reps, rounds):
    """(samples per variant, steal fraction) of the attempt with the least steal."""
    best = None
    for attempt in range(STEAL_RETRIES if device.type == "cpu" else 1):
        if attempt:
            time.sleep(0.5 * attempt)  # let a burst of steal pass
        before = _cpu_ticks()
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, fn in variants.items():
                samples[name].append(_time_once(fn, device, reps[name]))
        steal = _steal_fraction(before, _cpu_ticks())
        if best is None or (steal is not None and best[1] is not None and steal < best[1]):
            best = (samples, steal)
        if steal is None or steal < STEAL_LIMIT:
            break
    return best


def measure_copy_bandwidth(device: torch.device) -> float:
    """Bytes (read + written) per second of a large device copy: the memory-bound ceiling."""
    key = device_name(device)
    if key not in _COPY_BW:
        n = (256 << 20) // 4 if device.type == "cuda" else (32 << 20) // 4
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        ms = min(_time_once(lambda: dst.copy_(src), device, 5) for _ in range(3))
        _COPY_BW[key] = 2 * src.numel() * 4 / (ms * 1e-3)
    return _COPY_BW[key]


def measure(family: str, case: str, variants: dict[str, Callable], *, reference: str = "eager",
            bytes_moved: float | None = None, flops: float | None = None,
            launches: dict[str, int] | None = None, extra: dict[str, dict] | None = None,
            device: torch.device | None = None,
            rounds: int | None = None, min_round_ms: float = 20.0) -> dict:
    """Check parity, then time every variant interleaved; returns one result row. A case the
    run's filter excludes returns a row marked "skipped" without running anything; past the
    budget it raises BudgetExhausted (see configure)."""
    if not should_run(family, case):
        return {"family": family, "case": case, "skipped": "filtered", "variants": {}}
    t_case = PLAN.clock()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    outs = {}
    for name, fn in variants.items():
        outs[name] = fn()  # warm-up (and compilation) + the value checked for parity
    _sync(device)
    ref_out = outs[reference]
    errors = {name: max_error(out, ref_out) for name, out in outs.items()}
    # repetitions per round so that a round lasts about min_round_ms
    reps = {}
    for name, fn in variants.items():
        t = _time_once(fn, device, 1)
        reps[name] = max(1, int(min_round_ms / max(t, 1e-3)))
    # CPU: 7 rounds; 15 when a variant runs once per round (calls of 20 ms or more, e.g. the
    # training steps), whose median of 7 single calls moved 10% between runs on the CI VM.
    rounds = rounds or (5 if device.type == "cuda" else (15 if min(reps.values()) == 1 else 7))
    # On the CPU the rounds are repeated (up to STEAL_RETRIES times) while the hypervisor took
    # more than STEAL_LIMIT of the machine's time during them (steal time, /proc/stat): on the
    # shared 2-core CI VM a burst of steal slowed single variants 10-100x. The attempt with the
    # least steal is kept and its steal fraction recorded in the row.
    gc.collect()  # once, before timing; the collector stays off until the rounds are done
    gc.disable()
    try:
        best = _timed_rounds(variants, device, reps, rounds)
    finally:
        gc.enable()
    samples, steal = best
    med = {name: statistics.median(v) for name, v in samples.items()}
    row = {"family": family, "case": case, "reference": reference, "variants": {}}
    if steal is not None:
        row["cpu_steal"] = steal
    bw = measure_copy_bandwidth(device) if bytes_moved else None
    peak = next((v for k, v in _PEAK_FLOPS.items() if k in device_name(device)), None)
    for name in variants:
        v = {"median_ms": med[name], "max_abs_err": errors[name]}
        if "eager" in med:
            v["speedup_vs_eager"] = med["eager"] / med[name]
        if "compile" in med:
            v["speedup_vs_compile"] = med["compile"] / med[name]
        if bytes_moved:
            gbs = bytes_moved / (med[name] * 1e-3)
            v["GB/s"] = gbs / 1e9
            v["frac_of_copy_bw"] = gbs / bw
        if flops:
            v["TFLOP/s"] = flops / (med[name] * 1e-3) / 1e12
            if peak:
                v["frac_of_peak_flops"] = flops / (med[name] * 1e-3) / peak
        if launches and name in launches:
            v["launches"] = launches[name]
        if extra and name in extra:
            v.update(extra[name])
        row["variants"][name] = v
    row["seconds"] = PLAN.clock() - t_case
    PLAN.longest = max(PLAN.longest, row["seconds"])
    PLAN.rows.append(row)
    return row


def compiled(fn: Callable) -> Callable:
    """torch.compile of an eager function (the 'compile' baseline). Dynamo's caches are reset
    first: the benchmarks compile one function per case, and its earlier specialisations (other
    shapes, dtypes, modes) would reach the recompile limit, which is a hard error under
    fullgraph=True (and would add guard checks to every call)."""
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _fmt_variant(v: dict) -> str:
    s = f"{v['median_ms'] * 1e3:9.1f} us"
    if "speedup_vs_eager" in v:
        s += f"  x{v['speedup_vs_eager']:.2f} eager"
    if "speedup_vs_compile" in v:
        s += f"  x{v['speedup_vs_compile']:.2f} compile"
    if "frac_of_copy_bw" in v:
        s += f"  {v['GB/s']:.0f} GB/s ({100 * v['frac_of_copy_bw']:.0f}% of copy)"
    if "TFLOP/s" in v:
        s += (f"  {v['TFLOP/s']:.1f} TFLOP/s" if v["TFLOP/s"] >= 1.0
              else f"  {v['TFLOP/s'] * 1e3:.1f} GFLOP/s")
    if "peak_MiB" in v:
        s += f"  peak {v['peak_MiB']:.0f} MiB"
    s += f"  err {v['max_abs_err']:.1e}"
    return s


def print_row(row: dict) -> None:
    if row.get("skipped"):
        return
    print(f"[{row['family']}] {row['case']}", flush=True)
    for name, v in row["variants"].items():
        print(f"    {name:<16}{_fmt_variant(v)}", flush=True)
