"""Test set-up. Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set here,
before genfast is imported: the triton backend then runs on CPU tensors. The GPU suite
(benchmarks/gpu_suite.sh) sets GENFAST_TEST_DEVICE=cuda and runs real Triton kernels.
No test queries a GPU at import time."""
import os

GPU_RUN = os.environ.get("GENFAST_TEST_DEVICE", "cpu") == "cuda"
# A fresh inductor cache per test run: inductor's FX-graph cache does not key on a custom op's
# fake implementation, so a cache left by an earlier build can replay stale output dtypes.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="genfast-inductor-")
if not GPU_RUN:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import genfast  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device and GENFAST_TEST_DEVICE=cuda (benchmarks/gpu_suite.sh)")
    skip_cpu = pytest.mark.skip(reason="CPU/interpreter test; the GPU run covers the gpu-marked tests")
    for item in items:
        if "gpu" in item.keywords and not GPU_RUN:
            item.add_marker(skip_gpu)
        if "gpu" not in item.keywords and GPU_RUN and "anydevice" not in item.keywords:
            item.add_marker(skip_cpu)


@pytest.fixture(autouse=True)
def _seed_and_backend():
    torch.manual_seed(1234)
    with genfast.backend.use_backend("auto"):
        yield


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")
