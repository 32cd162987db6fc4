"""iddpm_fast.cpu_memory: glibc keeps freed memory, so CPU training steps stop
page-faulting their activations back in (measured in a fresh process: the
setting is process-wide)."""

import os
import subprocess
import sys

import pytest

import iddpm_fast

SCRIPT = r"""
import resource, torch
from iddpm_fast import cpu_memory
from iddpm_fast.script_util import create_model_and_diffusion, model_and_diffusion_defaults
torch.manual_seed(0)
torch.set_num_threads(1)
cfg = dict(model_and_diffusion_defaults(), image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
           attention_resolutions="8", learn_sigma=True, diffusion_steps=100)
model, diffusion = create_model_and_diffusion(**cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.rand(16, 3, 16, 16) * 2 - 1

def steps(n):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        t = torch.randint(0, 100, (16,))
        opt.zero_grad(set_to_none=True)
        diffusion.training_losses(model, x, t)["loss"].mean().backward()
        opt.step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

steps(2)
before = steps(3)
ok = cpu_memory.retain_freed_memory()
again = cpu_memory.retain_freed_memory()
steps(2)
after = steps(3)
print(ok, again, before, after)
"""


def _run(**env):
    root = os.path.dirname(os.path.dirname(os.path.abspath(iddpm_fast.__file__)))
    full = dict(os.environ, PYTHONPATH=root, IDDPM_FAST_BACKEND="reference", OMP_NUM_THREADS="1", **env)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=full, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ok, again, before, after = out.stdout.split()
    return ok == "True", again == "True", int(before), int(after)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_training_steps_stop_page_faulting():
    ok, again, before, after = _run()
    if not ok:
        pytest.skip("mallopt is unavailable here (not glibc)")
    assert again  # a second call answers the same
    if before < 1000:
        pytest.skip(f"this malloc did not return memory to the kernel between steps ({before} faults)")
    assert after < before / 5, (before, after)


def test_switch_turns_it_off():
    ok, again, before, after = _run(IDDPM_FAST_MALLOC_TUNING="0")
    assert not ok and not again
