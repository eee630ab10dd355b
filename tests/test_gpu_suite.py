"""benchmarks/gpu_suite.sh and the budget logic of benchmarks/run_all.py, on the CPU: the dry run's
plan (steps, per-step budgets within the 8 / 4 minute totals, nothing heavy run), and run_all
with a budget and a case filter over a stand-in benchmark family driven by a fake clock."""
import json
import os
import re
import subprocess
import sys
import time
import types

import pytest
import torch

from benchmarks import harness, report, run_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")


def _dry_run(tmp_path, *flags):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    t0 = time.monotonic()
    r = subprocess.run(["bash", SCRIPT, "--dry-run", *flags], capture_output=True, text=True, env=env,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout, out, time.monotonic() - t0


def _budgets(plan: str) -> dict:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"step (\w+)\s+<= (\d+) s", plan)}


@pytest.mark.parametrize("quick,total", [(False, 480), (True, 240)])
def test_dry_run_plan_fits_the_time_limit(tmp_path, quick, total):
    stdout, out, seconds = _dry_run(tmp_path, *(["--quick"] if quick else []))
    steps = _budgets(stdout)
    assert list(steps) == ["build", "tests", "benchmarks", "report"]
    assert sum(steps.values()) == total, stdout
    assert all(v > 0 for v in steps.values())
    assert f"total budget {total} s" in stdout
    assert "TORCH_CUDA_ARCH_LIST=9.0" in stdout and f"MAX_JOBS={os.cpu_count()}" in stdout
    # run_all's own dry run: the benchmark budget handed down, and the --quick case filters
    assert f"budget {steps['benchmarks']} s" in stdout
    for fam in run_all.FAMILIES:
        line = next(ln for ln in stdout.splitlines() if ln.strip().startswith(f"{fam}:"))
        if quick:
            assert run_all.QUICK[fam] in line
        else:
            assert "every case" in line
    # nothing heavy ran: no build, no logs, no results
    assert sorted(p.name for p in out.iterdir()) == ["plan.txt", "results"]
    assert not any((out / "results").iterdir())
    assert seconds < 60


def test_unknown_argument_is_refused(tmp_path):
    r = subprocess.run(["bash", SCRIPT, "--fast"], capture_output=True, text=True,
                       env={**os.environ, "OUT": str(tmp_path)}, timeout=60)
    assert r.returncode == 2 and "unknown argument --fast" in r.stderr


class FakeClock:
    """Advances only when a stand-in benchmark variant runs: each call costs `step` seconds."""

    def __init__(self, step=1.0):
        self.t, self.step = 0.0, step

    def __call__(self):
        return self.t


def _fake_family(clock, n_cases=6):
    mod = types.ModuleType("benchmarks.bench_fakefam")

    def run(device, quick):
        rows = []
        for i in range(n_cases):
            def fn():
                clock.t += clock.step
                time.sleep(0.002)
                return torch.ones(3)
            rows.append(harness.measure("fakefam", f"case {i}", {"eager": fn, "genfast-cpu": fn},
                                        device=torch.device("cpu"), rounds=1, min_round_ms=1.0))
            harness.print_row(rows[-1])
        return rows

    mod.run = run
    return mod


def _run(monkeypatch, tmp_path, clock, *flags):
    monkeypatch.setitem(sys.modules, "benchmarks.bench_fakefam", _fake_family(clock))
    monkeypatch.setattr(harness, "STEAL_RETRIES", 1)  # no repeated rounds: the fake clock counts calls
    assert run_all.main(["--families", "fakefam", "--out", str(tmp_path), *flags], clock=clock) == 0
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    return json.loads(path.read_text())


def test_budget_stops_starting_cases_and_says_so(monkeypatch, tmp_path, capsys):
    clock = FakeClock()
    # each case: warm-up, one sizing call, one round for each of 2 variants = 6 fake seconds
    res = _run(monkeypatch, tmp_path, clock, "--budget-s", "20")
    assert [r["case"] for r in res["rows"]] == ["case 0", "case 1", "case 2"]
    assert all(r["seconds"] == 6.0 for r in res["rows"])
    b = res["budget"]
    assert b["stopped_families"] == ["fakefam"] and b["first_not_started"] == "[fakefam] case 3"
    assert b["elapsed_s"] == 18.0 <= b["budget_s"] == 20.0
    out = capsys.readouterr().out
    assert "BUDGET: 20 s reached; not started: [fakefam] case 3" in out
    text = report.summary(res, "ok", "3 passed in 1.0s")
    assert "BUDGET: 20 s reached after 18 s; first case not started: [fakefam] case 3" in text
    assert re.search(r"fakefam\s+genfast-cpu\s+3\s", text)


def test_without_budget_every_case_runs(monkeypatch, tmp_path):
    res = _run(monkeypatch, tmp_path, FakeClock())
    assert len(res["rows"]) == 6 and res["budget"]["stopped_families"] == []


def test_quick_filter_keeps_only_matching_cases(monkeypatch, tmp_path):
    monkeypatch.setitem(run_all.QUICK, "fakefam", r"^case [14]$")
    res = _run(monkeypatch, tmp_path, FakeClock(), "--quick", "--budget-s", "100")
    assert [r["case"] for r in res["rows"]] == ["case 1", "case 4"]
    assert res["budget"]["quick"] is True
    assert "fakefam" in report.markdown(res)


def test_summary_reports_error_speedups_and_launches():
    def v(ms, err, launches=None):
        d = {"median_ms": ms, "max_abs_err": err}
        if launches is not None:
            d["launches"] = launches
        return d

    rows = []
    for case, (e, c, g) in {"a": (2.0, 1.0, 1.0), "b": (8.0, 4.0, 2.0)}.items():
        variants = {"eager": v(e, 0.0, 9), "compile": v(c, 1e-7), "genfast-triton": v(g, 3e-6 if case == "a" else 1e-6, 2)}
        for k in variants:
            variants[k]["speedup_vs_eager"] = e / variants[k]["median_ms"]
            variants[k]["speedup_vs_compile"] = c / variants[k]["median_ms"]
        rows.append({"family": "losses", "case": case, "variants": variants})
    meta = {"device": "NVIDIA H200", "torch": "t", "triton": "3.6.0", "cuda": "13.0", "commit": "abcdef1234567"}
    text = report.summary({"meta": meta, "rows": rows}, "ok in 80 s", "1 failed, 20 passed in 30.0s")
    lines = text.splitlines()
    assert lines[1] == "build: ok in 80 s" and lines[2] == "tests: 1 failed, 20 passed in 30.0s"
    (line,) = [ln for ln in lines if ln.startswith("losses")]
    # speed-up vs eager: 2x and 4x -> geometric mean 2.83x; vs compile: 1x and 2x -> 1.41x
    assert "3.0e-06" in line and "2.83x (2.00..4.00)" in line and "1.41x (1.00..2.00)" in line
    assert line.endswith("2 (eager 9)")


def test_tests_line_reads_pytest_counts_and_interruption():
    assert report.tests_line("....\n==== 2 failed, 40 passed, 3 skipped in 61.20s ====\n") == \
        "2 failed, 40 passed, 3 skipped in 61.20s"
    log = "..\n!!! KeyboardInterrupt !!!\n==== 12 passed in 45.01s ====\n"
    assert report.tests_line(log) == "12 passed in 45.01s (stopped at its time budget)"
    assert report.tests_line("").startswith("no pytest summary")


def test_rounds_repeat_while_the_hypervisor_steals_and_keep_the_least_stolen(monkeypatch):
    """On the CPU a case's rounds are timed again (after a pause) while steal time exceeds
    STEAL_LIMIT; the attempt with the least steal is reported, with its steal fraction."""
    # (steal, total) jiffies read before and after each attempt: 30%, 10%, then 1% steal
    ticks = iter([(0, 0), (30, 100), (30, 100), (40, 200), (40, 200), (41, 300)])
    monkeypatch.setattr(harness, "_cpu_ticks", lambda: next(ticks))
    monkeypatch.setattr(harness.time, "sleep", lambda s: None)
    harness.configure()  # no budget or filter left from an earlier test
    calls = []
    row = harness.measure("fakefam", "steal case", {"eager": lambda: calls.append(1) or torch.ones(2)},
                          device=torch.device("cpu"), rounds=2, min_round_ms=1e-6)
    assert row["cpu_steal"] == pytest.approx(0.01)
    assert len(calls) == 1 + 1 + 3 * 2  # warm-up, sizing, three attempts of two one-call rounds
    ticks2 = iter([(0, 0), (50, 100), (50, 100), (90, 200)] + [(90, 200), (190, 300)] * 3)
    monkeypatch.setattr(harness, "_cpu_ticks", lambda: next(ticks2))
    row = harness.measure("fakefam", "steal case 2", {"eager": lambda: torch.ones(2)},
                          device=torch.device("cpu"), rounds=1, min_round_ms=1e-6)
    assert row["cpu_steal"] == pytest.approx(0.4)  # all over the limit: the least of 50/40/100%


def test_markdown_gives_each_variant_its_own_error_column():
    """torch.compile's error against eager must not show as genfast's: one column per variant."""
    meta = {"device": "cpu-test", "torch": "t", "triton": "t", "cuda": None, "commit": "0123456789ab",
            "date": "d", "copy_bandwidth_GBps": 1.0}
    row = {"family": "fam", "case": "c", "reference": "eager",
           "variants": {"eager": {"median_ms": 1.0, "max_abs_err": 0.0},
                        "compile": {"median_ms": 0.5, "max_abs_err": 0.36, "speedup_vs_eager": 2.0},
                        "genfast-cpu": {"median_ms": 0.25, "max_abs_err": 7.6e-05, "speedup_vs_eager": 4.0,
                                        "speedup_vs_compile": 2.0}}}
    lines = report.markdown({"meta": meta, "rows": [row]}).splitlines()
    head = next(ln for ln in lines if ln.startswith("| case"))
    cells = [c.strip() for c in head.strip("|").split("|")]
    body = [c.strip() for c in lines[lines.index(head) + 2].strip("|").split("|")]
    got = dict(zip(cells, body))
    assert got["compile max err"] == "3.6e-01" and got["genfast-cpu max err"] == "7.6e-05"
    assert "eager max err" not in got and "max err" not in got
    assert lines[0].startswith("Device: cpu-test; torch t")  # no CPU model recorded: none shown
    meta.update(cpu="AMD EPYC, AVX2", cpu_row_gemm="auto (off)")
    head_line = report.markdown({"meta": meta, "rows": [row]}).splitlines()[0]
    assert head_line.startswith("Device: cpu-test (AMD EPYC, AVX2; row-layout GEMM auto (off)); torch t")
    meta.update(cpu_winograd="never")
    head_line = report.markdown({"meta": meta, "rows": [row]}).splitlines()[0]
    assert head_line.startswith("Device: cpu-test (AMD EPYC, AVX2; row-layout GEMM auto (off); Winograd k4/k5 s2 never); torch t")


@pytest.mark.parametrize("call_ms, rounds", [(30.0, 15), (1.0, 7)])
def test_cpu_cases_of_single_call_rounds_get_more_rounds(monkeypatch, call_ms, rounds):
    """On the CPU a case whose variants run once per round (calls of min_round_ms or more) is
    timed over 15 rounds instead of 7: a median of 7 single calls moved 10% between runs."""
    monkeypatch.setattr(harness, "STEAL_RETRIES", 1)
    harness.configure()
    seen = []

    def fake_time_once(fn, device, reps):
        seen.append(reps)
        return call_ms

    monkeypatch.setattr(harness, "_time_once", fake_time_once)
    harness.measure("fakefam", "rounds case", {"eager": lambda: torch.ones(2), "other": lambda: torch.ones(2)},
                    device=torch.device("cpu"))
    assert len(seen) == 2 + 2 * rounds  # one sizing call per variant, then the rounds


def test_kink_free_grad_zeroes_dy_only_at_the_kink():
    # a float32 ConvT output near 0: which side of ReLU's kink it lands on is rounding; dy is
    # zeroed exactly where the float64 pre-activation is within the band, untouched elsewhere
    g = torch.Generator().manual_seed(7)
    pre = torch.randn(4, 8, 6, 6, generator=g, dtype=torch.float64)
    pre[0, 0, 0, :3] = torch.tensor([0.0, 3e-5, -2e-4])  # max|pre| is ~4: band 4e-4
    dy = torch.randn(4, 8, 6, 6, generator=g).to(memory_format=torch.channels_last)
    out = harness.kink_free_grad(dy, pre)
    near = pre.abs() <= harness.KINK_BAND * pre.abs().max()
    assert near[0, 0, 0, :3].all() and 3 <= int(near.sum()) < 20
    assert (out[near] == 0).all()
    assert torch.equal(out[~near], dy[~near])
    assert out.dtype == dy.dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert harness.kink_free_grad(dy[:0], pre[:0]).shape == (0, 8, 6, 6)
