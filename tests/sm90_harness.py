"""Compile what genfast's Triton launchers launch, for a GPU that is not here.

`compile_launches(arch)` replaces Triton's active driver with a stub whose target is
GPUTarget("cuda", arch, 32) and turns every launch of a JITFunction (and of an Autotuner: one
compilation per config) into a compilation with Triton's real compiler; nothing runs. Inside the
block, tensors created on "cuda" are fake (torch's FakeTensorMode: shapes, strides, dtypes, no
data), so the launchers take the plans they take on a GPU (tile sizes, warps, splits from a fake
132-SM device); CPU tensors work too and give the launchers' CPU (interpreter) plan.
`torch.cuda.device(...)` is replaced by a recorder, so each record also says how many launches
ran outside a device guard for their tensors' device.

Triton decides at decoration time whether a kernel is interpreted, so this module must run in a
process without TRITON_INTERPRET (tests/conftest.py sets it for the test process):
`run_isolated("module:function", ...)` runs a function that returns records in such a
subprocess and returns its records, optionally with another Triton first on sys.path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import types
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_LIMIT = 232448          # bytes of shared memory one block may use on sm_90 (227 KB)
FAKE_SMS = 132                 # multiprocessors of the fake device (an H100 SXM has 132)
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)
_MARK = "@@sm90-records@@"


@dataclass
class Compiled:
    """One compiled specialisation of one kernel, as a launcher launched it."""
    name: str                   # kernel function name
    constants: dict             # constexpr parameters (dtypes as strings)
    num_warps: int
    num_stages: int
    n_regs: int                 # registers per thread (ptxas -v)
    n_spills: int               # spill stores + spill loads, bytes (ptxas -v)
    shared: int                 # shared memory per block, bytes (Triton's dynamic + ptxas static)
    ptx: str
    sass_or_cubin_info: Optional[str]   # the ptxas -v report
    signature: dict = field(default_factory=dict)   # Triton type of each runtime argument
    launcher: str = ""          # the genfast function that launched it (module.function)
    launches: int = 0           # launches that compiled to this specialisation
    unguarded: int = 0          # of those, launches with CUDA tensors outside their device's guard
    grids: list = field(default_factory=list)       # distinct launch grids (first 8)
    stack_bytes: int = 0        # ptxas "bytes stack frame"
    triton_version: str = ""
    specialised: list = field(default_factory=list)  # Triton's integer/pointer specialisations, "arg:attr"
    tags: dict = field(default_factory=dict)        # free-form labels set by the caller (e.g. the case)

    def has(self, *opcodes: str) -> bool:
        """True when the PTX contains any of the given substrings (e.g. "wgmma", "mma.sync")."""
        return any(op in self.ptx for op in opcodes)

    @property
    def config(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in sorted(self.constants.items()))
        return f"w{self.num_warps}s{self.num_stages} {consts}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def uses_nan_max(record: Compiled) -> bool:
    """True when the PTX uses the NaN-propagating form of max or min (max.NaN / min.NaN), which is
    what tl.maximum/tl.minimum(..., propagate_nan=tl.PropagateNan.ALL) compile to."""
    return re.search(r"\b(max|min)(\.[a-z0-9]+)*\.NaN\b", record.ptx) is not None


def nan_dropping_max(record: Compiled) -> list[str]:
    """The floating-point max/min instructions of the PTX that drop NaN (no .NaN modifier)."""
    return re.findall(r"\b(?:max|min)(?!\S*\.NaN)(?:\.[a-z0-9]+)*\.f(?:16|32|64)(?:x2)?\b", record.ptx)


def summary_table(records: Sequence[Compiled]) -> str:
    """One line per compiled kernel: name, launcher, config, registers, shared memory, spills."""
    rows = [("kernel", "launcher", "regs", "shared", "spills", "launches", "config")]
    for r in records:
        rows.append((r.name, r.launcher.rsplit(".", 1)[-1], str(r.n_regs), str(r.shared),
                     str(r.n_spills), str(r.launches), r.config))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:6], widths)) + "  " + row[6]
                     for row in rows)


# --- ptxas -------------------------------------------------------------------------------------

_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "smem": re.compile(r"(\d+) bytes smem"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_path(arch: int) -> str:
    """The ptxas shipped with the imported Triton for this architecture."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(arch).path


@functools.lru_cache(maxsize=None)
def _triton_ptxas_flags() -> tuple[str, ...]:
    """The register-allocation flags Triton's own ptxas call uses (they change the spill count)."""
    from triton.backends.nvidia.compiler import CUDABackend
    src = inspect.getsource(CUDABackend.make_cubin)
    return tuple(re.findall(r"'(--regAllocOptLevel=\d)'", src))


def cubin_resources(cubin: bytes, arch: int) -> dict:
    """REG / STACK / SHARED / LOCAL of the compiled kernel, from cuobjdump -res-usage on the
    cubin Triton produced (the tool ships next to ptxas)."""
    tool = os.path.join(os.path.dirname(ptxas_path(arch)), "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        r = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cuobjdump failed ({r.returncode}):\n{r.stderr}")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", r.stdout)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{r.stdout}")
    return {"text": r.stdout, **dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))}


def ptxas_report(ptx: str, arch: int, fmad: bool = True) -> dict:
    """Run the Triton-shipped ptxas with -v (and Triton's register-allocation flags) on `ptx`:
    registers, static shared, stack, spills."""
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas_path(arch), "-v", *([] if fmad else ["--fmad=false"]), *_triton_ptxas_flags(),
               f"--gpu-name={sm}", src,
               "-o", os.path.join(d, "k.cubin")]
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed ({r.returncode}):\n{r.stderr}")
    log = r.stderr + r.stdout
    out = {k: sum(int(v) for v in rx.findall(log)) if k.startswith("spill") else
           max([int(v) for v in rx.findall(log)] or [0]) for k, rx in _PTXAS_RE.items()}
    out["log"] = log
    return out


# --- fake CUDA device --------------------------------------------------------------------------

class _GuardRecorder:
    """Stands in for torch.cuda.device: records the devices entered."""
    stack: list[int] = []

    def __init__(self, device):
        import torch
        if isinstance(device, torch.device):
            idx = device.index if device.index is not None else 0
        elif isinstance(device, str):
            idx = torch.device(device).index or 0
        elif device is None or device == -1:
            idx = None
        else:
            idx = int(device)
        self.idx = idx

    def __enter__(self):
        _GuardRecorder.stack.append(self.idx if self.idx is not None else _current_device())
        return self

    def __exit__(self, *exc):
        _GuardRecorder.stack.pop()
        return False


def _current_device() -> int:
    return _GuardRecorder.stack[-1] if _GuardRecorder.stack else 0


def _fake_properties(arch: int):
    def props(device=None):
        return types.SimpleNamespace(
            name=f"fake sm_{arch} device (genfast sm90_harness)", major=arch // 10, minor=arch % 10,
            multi_processor_count=FAKE_SMS, total_memory=80 * 2 ** 30, L2_cache_size=50 * 2 ** 20,
            max_threads_per_multi_processor=2048, shared_memory_per_block_optin=SHARED_LIMIT,
            warp_size=32)
    return props


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _stub_driver(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StubDriver(DriverBase):
        """Triton's driver for a device that is not here: a fixed target, device 0 (or the
        recorded guard's device), stream 0; nothing can be launched."""
        target = GPUTarget("cuda", arch, 32)

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            from triton.backends.nvidia.driver import ty_to_cpp
            return ty_to_cpp(ty)

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            import torch
            return torch.device("cuda", _current_device())

        def get_current_device(self):
            return _current_device()

        def set_current_device(self, device):
            raise RuntimeError("sm90_harness: the stub driver cannot change the device")

        def get_current_stream(self, device=None):
            return 0

        def get_device_interface(self):
            import torch
            return torch.cuda

        def get_benchmarker(self):
            raise RuntimeError("sm90_harness: nothing can be timed without a GPU")

    return StubDriver()


# --- launch interception -----------------------------------------------------------------------

def _launcher_name() -> str:
    """The innermost genfast function outside Triton on the call stack."""
    for fr in inspect.stack(context=0)[2:]:
        mod = fr.frame.f_globals.get("__name__", "")
        if mod.startswith("genfast"):
            return f"{mod}.{fr.function}"
    return "?"


def _const_repr(v):
    if v.__class__.__name__ == "dtype":
        return str(v)
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return repr(v)


def _specialisations(jit_fn, kernel) -> list[str]:
    """Triton's specialisations of the runtime arguments (divisibility by 16, ...), as arg:attr."""
    names = [p.name for p in jit_fn.params]
    out = []
    for path, attrs in sorted(getattr(kernel.src, "attrs", {}).items()):
        name = names[path[0]] if path and path[0] < len(names) else str(path)
        for a in attrs:
            out.append(f"{name}:{a[0].replace('tt.', '')}={a[1]}" if isinstance(a, (list, tuple)) else f"{name}:{a}")
    return out


class _Session:
    def __init__(self, arch: int):
        self.arch = arch
        self.records: list[Compiled] = []
        self.by_kernel: dict[int, Compiled] = {}

    def record(self, jit_fn, kernel, args, kwargs, grid):
        import torch
        import triton
        sig = inspect.signature(jit_fn.fn)
        call_kwargs = {k: v for k, v in kwargs.items() if k in sig.parameters}
        bound = sig.bind(*args, **call_kwargs)
        bound.apply_defaults()
        named = dict(bound.arguments)
        if callable(grid):
            grid = grid({**named, **{k: v for k, v in kwargs.items() if k not in named}})
        grid = tuple(int(g) for g in grid)
        grid = grid + (1,) * (3 - len(grid))
        devices = {a.device.index or 0 for a in named.values()
                   if isinstance(a, torch.Tensor) and a.device.type == "cuda"}
        guarded = not devices or (bool(_GuardRecorder.stack) and devices == {_GuardRecorder.stack[-1]})
        rec = self.by_kernel.get(id(kernel))
        if rec is None:
            meta = kernel.metadata
            ptx = kernel.asm["ptx"]
            rep = ptxas_report(ptx, self.arch, getattr(meta, "enable_fp_fusion", True))
            res = cubin_resources(kernel.asm["cubin"], self.arch)
            if res["REG"] != rep["regs"]:
                raise RuntimeError(f"{jit_fn.fn.__name__}: ptxas -v reports {rep['regs']} registers, "
                                   f"Triton's cubin has {res['REG']}: the ptxas flags differ from Triton's")
            consts = {p.name: _const_repr(named[p.name]) for p in jit_fn.params if p.is_constexpr}
            types_ = {p.name: (str(named[p.name].dtype) if isinstance(named[p.name], torch.Tensor)
                               else type(named[p.name]).__name__)
                      for p in jit_fn.params if not p.is_constexpr}
            rec = Compiled(name=jit_fn.fn.__name__, constants=consts, num_warps=meta.num_warps,
                           num_stages=meta.num_stages, n_regs=rep["regs"],
                           n_spills=rep["spill_st"] + rep["spill_ld"],
                           shared=max(int(meta.shared), rep["smem"], res["SHARED"]), ptx=ptx,
                           sass_or_cubin_info=rep["log"] + res["text"], signature=types_,
                           launcher=_launcher_name(), stack_bytes=max(rep["stack"], res["STACK"]),
                           triton_version=triton.__version__,
                           specialised=_specialisations(jit_fn, kernel))
            self.by_kernel[id(kernel)] = rec
            self.records.append(rec)
        rec.launches += 1
        rec.unguarded += 0 if guarded else 1
        if grid not in rec.grids and len(rec.grids) < 8:
            rec.grids.append(grid)


_ACTIVE: list[_Session] = []


def _jit_run(orig):
    @functools.wraps(orig)
    def run(self, *args, grid, warmup, **kwargs):
        if not _ACTIVE:
            return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
        session = _ACTIVE[-1]
        from triton.runtime.driver import driver
        target = driver.active.get_current_target()
        dev = driver.active.get_current_device()
        if dev in self.device_caches and self.device_caches[dev][2] != target:
            self.device_caches.clear()
        kernel = orig(self, *args, grid=grid, warmup=True, **kwargs)
        if not warmup:
            session.record(self, kernel, args, kwargs, grid)
        return kernel
    return run


def _autotuner_run(orig):
    @functools.wraps(orig)
    def run(self, *args, **kwargs):
        if not _ACTIVE:
            return orig(self, *args, **kwargs)
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)
        ret = None
        for config in configs:
            ret = self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None
        return ret
    return run


@contextlib.contextmanager
def compile_launches(arch: int = 90, *, fake_cuda: bool = True) -> Iterator[list[Compiled]]:
    """Inside the block, every Triton kernel launch (JITFunction and Autotuner, all configs of an
    autotuned kernel) made by genfast's launchers is compiled for GPUTarget('cuda', arch, 32)
    with Triton's real compiler instead of being run; the yielded list fills with one Compiled
    record per distinct compiled specialisation.

    With fake_cuda (default), tensors made on "cuda" inside the block are fake tensors and
    torch.cuda's device guard / properties are stand-ins (a 132-SM device), so launchers plan as
    on a GPU; CPU tensors are accepted too. Needs a process without TRITON_INTERPRET."""
    import torch
    import triton
    from triton.runtime import autotuner, jit
    from triton.runtime.driver import driver

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or getattr(
            getattr(triton, "knobs", None) and triton.knobs.runtime, "interpret", False):
        raise RuntimeError("compile_launches needs a process without TRITON_INTERPRET "
                           "(kernels decorated under the interpreter cannot be compiled); "
                           "use sm90_harness.run_isolated")
    session = _Session(arch)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(jit.JITFunction, "run", _jit_run(jit.JITFunction.run)))
        stack.enter_context(_patched(autotuner.Autotuner, "run", _autotuner_run(autotuner.Autotuner.run)))
        old_active = driver._active
        driver.set_active(_stub_driver(arch))
        stack.callback(setattr, driver, "_active", old_active)
        if fake_cuda:
            from torch._subclasses.fake_tensor import FakeTensorMode
            stack.enter_context(_patched(torch.cuda, "device", _GuardRecorder))
            stack.enter_context(_patched(torch.cuda, "current_device", _current_device))
            stack.enter_context(_patched(torch.cuda, "get_device_properties", _fake_properties(arch)))
            stack.enter_context(_patched(torch.cuda, "get_device_capability",
                                         lambda device=None: (arch // 10, arch % 10)))
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        _ACTIVE.append(session)
        stack.callback(_ACTIVE.pop)
        yield session.records


# --- running in a clean subprocess -------------------------------------------------------------

def _encode(v):
    if isinstance(v, Compiled):
        return {"__compiled__": v.to_json()}
    if isinstance(v, dict):
        return {k: _encode(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    return v


def _decode(v):
    if isinstance(v, dict):
        if "__compiled__" in v:
            d = v["__compiled__"]
            return Compiled(**{**d, "grids": [tuple(g) for g in d["grids"]]})
        return {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def _child(target: str, args_json: str) -> None:
    mod, fn = target.split(":")
    result = getattr(importlib.import_module(mod), fn)(*json.loads(args_json))
    print(_MARK + json.dumps(_encode(result)))


def run_isolated(target: str, *args, sys_path_first: Sequence[str] = (), timeout: float = 1800,
                 env: Optional[dict] = None):
    """Run `target` ("package.module:function") with JSON-able `args` in a subprocess without
    TRITON_INTERPRET, the worktree root on sys.path and `sys_path_first` before everything (e.g.
    a directory holding another Triton); returns what it returned (JSON values and Compiled
    records, nested in lists and dicts). Raises RuntimeError with the child's output when it
    fails."""
    child_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child_env.update(env or {})
    paths = [*sys_path_first, ROOT]
    code = ("import sys; sys.path[:0] = " + repr(paths) + "\n"
            "from tests.sm90_harness import _child\n"
            f"_child({target!r}, {json.dumps(list(args))!r})\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env, capture_output=True,
                       text=True, timeout=timeout)
    out = [line for line in r.stdout.splitlines() if line.startswith(_MARK)]
    if r.returncode != 0 or not out:
        raise RuntimeError(f"{target} failed in the compile subprocess (rc {r.returncode}):\n"
                           f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return _decode(json.loads(out[-1][len(_MARK):]))
