"""
Distributed-training helpers with the interface of improved-diffusion's
``dist_util`` (``setup_dist``, ``dev``, ``load_state_dict``, ``sync_params``,
``GPUS_PER_NODE``), built on ``torch.distributed`` alone: no mpi4py, no
blobfile.

Launching:

* ``torchrun --nproc_per_node N script.py`` (or anything that exports
  ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``): ``setup_dist``
  joins that group over ``env://`` with NCCL when CUDA is available (after
  selecting GPU ``LOCAL_RANK``), Gloo otherwise.
* ``python script.py``: ``setup_dist`` creates a one-process group through a
  file store in a private temp directory, so code written against the
  original (``dist.get_rank()``, ``dist.barrier()``, ``dist.all_gather`` ...)
  runs unchanged; no network socket is involved.

``get_rank``/``get_world_size``/``barrier``/... also work without any group
(rank 0 of 1), so library code can call them unconditionally.
"""

import atexit
import os
import pickle
import shutil
import tempfile

import torch as th
import torch.distributed as dist

__all__ = [
    "GPUS_PER_NODE",
    "SETUP_RETRY_COUNT",
    "setup_dist",
    "dev",
    "checked_device",
    "load_state_dict",
    "sync_params",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "local_rank",
    "cleanup",
]

# GPUs per machine: without LOCAL_RANK, a rank uses GPU (rank % GPUS_PER_NODE).
GPUS_PER_NODE = 8

SETUP_RETRY_COUNT = 3  # kept for API compatibility with the original module

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_SYNC_BUCKET_BYTES = 64 * 1024 * 1024

_store_dir = None  # temp dir holding the file store of a single-process group we created
_atexit_registered = False


def _initialized():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    """This process's rank in the default group; 0 when no group is initialised."""
    return dist.get_rank() if _initialized() else 0


def get_world_size():
    """Number of processes in the default group; 1 when no group is initialised."""
    return dist.get_world_size() if _initialized() else 1


def is_main_process():
    return get_rank() == 0


def local_rank():
    """Index of this process on its machine: ``$LOCAL_RANK``, else rank % GPUS_PER_NODE."""
    value = os.environ.get("LOCAL_RANK")
    if value is not None and value.strip():
        return int(value)
    return get_rank() % GPUS_PER_NODE


def _launched_by_torchrun():
    return all(os.environ.get(name) for name in _LAUNCHER_VARS)


def _remove_store_dir():
    global _store_dir
    if _store_dir is not None:
        shutil.rmtree(_store_dir, ignore_errors=True)
        _store_dir = None


def setup_dist():
    """
    Join (torchrun) or create (plain ``python``) the default process group.
    Does nothing if one is already initialised.
    """
    global _store_dir, _atexit_registered
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed support")
    if dist.is_initialized():
        return

    use_cuda = th.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"

    if _launched_by_torchrun():
        if use_cuda:
            th.cuda.set_device(local_rank() % th.cuda.device_count())
        dist.init_process_group(backend=backend, init_method="env://")
        return
    if int(os.environ.get("WORLD_SIZE") or 1) > 1:
        # Some launcher variables but not all: a group of one here would make
        # every process train as rank 0 and write the same files.
        missing = [name for name in _LAUNCHER_VARS if not os.environ.get(name)]
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: start the processes with torchrun "
            "(or set all of " + ", ".join(_LAUNCHER_VARS) + ")"
        )

    # A group of one. The file store needs no port and touches no network.
    _remove_store_dir()
    _store_dir = tempfile.mkdtemp(prefix="iddpm_fast_dist_")
    if not _atexit_registered:
        atexit.register(_remove_store_dir)
        _atexit_registered = True
    store_file = os.path.join(_store_dir, "store")
    try:
        dist.init_process_group(backend=backend, init_method="file://" + store_file, rank=0, world_size=1)
    except BaseException:
        _remove_store_dir()
        raise


def cleanup():
    """Destroy the default process group (if any) and remove what ``setup_dist`` created."""
    if _initialized():
        dist.destroy_process_group()
    _remove_store_dir()


def barrier():
    """Wait for every rank; a no-op with fewer than two processes."""
    if get_world_size() < 2:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[th.cuda.current_device()])
    else:
        dist.barrier()


def dev():
    """The device this rank computes on: its GPU (``cuda:LOCAL_RANK``) when CUDA is available, else the CPU."""
    if th.cuda.is_available():
        return th.device("cuda", local_rank() % th.cuda.device_count())
    return th.device("cpu")


def checked_device(name):
    """torch.device(name), or an error saying why it cannot run here ("" =
    the default: this process's GPU where there is one, else the CPU)."""
    if not name:
        return dev()
    try:
        device = th.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device={name!r} is not a device: {exc}") from None
    if device.type == "cuda":
        if not th.cuda.is_available():
            why = "this torch build has no CUDA" if th.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device={name!r} but {why} (torch {th.__version__}); leave device empty for the CPU")
        if device.index is not None and device.index >= th.cuda.device_count():
            raise ValueError(f"device={name!r} but only {th.cuda.device_count()} CUDA device(s) are visible")
    elif device.type not in ("cpu", "meta") and not getattr(th, device.type, None):
        raise ValueError(f"device={name!r}: this torch has no {device.type} support")
    return device


class CheckpointError(pickle.UnpicklingError, ValueError):
    """A checkpoint file that torch.load(weights_only=True) cannot read (an
    UnpicklingError, as torch raises, and a ValueError, as for a bad argument)."""


def load_state_dict(path, **kwargs):
    """
    Load a checkpoint written with ``torch.save``: ``torch.load(path, **kwargs)``
    restricted to ``weights_only=True``, because checkpoints are untrusted input
    and a full unpickle can run arbitrary code. Passing ``weights_only=False``
    raises ``ValueError``; ``map_location`` and the other ``torch.load``
    arguments pass through.

    Every rank reads the file itself (the original broadcast the bytes from
    rank 0 over MPI), so ``path`` must be on a filesystem all ranks see.
    Local paths only (no ``gs://``/``az://`` URLs; blobfile is not used).
    """
    if kwargs.get("weights_only", True) is not True:
        raise ValueError(
            "load_state_dict refuses weights_only=False: unpickling arbitrary objects from a "
            "checkpoint can execute code. Save plain tensors / state dicts instead, or call "
            "torch.load yourself if you trust the file."
        )
    kwargs["weights_only"] = True
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(21, f"checkpoint {path} is a directory; give the .pt file inside it", path)
    if not os.path.isfile(path):
        hint = " (URLs are not supported; copy the file locally)" if "://" in path else ""
        raise FileNotFoundError(2, f"checkpoint not found: {path}{hint}", path)
    try:
        return th.load(path, **kwargs)
    except pickle.UnpicklingError as exc:  # objects weights_only refuses, or not a pickle at all
        # torch's message advises weights_only=False, which this loader refuses
        # for untrusted files: keep only what it found.
        detail = str(exc).split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
        detail = " ".join(detail.split()) or type(exc).__name__
        raise CheckpointError(
            f"cannot load checkpoint {path} ({os.path.getsize(path)} bytes): {detail}. It holds objects other "
            "than tensors, numbers and containers (checkpoints are loaded with weights_only=True, never "
            "unpickled), or it is not a torch.save file (truncated, corrupted, another format)."
        ) from exc
    except Exception as exc:  # truncated, empty, or not written by torch.save
        raise CheckpointError(
            f"cannot load checkpoint {path} ({os.path.getsize(path)} bytes): {type(exc).__name__}: {exc}\n"
            "Is it complete (an interrupted copy or download is truncated) and written by torch.save?"
        ) from exc


def sync_params(params):
    """
    Overwrite ``params`` (tensors, e.g. ``model.parameters()``) on every rank
    with rank 0's values. Same-device, same-dtype tensors are broadcast in
    flattened buckets rather than one call per tensor. A no-op with fewer than
    two processes.
    """
    if get_world_size() < 2:
        return
    buckets = {}
    with th.no_grad():
        for p in params:
            key = (p.device, p.dtype)
            bucket, size = buckets.get(key, ([], 0))
            bucket.append(p)
            size += p.numel() * p.element_size()
            if size >= _SYNC_BUCKET_BYTES:
                _broadcast_bucket(bucket)
                bucket, size = [], 0
            buckets[key] = (bucket, size)
        for bucket, _ in buckets.values():
            if bucket:
                _broadcast_bucket(bucket)


def _broadcast_bucket(tensors):
    tensors = [t.data if isinstance(t, th.nn.Parameter) else t for t in tensors]
    if len(tensors) == 1 and tensors[0].is_contiguous():
        dist.broadcast(tensors[0], 0)
        return
    flat = th.cat([t.reshape(-1) for t in tensors])
    dist.broadcast(flat, 0)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n
