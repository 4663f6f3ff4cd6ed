import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cuda_path():
    """The switches that the device picks on CUDA, forced on the CPU (restored afterwards)."""
    from efficient_transformers.functional.paths import cuda_paths

    with cuda_paths():
        yield


@pytest.fixture
def eager_flex(monkeypatch):
    """FlexAttention's eager reference in place of the compiled kernel (`flex._compiled_flex`),
    its device check lifted: the one thing that stops its backward on the CPU. -> the eager
    function."""
    from efficient_transformers.functional import flex

    if not flex.flex_available():
        pytest.skip("FlexAttention is not importable")
    from torch.nn.attention import flex_attention as module

    monkeypatch.setattr(module, "_validate_device", lambda *args: None)
    monkeypatch.setattr(flex, "_compiled_flex", lambda: module.flex_attention)
    return module.flex_attention


@pytest.fixture
def one_thread():
    """Tiny models train far faster on one thread when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip, rather than fail, where torch sees no CUDA device (`pytest -m gpu` on
    a CPU machine)."""
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)
