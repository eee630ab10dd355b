"""torch.export of a converted generator: the exported program carries backend "auto", which each
genfast op resolves when it runs, so one program runs on CPU tensors here and on CUDA tensors in
the GPU suite. The program is saved, loaded and compared with the eager converted model."""
import os
import subprocess
import sys

import pytest
import torch

import genfast
from genfast import backend as B

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The converted DCGAN generator's graph holds genfast::conv_transpose2d ops (eval mode folds its
# BatchNorms into the convolutions); the MLP generator's holds genfast::product_act ops (its
# Linear -> BatchNorm1d -> act triples, BatchNorm folded into the Linear in eval).
OUT_SHAPE = {"dcgan": (3, 64, 64), "mlp": (48,)}


def _generator(name="dcgan"):
    torch.manual_seed(0)
    if name == "dcgan":
        g = genfast.models.DCGANGenerator(nz=16, ngf=8, nc=3)
    else:
        g = genfast.models.MLPGenerator(nz=16, out_dim=48, hidden=(32, 64))
    with torch.no_grad():  # non-trivial running statistics, so eval mode normalises for real
        for m in g.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return genfast.convert(g).eval()


def _genfast_backend_args(ep):
    """The `backend` argument of every genfast op call in the exported graph."""
    args = []
    for node in ep.graph.nodes:
        if node.op == "call_function" and "genfast" in str(node.target):
            schema = node.target._schema
            for arg, value in zip(schema.arguments, node.args):
                if arg.name == "backend":
                    args.append(value)
            if "backend" in node.kwargs:
                args.append(node.kwargs["backend"])
    return args


def _export(g, z):
    return torch.export.export(g, (z,))


@pytest.mark.parametrize("name,op", [("dcgan", "conv_transpose2d"), ("mlp", "product_act")])
def test_exported_generator_runs_after_save_and_load(tmp_path, name, op):
    g = _generator(name)
    z = torch.randn(4, 16)
    with torch.no_grad():
        eager = g(z)
    ep = _export(g, z)
    assert any(f"genfast.{op}" in str(n.target) for n in ep.graph.nodes)
    backends = _genfast_backend_args(ep)
    # genfast ops are in the graph, none pinned to a device's backend
    assert len(backends) >= 2 and set(backends) == {"auto"}, backends
    path = tmp_path / "generator.pt2"
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path))
    out = loaded.module()(z)
    assert out.shape == (4,) + OUT_SHAPE[name]
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    z2 = torch.randn(4, 16)
    with torch.no_grad():  # a second input: the program is not specialised to the first
        torch.testing.assert_close(loaded.module()(z2), g(z2), atol=1e-5, rtol=1e-5)


def test_pinned_backend_is_kept_in_the_exported_graph():
    g = _generator()
    z = torch.randn(2, 16)
    with B.use_backend("cpu"):
        ep = _export(g, z)
    assert set(_genfast_backend_args(ep)) == {"cpu"}


def test_auto_resolves_per_device_when_the_op_runs():
    # What an op given "auto" runs on each device; torch.device("cuda") needs no GPU to resolve.
    assert B.at_run("conv_transpose", "auto", torch.device("cpu")) == "cpu"
    assert B.at_run("batchnorm_act", "auto", torch.device("cpu")) == "cpu"
    if B.has_triton():
        assert B.at_run("conv_transpose", "auto", torch.device("cuda")) == B.AUTO_CUDA["conv_transpose"]
    assert B.at_run("batchnorm_act", "reference", torch.device("cpu")) == "reference"
    assert B.at_run("batchnorm_act", "triton", torch.device("cpu")) == "triton"


def test_auto_without_a_fused_kernel_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(B, "has_cpu_ext", lambda: False)
    with pytest.raises(RuntimeError, match="no fused conv_transpose kernel is available"):
        B.at_run("conv_transpose", "auto", torch.device("cpu"))


def test_program_loads_in_a_fresh_interpreter_after_import_genfast(tmp_path):
    g = _generator()
    z = torch.randn(3, 16)
    with torch.no_grad():
        eager = g(z)
    path = tmp_path / "generator.pt2"
    torch.export.save(_export(g, z), str(path))
    torch.save({"z": z, "eager": eager}, str(tmp_path / "io.pt"))
    script = (
        "import sys, torch, genfast\n"
        "ep = torch.export.load(sys.argv[1])\n"
        "io = torch.load(sys.argv[2])\n"
        "torch.testing.assert_close(ep.module()(io['z']), io['eager'], atol=1e-5, rtol=1e-5)\n"
        "print('parity ok')\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "io.pt")],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert res.returncode == 0, res.stderr
    assert "parity ok" in res.stdout


def test_jit_script_fails_with_a_clear_message():
    g = _generator()
    with pytest.raises(RuntimeError, match="torch.jit.script is not supported.*torch.export"):
        torch.jit.script(g)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["dcgan", "mlp"])
def test_program_exported_on_cpu_runs_on_cuda(cuda_device, tmp_path, name):
    g = _generator(name)
    z = torch.randn(4, 16)
    path = tmp_path / "generator.pt2"
    torch.export.save(_export(g, z), str(path))
    loaded = torch.export.load(str(path))
    on_cuda = torch.export.passes.move_to_device_pass(loaded, cuda_device)
    zc = z.to(cuda_device)
    out = on_cuda.module()(zc)
    assert out.device.type == "cuda"
    with torch.no_grad():
        expected = g.to(cuda_device)(zc)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
