"""
Experiment logger with the interface of improved-diffusion's ``logger``
module (itself a trimmed copy of the OpenAI baselines logger), reimplemented
without MPI.

Two kinds of output go through it:

* messages: ``log(...)`` / ``info(...)`` etc. write a line to the "human"
  outputs (``stdout`` and ``log.txt``), subject to the level threshold;
* diagnostics: ``logkv`` / ``logkv_mean`` accumulate key/value pairs for the
  current iteration and ``dumpkvs`` writes one row to every key/value output
  (the stdout table, ``log.txt``, ``progress.csv``, ``progress.json``,
  TensorBoard) and clears them.

``configure()`` picks the directory (argument, then ``$OPENAI_LOGDIR``, then a
timestamped ``openai-...`` folder in the system temp dir) and the formats
(argument, then ``$OPENAI_LOG_FORMAT`` -- default ``stdout,log,csv`` -- on rank
0, ``$OPENAI_LOG_FORMAT_MPI`` -- default ``log`` -- on other ranks, whose files
get a ``-rank%03i`` suffix). The rank comes from ``torch.distributed`` when it
is initialised, else from the launcher's environment (``RANK``, ``PMI_RANK``,
``OMPI_COMM_WORLD_RANK``).

Cross-rank averaging: pass ``comm`` to ``configure`` to have ``dumpkvs``
replace each value by its mean over ranks, weighted by how many times each
rank fed it to ``logkv_mean``; only rank 0 then writes the row. ``comm`` may be
``True`` (the default ``torch.distributed`` group), a
``torch.distributed.ProcessGroup``, or any MPI-style object with ``gather``
and ``rank`` (e.g. an ``mpi4py`` communicator). Without an initialised
process group of more than one rank the averaging is a no-op.

Values may be Python numbers, NumPy scalars or single-element tensors; they
are turned into Python numbers once, in ``dumpkvs``. ``logkv`` stores its value
untouched (no device sync); ``logkv_mean`` calls ``float()`` on it and keeps a
Python running mean.
"""

import csv
import datetime
import functools
import json
import math
import os
import os.path as osp
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "DEBUG",
    "INFO",
    "WARN",
    "ERROR",
    "DISABLED",
    "KVWriter",
    "SeqWriter",
    "HumanOutputFormat",
    "JSONOutputFormat",
    "CSVOutputFormat",
    "TensorBoardOutputFormat",
    "make_output_format",
    "logkv",
    "logkv_mean",
    "logkvs",
    "dumpkvs",
    "getkvs",
    "log",
    "debug",
    "info",
    "warn",
    "error",
    "set_level",
    "set_comm",
    "get_dir",
    "record_tabular",
    "dump_tabular",
    "profile_kv",
    "profile",
    "get_current",
    "Logger",
    "get_rank_without_mpi_import",
    "mpi_weighted_mean",
    "configure",
    "reset",
    "scoped_configure",
]

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40
DISABLED = 50

_MAX_CELL = 30  # widest key or value shown in the human-readable table


def _plain(value):
    """A NumPy scalar / one-element array or tensor as a Python number; anything else unchanged."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.item()
    return value


# ----------------------------------------------------------------------------
# Output formats
# ----------------------------------------------------------------------------


class KVWriter:
    """An output that receives one dict of diagnostics per ``dumpkvs``."""

    def writekvs(self, kvs):
        raise NotImplementedError

    def close(self):
        pass


class SeqWriter:
    """An output that receives the messages passed to ``log``."""

    def writeseq(self, seq):
        raise NotImplementedError

    def close(self):
        pass


class _CurrentStdout:
    """Writes to whatever ``sys.stdout`` is at the time of the write (so redirection/capture works)."""

    def write(self, text):
        return sys.stdout.write(text)

    def flush(self):
        sys.stdout.flush()


class HumanOutputFormat(KVWriter, SeqWriter):
    """
    Aligned, boxed key/value tables plus plain message lines, to a file path
    (opened for writing, truncated) or to an already open text stream.
    """

    def __init__(self, filename_or_file, append=False):
        if isinstance(filename_or_file, (str, os.PathLike)):
            self.file = open(filename_or_file, "at" if append else "wt", encoding="utf-8")
            self.own_file = True
        else:
            if not hasattr(filename_or_file, "write"):
                raise TypeError(f"expected a path or a writable text stream, got {filename_or_file!r}")
            self.file = _CurrentStdout() if filename_or_file is sys.stdout else filename_or_file
            self.own_file = False

    @staticmethod
    def _truncate(text):
        return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 3] + "..."

    @staticmethod
    def _format_value(value):
        if hasattr(value, "__float__"):
            try:
                return "%-8.3g" % float(value)
            except (TypeError, ValueError):
                pass
        return str(value)

    def writekvs(self, kvs):
        cells = {}
        for key, value in sorted(kvs.items()):
            cells[self._truncate(str(key))] = self._truncate(self._format_value(value))
        if not cells:
            print("WARNING: tried to write empty key-value dict")
            return
        kw = max(len(k) for k in cells)
        vw = max(len(v) for v in cells.values())
        rule = "-" * (kw + vw + 7)
        rows = [rule]
        for key in sorted(cells, key=str.lower):
            rows.append(f"| {key.ljust(kw)} | {cells[key].ljust(vw)} |")
        rows.append(rule)
        self.file.write("\n".join(rows) + "\n")
        self.file.flush()

    def writeseq(self, seq):
        self.file.write(" ".join(seq) + "\n")
        self.file.flush()

    def close(self):
        if self.own_file:
            self.file.close()


class JSONOutputFormat(KVWriter):
    """One JSON object per ``dumpkvs`` (JSON lines). Non-finite floats appear as ``NaN``/``Infinity``."""

    def __init__(self, filename, keep_before_step=None):
        kept = []
        if keep_before_step is not None and osp.exists(filename):
            # A resumed run: keep the rows of the steps before the checkpoint it resumes from.
            with open(filename, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and _step_of_json(line) < keep_before_step]
        self.file = open(filename, "wt", encoding="utf-8")
        self.file.writelines(kept)
        self.file.flush()

    def writekvs(self, kvs):
        row = {}
        for key, value in kvs.items():
            value = _plain(value)
            if isinstance(value, (np.ndarray, torch.Tensor)):  # several elements: a JSON list
                value = value.tolist()
            row[key] = value
        self.file.write(json.dumps(row, default=str) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def _csv_cell(text):
    # Quote only when needed, so ordinary numbers and names read exactly as str(value).
    if any(c in text for c in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("-inf")


def _step_of_json(line):
    try:
        return _number(json.loads(line).get("step"))
    except (ValueError, AttributeError):
        return float("-inf")


class CSVOutputFormat(KVWriter):
    """
    ``progress.csv``: a header of every key seen so far and one row per dump.
    When a dump brings keys not seen before, they are appended (sorted) to the
    header and the file is rewritten with the earlier rows padded by empty
    cells, as in the original.
    """

    def __init__(self, filename, keep_before_step=None):
        self.keys = []
        self.sep = ","
        header, rows = [], []
        if keep_before_step is not None and osp.exists(filename):
            # A resumed run: keep the header and the rows of the steps before its checkpoint.
            with open(filename, encoding="utf-8", newline="") as f:
                table = list(csv.reader(f))
            if table:
                header = table[0]
                col = header.index("step") if "step" in header else None
                rows = [r for r in table[1:] if col is None or _number(r[col] if col < len(r) else "") < keep_before_step]
        self.file = open(filename, "w+t", encoding="utf-8", newline="")
        if header:
            self.keys = list(header)
            self.file.write(self._line(self.keys))
            for row in rows:
                self.file.write(self._line(row))
            self.file.flush()

    def _line(self, cells):
        return self.sep.join(_csv_cell(c) for c in cells) + "\n"

    def _rewrite_with_header(self, new_keys):
        self.file.seek(0)
        old_rows = list(csv.reader(self.file))[1:]
        self.keys.extend(new_keys)
        self.file.seek(0)
        self.file.write(self._line(str(k) for k in self.keys))
        for row in old_rows:
            self.file.write(self._line(row + [""] * (len(self.keys) - len(row))))
        self.file.truncate()

    def writekvs(self, kvs):
        new_keys = sorted(kvs.keys() - set(self.keys))
        if new_keys:
            self._rewrite_with_header(new_keys)
        cells = []
        for key in self.keys:
            value = _plain(kvs.get(key))
            cells.append("" if value is None else str(value))
        self.file.write(self._line(cells))
        self.file.flush()

    def close(self):
        self.file.close()


class TensorBoardOutputFormat(KVWriter):
    """
    Scalars to TensorBoard event files through ``torch.utils.tensorboard``
    (needs the ``tensorboard`` package). Each dump is one step, counting from 1;
    values that are not numbers are skipped.
    """

    def __init__(self, dir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "the 'tensorboard' log format needs the tensorboard package "
                "(used through torch.utils.tensorboard): pip install tensorboard"
            ) from exc
        os.makedirs(dir, exist_ok=True)
        self.dir = dir
        self.step = 1
        self.writer = SummaryWriter(log_dir=osp.abspath(dir))

    def writekvs(self, kvs):
        for key, value in kvs.items():
            value = _plain(value)
            if isinstance(value, (bool, int, float)):
                self.writer.add_scalar(str(key), float(value), global_step=self.step)
        self.writer.flush()
        self.step += 1

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def make_output_format(format, ev_dir, log_suffix="", resume_step=None, append=False):
    """
    An output for ``format`` (stdout, log, json, csv, tensorboard) in directory
    ``ev_dir``. With ``resume_step`` (a training run resuming from the
    checkpoint of that step) the files continue instead of starting over:
    ``log.txt`` is appended to, and ``progress.csv`` / ``progress.json`` keep
    their rows of the steps before ``resume_step``. ``append`` (new) appends
    to ``log.txt`` too (sampling or evaluating into a training run's folder).
    """
    os.makedirs(ev_dir, exist_ok=True)
    if format == "stdout":
        return HumanOutputFormat(sys.stdout)
    if format == "log":
        return HumanOutputFormat(osp.join(ev_dir, f"log{log_suffix}.txt"), append=append or resume_step is not None)
    if format == "json":
        return JSONOutputFormat(osp.join(ev_dir, f"progress{log_suffix}.json"), keep_before_step=resume_step)
    if format == "csv":
        return CSVOutputFormat(osp.join(ev_dir, f"progress{log_suffix}.csv"), keep_before_step=resume_step)
    if format == "tensorboard":
        return TensorBoardOutputFormat(osp.join(ev_dir, f"tb{log_suffix}"))
    raise ValueError(f"Unknown format specified: {format!r} (expected stdout, log, json, csv or tensorboard)")


# ----------------------------------------------------------------------------
# Module-level API (acts on the current logger)
# ----------------------------------------------------------------------------


def logkv(key, val):
    """Record ``val`` for ``key`` in this iteration; a later call for the same key replaces it."""
    get_current().logkv(key, val)


def logkv_mean(key, val):
    """Like ``logkv``, but repeated calls in one iteration are averaged."""
    get_current().logkv_mean(key, val)


def logkvs(d):
    """``logkv`` every item of a dict."""
    for key, val in d.items():
        logkv(key, val)


def dumpkvs():
    """Write this iteration's diagnostics to every key/value output, clear them, and return what was written."""
    return get_current().dumpkvs()


def getkvs():
    """The live dict of this iteration's diagnostics (key -> value or running mean)."""
    return get_current().name2val


def log(*args, level=INFO):
    """Write ``args`` (str()-ed, space separated) as one line to the message outputs, if ``level`` passes."""
    get_current().log(*args, level=level)


def debug(*args):
    log(*args, level=DEBUG)


def info(*args):
    log(*args, level=INFO)


def warn(*args):
    log(*args, level=WARN)


def error(*args):
    log(*args, level=ERROR)


def set_level(level):
    """Messages below ``level`` are dropped by the current logger."""
    get_current().set_level(level)


def set_comm(comm):
    """Change the group ``dumpkvs`` averages over (see the module docstring); None turns averaging off."""
    get_current().set_comm(comm)


def get_dir():
    """The current logger's output directory (None for a logger without one)."""
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs


@contextmanager
def profile_kv(scopename):
    """Add the wall time spent inside the block to the diagnostic ``wait_<scopename>``."""
    key = "wait_" + scopename
    start = time.perf_counter()
    try:
        yield
    finally:
        get_current().name2val[key] += time.perf_counter() - start


def profile(n):
    """Decorator: time every call of the function under ``profile_kv(n)``."""

    def decorate(func):
        @functools.wraps(func)
        def timed(*args, **kwargs):
            with profile_kv(n):
                return func(*args, **kwargs)

        return timed

    return decorate


# ----------------------------------------------------------------------------
# Logger object
# ----------------------------------------------------------------------------


def get_current():
    """The logger the module-level functions use, configuring a default one on first use."""
    if Logger.CURRENT is None:
        _configure_default_logger()
    return Logger.CURRENT


class Logger:
    DEFAULT = None  # the logger built by the first implicit configure()
    CURRENT = None  # the logger the module-level functions act on

    def __init__(self, dir, output_formats, comm=None):
        self.name2val = defaultdict(float)
        self.name2cnt = defaultdict(int)
        self.level = INFO
        self.dir = dir
        self.output_formats = output_formats
        self.comm = comm

    def logkv(self, key, val):
        self.name2val[key] = val

    def logkv_mean(self, key, val):
        if isinstance(val, torch.Tensor):
            val = float(val.detach())
        elif not isinstance(val, (int, float)):
            val = float(val)
        cnt = self.name2cnt[key]
        if cnt == 0:
            self.name2val[key] = val
        else:
            old = self.name2val[key]
            self.name2val[key] = old * cnt / (cnt + 1) + val / (cnt + 1)
        self.name2cnt[key] = cnt + 1

    def dumpkvs(self):
        if self.comm is None:
            row = {key: _plain(val) for key, val in self.name2val.items()}
            write = True
        else:
            local = {key: (val, self.name2cnt.get(key, 1)) for key, val in self.name2val.items()}
            row, write = _weighted_mean_over_ranks(self.comm, local)
        if write:
            for fmt in self.output_formats:
                if isinstance(fmt, KVWriter):
                    fmt.writekvs(row)
        self.name2val.clear()
        self.name2cnt.clear()
        return dict(row)

    def log(self, *args, level=INFO):
        if self.level <= level:
            self._do_log(args)

    def set_level(self, level):
        self.level = level

    def set_comm(self, comm):
        self.comm = comm

    def get_dir(self):
        return self.dir

    def close(self):
        for fmt in self.output_formats:
            fmt.close()

    def _do_log(self, args):
        text = [str(a) for a in args]
        for fmt in self.output_formats:
            if isinstance(fmt, SeqWriter):
                fmt.writeseq(text)


# ----------------------------------------------------------------------------
# Ranks and cross-rank averaging
# ----------------------------------------------------------------------------


def _dist_ready():
    return dist.is_available() and dist.is_initialized()


def get_rank_without_mpi_import():
    """
    This process's rank for choosing outputs: torch.distributed's when a group
    is initialised, else the launcher's environment (torchrun ``RANK``, MPI
    ``PMI_RANK`` / ``OMPI_COMM_WORLD_RANK``), else 0.
    """
    if _dist_ready():
        return dist.get_rank()
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if name in os.environ:
            try:
                return int(os.environ[name])
            except ValueError:
                continue
    return 0


def _gather_to_all(comm, obj):
    """(list of every rank's ``obj``, this rank) over ``comm``; ([obj], 0) when there is nobody to talk to."""
    if hasattr(comm, "gather") and hasattr(comm, "rank"):  # MPI-style communicator
        gathered = comm.gather(obj)
        return (gathered if gathered is not None else []), comm.rank
    if not _dist_ready():
        return [obj], 0
    group = comm if isinstance(comm, dist.ProcessGroup) else None
    size = dist.get_world_size(group)
    if size == 1:
        return [obj], 0
    gathered = [None] * size
    dist.all_gather_object(gathered, obj, group=group)
    return gathered, dist.get_rank(group)


def _weighted_mean_over_ranks(comm, local_name2valcount):
    """(key -> count-weighted mean over ranks, whether this rank writes); only rank 0 writes."""
    gathered, rank = _gather_to_all(comm, local_name2valcount)
    if rank != 0:
        return {}, False
    sums = {}
    counts = {}
    for name2valcount in gathered:
        for name, (val, count) in name2valcount.items():
            try:
                val = float(_plain(val))
            except (TypeError, ValueError):
                warnings.warn(f"logger: cannot average non-numeric value {name}={val!r}; dropped")
                continue
            sums[name] = sums.get(name, 0.0) + val * count
            counts[name] = counts.get(name, 0) + count
    means = {}
    for name, total in sums.items():
        means[name] = total / counts[name] if counts[name] else math.nan
    return means, True


def mpi_weighted_mean(comm, local_name2valcount):
    """
    Count-weighted mean over ranks of ``{key: (value, count)}`` dicts, as the
    original's helper: the means on rank 0, ``{}`` elsewhere. ``comm`` as for
    ``configure``.
    """
    means, _ = _weighted_mean_over_ranks(comm, local_name2valcount)
    return means


# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------


def configure(dir=None, format_strs=None, comm=None, log_suffix="", resume_step=None, append=False):
    """
    Make a new current logger (the previous one is left open; see the module
    docstring for how ``dir``, ``format_strs`` and ``comm`` are chosen).
    ``resume_step`` (new): continue the files of a run resuming from that
    step's checkpoint instead of starting them over (see make_output_format).
    ``append`` (new): add to an existing ``log.txt`` instead of truncating it.
    """
    if dir is None:
        dir = os.getenv("OPENAI_LOGDIR")
    if dir is None:
        stamp = datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
        dir = osp.join(tempfile.gettempdir(), stamp)
    dir = osp.expanduser(os.fspath(dir))
    os.makedirs(dir, exist_ok=True)

    rank = get_rank_without_mpi_import()
    if rank > 0:
        log_suffix = log_suffix + "-rank%03i" % rank

    if format_strs is None:
        if rank == 0:
            format_strs = os.getenv("OPENAI_LOG_FORMAT", "stdout,log,csv").split(",")
        else:
            format_strs = os.getenv("OPENAI_LOG_FORMAT_MPI", "log").split(",")
    output_formats = [make_output_format(f.strip(), dir, log_suffix, resume_step, append) for f in format_strs
                      if f and f.strip()]

    Logger.CURRENT = Logger(dir=dir, output_formats=output_formats, comm=comm)
    if output_formats:
        log(f"Logging to {dir}")


def _configure_default_logger():
    configure()
    Logger.DEFAULT = Logger.CURRENT


def reset():
    """Close the current logger and go back to the default one."""
    if Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
        Logger.CURRENT = Logger.DEFAULT
        log("Reset logger")


@contextmanager
def scoped_configure(dir=None, format_strs=None, comm=None, log_suffix=""):
    """Use a freshly configured logger inside the block; close it and restore the previous one after."""
    previous = Logger.CURRENT
    configure(dir=dir, format_strs=format_strs, comm=comm, log_suffix=log_suffix)
    try:
        yield
    finally:
        Logger.CURRENT.close()
        Logger.CURRENT = previous
