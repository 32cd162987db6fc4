import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be
# chosen before triton is first imported: its standard library (tl.sigmoid and
# the like) is made of jit functions, interpreted or compiled as they are
# defined. pytest imports every test module before it runs a test, so a module
# importing triton early (test_triton_compile.py, first in name order) had
# left tl.sigmoid compiled for test_triton_kernels.py's interpreted kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    # CI has 2 cores; more threads than that only adds contention.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(previous)
