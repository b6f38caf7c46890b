"""Counters of live tensor storages, for memory figures without a GPU (or beside its allocator's).

Both are torch dispatch modes that see every storage an op returns and a weak reference's finalizer
that sees it freed. `LiveBytes` is the plain peak of bytes allocated while it is active
(grad_surgery.py). `StorageCounter` is memory.py's: it sorts every live byte into what it is
(parameters, T, R, optimizer state, inputs, activations, temporaries), follows the step's phases,
and answers the host reads of fake tensors (which have no values) so that a fake step runs.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("parameters", "task_grad", "retain_grad", "optimizer", "inputs", "activations", "temporaries")
#: divided N ways by FSDP2 (`shards`)
SHARDED = ("parameters", "task_grad", "retain_grad", "optimizer")
#: phases whose scratch is model-sized (the surgery's and the optimiser's): sharded under FSDP2
MODEL_SIZED_PHASES = ("surgery", "optimizer")


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages that ops allocate while the mode is active, and their
    peak while alive (a storage's bytes are released when it is freed). Views and in-place results
    share an input's storage and are not counted."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        known = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in known or storage.nbytes() == 0:
                continue
            known.add(storage.data_ptr())
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, storage.nbytes())
        return out


class _Record:
    __slots__ = ("category", "nbytes", "model_sized")

    def __init__(self, category: str, nbytes: int, model_sized: bool):
        self.category, self.nbytes, self.model_sized = category, nbytes, model_sized


class StorageCounter(TorchDispatchMode):
    """Counts the bytes of live tensor storages by category while active, and the peak.

    A storage is counted when an op first returns it (views and in-place results share one and are
    not counted twice) and released when it is freed. New storages are `temporaries` until autograd
    saves them (then `activations`) or the caller labels them (`label`). Host reads of fake values
    are answered with a stand-in (0, or True for a bool: a finite, applied step) and counted per phase.
    """

    def __init__(self, shards: tuple[int, ...] = ()):
        super().__init__()
        self.records: dict[int, _Record] = {}
        self.live = dict.fromkeys(CATEGORIES, 0)
        self.model_sized_scratch = 0  # live temporaries allocated in MODEL_SIZED_PHASES
        self.shards = shards
        self.phase = "setup"
        self.host_reads: Counter = Counter()
        self._new_category = "temporaries"
        self._last_read = None
        self.reset_peak()

    # ---- bookkeeping

    def reset_peak(self) -> None:
        self.peak, self.peak_at = -1, {}
        self.category_peak = dict.fromkeys(CATEGORIES, 0)  # each category's own peak
        self.live_in: dict[str, dict[str, None]] = {c: {} for c in CATEGORIES}  # phases it was live in, in order
        self.sharded_peak = dict.fromkeys(self.shards, -1.0)  # N -> per-GPU peak
        self.transient_peak = Counter()  # per phase: activations + temporaries
        self.transient_at_mark: dict[str, int] = {}

    def _transient(self) -> int:
        return self.live["activations"] + self.live["temporaries"]

    def _track(self, storage, category: str) -> None:
        key = storage._cdata
        record = self.records.get(key)
        nbytes = storage.nbytes()
        if record is not None:
            if record.nbytes != nbytes:  # resized in place
                self.live[record.category] += nbytes - record.nbytes
                if record.model_sized:
                    self.model_sized_scratch += nbytes - record.nbytes
                record.nbytes = nbytes
            return
        model_sized = category == "temporaries" and self.phase in MODEL_SIZED_PHASES
        self.records[key] = _Record(category, nbytes, model_sized)
        self.live[category] += nbytes
        if model_sized:
            self.model_sized_scratch += nbytes
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        record = self.records.pop(key, None)
        if record is not None:
            self.live[record.category] -= record.nbytes
            if record.model_sized:
                self.model_sized_scratch -= record.nbytes

    def _move(self, key: int, category: str) -> None:
        record = self.records[key]
        if record.model_sized:
            self.model_sized_scratch -= record.nbytes
            record.model_sized = False
        self.live[record.category] -= record.nbytes
        self.live[category] += record.nbytes
        record.category = category

    def _check_peak(self) -> None:
        total = sum(self.live.values())
        if total > self.peak:
            self.peak, self.peak_at = total, {**self.live, "phase": self.phase}
        for c, v in self.live.items():
            if v > 0:
                self.category_peak[c] = max(self.category_peak[c], v)
                self.live_in[c].setdefault(self.phase)
        if self.shards:
            divided = sum(self.live[c] for c in SHARDED) + self.model_sized_scratch
            for n in self.shards:
                sharded = total - divided + divided / n
                if sharded > self.sharded_peak[n]:
                    self.sharded_peak[n] = sharded
        transient = self._transient()
        if transient > self.transient_peak[self.phase]:
            self.transient_peak[self.phase] = transient

    # ---- public

    def label(self, tensors, category: str) -> None:
        """Count `tensors`' storages as `category` (also storages made before the counter started)."""
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.records:
                if self.records[key].category != category:
                    self._move(key, category)
            else:
                self._track(storage, category)
        self._check_peak()

    @contextlib.contextmanager
    def allocating(self, category: str):
        """Within: new storages count as `category` from the start (not as temporaries first)."""
        self._new_category = category
        try:
            yield
        finally:
            self._new_category = "temporaries"

    def saved(self, tensor):
        """saved_tensors_hooks pack hook: a temporary that autograd keeps is an activation.

        Returns a detached view (same storage): handing autograd the tensor itself would let a node
        that saves its own output hold itself in a reference cycle that nothing collects, keeping a
        branch whose output never reaches the loss (pi0 / pi0.5 discard the prefix stream after the
        last layer) alive for good, where a real run frees it as soon as the output is dropped."""
        if isinstance(tensor, torch.Tensor):
            record = self.records.get(tensor.untyped_storage()._cdata)
            if record is not None and record.category == "temporaries":
                self._move(tensor.untyped_storage()._cdata, "activations")
            return tensor.detach()
        return tensor

    def on_mark(self, old: str, new: str) -> None:
        self.phase = new
        self.transient_at_mark.setdefault(new, self._transient())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            if isinstance(t, FakeTensor) and t.constant is None:
                # .tolist() reads the elements in order (one transfer); a new read starts elsewhere
                where = (t.untyped_storage()._cdata, t.storage_offset())
                last = self._last_read
                if last is None or where[0] != last[0] or where[1] <= last[1]:
                    self.host_reads[self.phase] += 1
                self._last_read = where
                return True if t.dtype == torch.bool else (0.0 if t.dtype.is_floating_point else 0)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage(), self._new_category)
        self._check_peak()
        return out
