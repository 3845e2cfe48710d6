import pytest
import torch


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The CLIs that tests call in-process (demo, benchmarks) set torch's thread count for their runs; a test
    after them must not inherit one thread (the full-size parity forwards take twice as long)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
