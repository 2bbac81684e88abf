import pytest
import torch


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The command-line tests set torch's thread count (``--threads``, or every CPU) in this process, as
    the command does; put it back, so that no later test runs with it (or starts workers by it)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
