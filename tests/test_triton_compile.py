"""
Every Triton kernel compiled for a Hopper GPU (sm_90, PTX and cubin) here,
without a GPU, with the arguments the kernel functions pass for every kind
and dtype: Triton's compiler rejects programs its interpreter runs (the
interpreter tests cannot see that), and a GPU is lent to few sessions.
tests/compile_kernels.py does the work, in a child process, since this
process imports the kernels under TRITON_INTERPRET=1, which makes them
interpreted functions that do not compile.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia", reason="this Triton has no NVIDIA backend")

import iddpm_fast  # noqa: E402

SCRIPT = Path(__file__).with_name("compile_kernels.py")
KERNELS = {
    "_q_sample_kernel", "_q_sample_bwd_kernel", "_dgll_kernel", "_posterior_kernel", "_sampling_kernel",
    "_vb_terms_kernel", "_training_loss_fwd_rows_kernel", "_training_loss_fwd_kernel",
    "_training_loss_finalize_kernel", "_training_loss_bwd_kernel",
}


@pytest.fixture(scope="module")
def report():
    # (TRITON_DEFAULT_FP_FUSION: a user's own choice turns the Launcher's fixed option off)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    # The iddpm_fast this session imported (a checkout or an installed copy), not whichever the child finds.
    package_root = str(Path(iddpm_fast.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1200)
    if run.returncode != 0:
        pytest.fail(f"compile_kernels.py exited {run.returncode}:\n{run.stderr[-4000:]}")
    report = json.loads(run.stdout)
    report["stderr"] = run.stderr
    return report


def test_every_kernel_compiles_for_sm90(report):
    failed = [f"{e['kernel']} {e['constexprs']} {e['signature']}:\n{e['error']}"
              for e in report["kernels"] if not e["ok"]]
    assert not failed, f"{len(failed)} of {len(report['kernels'])} failed to compile:\n" + "\n\n".join(failed[:3])


def test_every_kernel_was_launched(report):
    # A kernel function that stopped launching (or a new kernel the driver misses) shows here.
    assert {e["kernel"] for e in report["kernels"]} == set(report["launchers"]) == KERNELS


def test_specialised_as_triton_launches_them(report):
    # Ints equal to 1 are constexprs (the one-chunk samples' n_chunks), aligned pointers carry the hint.
    assert any(e["constexprs"].get("n_chunks") == "1" for e in report["kernels"])
    assert all("tables_ptr" in e["aligned"] for e in report["kernels"] if "tables_ptr" in e["signature"])


def test_half_precision_pointers_were_compiled(report):
    types = {t for e in report["kernels"] for t in e["signature"].values()}
    assert {"*fp32", "*bf16", "*fp16", "*i64"} <= types


def test_fused_multiply_adds_asked_for(report):
    # The Launcher's fixed option reaches the compiler (Triton 3.9 warns when it is left to the default).
    assert all(e["options"].get("enable_fp_fusion") is True for e in report["kernels"])
    assert "TRITON_DEFAULT_FP_FUSION" not in report["stderr"]
