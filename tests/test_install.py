"""Installation behaviour: the messages of setup.py under build isolation, the warning and the
fallback when genfast._C is missing or built against another torch, the package surface
(genfast.models, py.typed) and the pip metadata."""
import os
import shutil
import subprocess
import sys
import tomllib

import pytest
import torch

import genfast
from genfast import backend as B

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_build_env(tmp_path, with_torch):
    """A directory laid out like pip's isolated build environment, optionally holding a stub
    torch package (so that setup.py's checks run without importing the real torch)."""
    site = tmp_path / "pip-build-env-test" / "overlay" / "lib" / "site-packages"
    site.mkdir(parents=True)
    if with_torch:
        (site / "torch").mkdir()
        (site / "torch" / "__init__.py").write_text("__version__ = '9.9.9'\n")
    return site


def _run_setup(site, python=sys.executable):
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([python, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=120)


def test_setup_refuses_torch_from_a_build_environment(tmp_path):
    res = _run_setup(_fake_build_env(tmp_path, with_torch=True))
    assert res.returncode != 0
    assert "--no-build-isolation" in res.stderr and "pip-build-env-test" in res.stderr
    assert "9.9.9" in res.stderr


def test_setup_without_torch_in_a_build_environment_says_no_build_isolation(tmp_path):
    site = _fake_build_env(tmp_path, with_torch=False)
    # -S: no site-packages, so torch is not importable, as in pip's isolated environment
    # (setuptools is taken from the environment through PYTHONPATH).
    import setuptools

    setuptools_dir = os.path.dirname(os.path.dirname(setuptools.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(tmp_path / "st")]))
    (tmp_path / "st").mkdir()
    for pkg in ("setuptools", "_distutils_hack", "pkg_resources"):
        src = os.path.join(setuptools_dir, pkg)
        if os.path.isdir(src):
            os.symlink(src, tmp_path / "st" / pkg)
    res = subprocess.run([sys.executable, "-S", "setup.py", "--name"], cwd=ROOT, capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode != 0
    assert "torch is not importable" in res.stderr and "--no-build-isolation" in res.stderr


def test_missing_extension_warning_names_what_and_how(monkeypatch):
    monkeypatch.setattr(B.importlib.util, "find_spec", lambda name: None)
    with pytest.warns(RuntimeWarning) as rec:
        assert B._load_extension() is None
    msg = str(rec[0].message)
    assert "genfast._C is not built" in msg and B.BUILD_COMMAND in msg
    assert "circular import" not in msg


def test_extension_built_against_another_torch_is_not_loaded(monkeypatch):
    monkeypatch.setattr(B, "_build_torch_version", lambda: "1.0.0+other")
    with pytest.warns(RuntimeWarning, match=r"built against torch 1\.0\.0\+other but torch "
                      + torch.__version__.replace("+", r"\+")) as rec:
        assert B._load_extension() is None
    assert "reference" in str(rec[0].message) and B.BUILD_COMMAND in str(rec[0].message)


def test_build_info_records_the_torch_version():
    if not B.has_cpu_ext():
        pytest.skip("genfast._C is not built here")
    # genfast._C of this checkout was built by setup.py against the running torch.
    assert B._build_torch_version() == torch.__version__


def _package_copy(tmp_path, keep_extension):
    dst = tmp_path / "pkg"
    ignore = shutil.ignore_patterns("__pycache__", *(() if keep_extension else ("_C*.so", "_build_info.py")))
    shutil.copytree(os.path.join(ROOT, "genfast"), dst / "genfast", ignore=ignore)
    return dst


_FRESH_IMPORT = (
    "import sys, warnings, torch\n"
    # an editable install of genfast elsewhere in this environment would supply its genfast._C
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
    "with warnings.catch_warnings(record=True) as w:\n"
    "    warnings.simplefilter('always')\n"
    "    import genfast\n"
    "print('WARNINGS', [str(x.message) for x in w if 'genfast' in str(x.message)])\n"
    "print('MODELS', genfast.models.DCGANGenerator.__name__)\n"
    "g = genfast.convert(genfast.models.DCGANGenerator(nz=8, ngf=4, nc=1)).eval()\n"
    "with torch.no_grad():\n"
    "    print('OUT', tuple(g(torch.randn(2, 8)).shape))\n")


def _fresh_import(pkg_dir):
    env = dict(os.environ, PYTHONPATH=str(pkg_dir))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", _FRESH_IMPORT], cwd=str(pkg_dir), capture_output=True,
                          text=True, env=env, timeout=600)


def test_fresh_import_without_extension_warns_once_and_runs(tmp_path):
    res = _fresh_import(_package_copy(tmp_path, keep_extension=False))
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines() if " " in line)
    warned = eval(lines["WARNINGS"])  # a list literal printed by the child
    assert len(warned) == 1 and "genfast._C is not built" in warned[0] and B.BUILD_COMMAND in warned[0]
    assert lines["MODELS"] == "DCGANGenerator"  # genfast.models without importing it explicitly
    assert lines["OUT"] == "(2, 1, 64, 64)"


def test_package_is_typed_and_setup_ships_the_marker():
    assert os.path.isfile(os.path.join(os.path.dirname(genfast.__file__), "py.typed"))
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert '"py.typed"' in f.read()


def test_pip_metadata():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    project = meta["project"]
    extras = project["optional-dependencies"]
    assert {"scikit-learn", "matplotlib", "tqdm"} <= set(extras["demo"])
    assert "mypy" in extras["test"] and "pytest" in extras["test"] and "bench" in extras
    assert "License :: OSI Approved :: Apache Software License" in project["classifiers"]
    assert "Typing :: Typed" in project["classifiers"]
    assert os.path.isfile(os.path.join(ROOT, "LICENSE"))
    # torch is not a build requirement: build isolation must fail fast, not download a torch
    assert not any(r.split("=")[0].split(">")[0].strip() == "torch" for r in meta["build-system"]["requires"])



# --- which CUDA architectures setup.py compiles for ------------------------------------------------

_FAKE_GPU = ("import torch\n"
             "torch.cuda.is_available = lambda: True\n"
             "torch.cuda.device_count = lambda: 2\n"
             "torch.cuda.get_device_capability = lambda i=0: [(8, 6), (9, 0)][i]\n")


def _setup_line(tmp_path, fake_gpu=False, **env_vars):
    """The line setup.py prints about the CUDA kernels, for this environment (torch's CUDA build
    and a toolkit are made to look present through GENFAST_FORCE_CUDA where the test needs it)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_CUDA_ARCH_LIST", "GENFAST_NO_CUDA", "GENFAST_FORCE_CUDA")}
    env.update(env_vars)
    if fake_gpu:
        (tmp_path / "sitecustomize.py").write_text(_FAKE_GPU)
        env["PYTHONPATH"] = str(tmp_path)
    res = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    return next(line for line in res.stdout.splitlines() if line.startswith("genfast:"))


def _cuda_buildable():
    from torch.utils import cpp_extension
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def test_setup_skips_cuda_kernels_when_no_gpu_is_visible_and_no_arch_is_asked(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: setup.py compiles for it (covered by the fake-GPU test)")
    line = _setup_line(tmp_path)
    if _cuda_buildable():
        assert "no GPU visible" in line and "not compiled" in line
        assert "TORCH_CUDA_ARCH_LIST" in line and "GENFAST_FORCE_CUDA=1" in line
    else:
        assert "not compiled" in line


def test_setup_compiles_for_the_asked_or_visible_or_default_architectures(tmp_path):
    if not _cuda_buildable():
        pytest.skip("no CUDA toolkit or CPU-only torch: setup.py compiles no CUDA kernels here")
    assert _setup_line(tmp_path, TORCH_CUDA_ARCH_LIST="8.6").startswith(
        "genfast: compiling CUDA kernels for TORCH_CUDA_ARCH_LIST=8.6")
    assert "TORCH_CUDA_ARCH_LIST=8.0;9.0" in _setup_line(tmp_path, GENFAST_FORCE_CUDA="1")
    assert "visible GPUs, TORCH_CUDA_ARCH_LIST=8.6;9.0" in _setup_line(tmp_path, fake_gpu=True)
    assert "not compiled" in _setup_line(tmp_path, fake_gpu=True, GENFAST_NO_CUDA="1")


_ENV_BACKEND = """
import os, torch, genfast, genfast.functional as GF
x = torch.randn(8, 3)
print(genfast.backend.get_backend(), genfast.backend.resolve("batchnorm_act", x.device))
os.environ["GENFAST_BACKEND"] = "cpu"  # read once, at the first call: no effect now
print(genfast.backend.get_backend())
"""


@pytest.mark.parametrize("value, expected", [("reference", "reference reference"), ("", "auto cpu")])
def test_genfast_backend_environment_variable_sets_the_default(value, expected):
    env = dict(os.environ, GENFAST_BACKEND=value)
    res = subprocess.run([sys.executable, "-c", _ENV_BACKEND], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == expected
    assert lines[1] == expected.split()[0]


def test_bad_genfast_backend_environment_variable_names_itself():
    env = dict(os.environ, GENFAST_BACKEND="gpu")
    res = subprocess.run([sys.executable, "-c", _ENV_BACKEND], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode != 0
    assert "ValueError: GENFAST_BACKEND must be one of" in res.stderr and "'gpu'" in res.stderr
