"""Helpers for layer-by-layer algorithms: capture a layer's inputs, run a layer with a given weight."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .quantizer import group_rows

__all__ = ["capture_inputs", "run_by_node", "node_values", "run_nodes", "layer_forward", "weight_rows", "fp_weight",
           "Captured", "capture_budget"]

# Bytes one captured store keeps in memory before it spills to a temporary file (QCARD_CAPTURE_MB):
# a resource setting, not a result one (values read back are the exact float32 values written).
_CAPTURE_MB_DEFAULT = 1024


def capture_budget() -> int:
    raw = os.environ.get("QCARD_CAPTURE_MB")
    if raw is None:
        return _CAPTURE_MB_DEFAULT << 20
    try:
        mb = int(raw)
    except ValueError:
        raise ValueError(f"QCARD_CAPTURE_MB must be an integer number of MiB, got '{raw}'") from None
    if mb < 0:
        raise ValueError(f"QCARD_CAPTURE_MB must be >= 0, got {mb}")
    return mb << 20


def _spill_file():
    """An unnamed temporary file for values past the budget (QCARD_TMPDIR, else the system's temp folder)."""
    return tempfile.TemporaryFile(dir=os.environ.get("QCARD_TMPDIR") or None)


class Captured:
    """Per-sample tensors captured batch by batch (a unit's inputs or FP targets), read back by sample
    index. Kept in memory up to `budget` bytes; past it every sample goes to an unnamed temporary file
    (QCARD_TMPDIR, else the system's) and is read back row by row with pread, so the process holds one
    minibatch of them at a time, whatever the calibration set's size. Values are bit-exact either way."""

    def __init__(self, budget: Optional[int] = None):
        self.budget = capture_budget() if budget is None else budget
        self._parts: List[torch.Tensor] = []
        self._mem: Optional[torch.Tensor] = None
        self._file = None
        self._n = 0
        self._bytes = 0
        self.shape: Optional[tuple] = None
        self.dtype: Optional[torch.dtype] = None
        self.device: Optional[torch.device] = None

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def __len__(self) -> int:
        return self._n

    def append(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.shape is None:
            self.shape, self.dtype, self.device = tuple(x.shape[1:]), x.dtype, x.device
        elif tuple(x.shape[1:]) != self.shape or x.dtype != self.dtype:
            raise ValueError(f"captured batch {tuple(x.shape)} {x.dtype} does not match {self.shape} {self.dtype}")
        self._n += x.shape[0]
        self._bytes += x.numel() * x.element_size()
        if self._file is None and self._bytes > self.budget:
            self._file = _spill_file()
            for p in self._parts:
                self._write(p)
            self._parts = []
        if self._file is not None:
            self._write(x)
        else:
            self._parts.append(x)
            self._mem = None

    def _write(self, x: torch.Tensor) -> None:
        self._file.write(x.cpu().contiguous().numpy().tobytes())

    def _memory(self) -> torch.Tensor:
        if self._mem is None:
            self._mem = self._parts[0] if len(self._parts) == 1 else torch.cat(self._parts)
            self._parts = [self._mem]
        return self._mem

    def _rows(self, index: Sequence[int]) -> torch.Tensor:
        self._file.flush()
        row = int(np.prod(self.shape)) * torch.empty((), dtype=self.dtype).element_size()
        buf = bytearray(row * len(index))
        fd = self._file.fileno()
        for k, i in enumerate(index):
            got = os.pread(fd, row, int(i) * row)
            if len(got) != row:
                raise IOError(f"captured sample {int(i)}: read {len(got)} of {row} bytes from the spill file")
            buf[k * row:(k + 1) * row] = got
        out = torch.frombuffer(buf, dtype=self.dtype).reshape((len(index),) + self.shape)
        return out.to(self.device)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """The samples at `idx` (a 1-d index tensor), in that order."""
        if self._file is None:
            return self._memory()[idx.to(self._memory().device)]
        return self._rows(idx.tolist())

    def slice(self, a: int, b: int) -> torch.Tensor:
        b = min(b, self._n)
        if self._file is None:
            return self._memory()[a:b]
        return self._rows(range(a, b))

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        for a in range(0, self._n, size):
            yield self.slice(a, a + size)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._parts, self._mem = [], None


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_inputs(model: nn.Module, layer: nn.Module, batches: Sequence[torch.Tensor], device: str = "cpu",
                   stop_early: bool = True) -> List[torch.Tensor]:
    """The (unquantized) input of `layer` for every batch, running the model only up to that layer."""
    out: List[torch.Tensor] = []

    def hook(module, args):
        out.append(args[0].detach())
        if stop_early:
            raise _Stop

    h = layer.register_forward_pre_hook(hook)
    try:
        for x in batches:
            try:
                model(x.to(device))
            except _Stop:
                pass
    finally:
        h.remove()
    return out


@torch.no_grad()
def run_by_node(gm: fx.GraphModule, batches: Sequence[torch.Tensor], device: str,
                before: Callable[[nn.Module, Iterable[torch.Tensor]], None],
                only: Optional[Iterable[nn.Module]] = None, budget: Optional[int] = None) -> Dict[str, int]:
    """Run every batch through gm's graph node by node and call before(module, its input for every
    batch) the first time each called module (each of `only`, when given) is about to run, after
    every batch has reached it.

    What `before` changes (a corrected bias) is seen by every later node, so a layer-by-layer
    algorithm costs one pass instead of one pass per layer; each batch runs the same ops on the same
    shapes as gm(x) does, so the values are the same as there.

    Memory: the graph runs one batch at a time from one hooked module to the next; in between, the
    live node values of all batches are kept in memory up to `budget` bytes (QCARD_CAPTURE_MB, as a
    captured store) and the rest spill to temporary files, bit-exactly, and are read back when a node
    reads them. `before` gets an iterable that reads one batch's input at a time (a spilled one from
    its file): consume it batch by batch (GPTQ sums X·Xᵀ, bias correction the output shift) and it
    never holds them all. Returns counts: segments run, values spilled, bytes written."""
    nodes = list(gm.graph.nodes)
    last_use: Dict[fx.Node, int] = {}
    for i, node in enumerate(nodes):
        for a in node.all_input_nodes:
            last_use[a] = i
    first_input = next((n for n in nodes if n.op == "placeholder"), None)
    end = next((i for i, n in enumerate(nodes) if n.op == "output"), len(nodes))
    wanted = None if only is None else {id(m) for m in only}
    hooks: Dict[int, nn.Module] = {}
    seen = set()
    for i, node in enumerate(nodes[:end]):
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if id(mod) not in seen:
                seen.add(id(mod))
                if wanted is None or id(mod) in wanted:
                    hooks[i] = mod
    envs = _Envs(len(batches), capture_budget() if budget is None else budget)
    bounds = sorted(set(hooks) | {0, end})
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a in hooks:
            node = nodes[a]
            before(hooks[a], _NodeInputs(envs, node.args[0]) if node.args else [])
        envs.keep_outside(gm, batches)
        for k, x in enumerate(batches):
            env = envs.get(k)
            for i in range(a, b):
                node = nodes[i]
                if node.op == "placeholder":          # the batch; any further input keeps its default
                    env[node] = x.to(device) if node is first_input else (node.args[0] if node.args else None)
                else:
                    mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
                    env[node] = _run_node(gm, node, env, mod)
                for arg in node.all_input_nodes:
                    if last_use.get(arg) == i:
                        env.pop(arg, None)
            envs.put(k, env)
    envs.close()
    return {"segments": len(bounds) - 1, "values_spilled": envs.values_spilled, "bytes_spilled": envs.bytes_spilled}


class _OnDisk:
    """One node value (a contiguous tensor) in its own unnamed temporary file; the file goes when the
    last env entry referring to it does."""

    def __init__(self, t: torch.Tensor):
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device
        self.file = _spill_file()
        self.file.write(memoryview(t.detach().cpu().reshape(-1).view(torch.uint8).numpy()))
        self.file.flush()
        self.nbytes = t.numel() * t.element_size()
        self.loaded: Optional[torch.Tensor] = None     # the tensor read back in this segment, and its version
        self.version = -1

    def read(self) -> torch.Tensor:
        t = torch.empty(self.shape, dtype=self.dtype)
        self.file.seek(0)
        got = self.file.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        if got != self.nbytes:
            raise IOError(f"spilled node value: read {got} of {self.nbytes} bytes from its temporary file")
        return t.to(self.device)


class _Env(dict):
    """One batch's live node values; a spilled value is read back on its first lookup (and remembered,
    so that an unchanged one goes back to its file without a rewrite)."""

    def __init__(self):
        super().__init__()
        self.read_back: Dict[int, _OnDisk] = {}       # id(tensor read back) -> its record

    def __getitem__(self, node):
        v = dict.__getitem__(self, node)
        if isinstance(v, _OnDisk):
            if v.loaded is None:
                v.loaded = v.read()
                v.version = v.loaded._version
                self.read_back[id(v.loaded)] = v
            v = v.loaded
            dict.__setitem__(self, node, v)
        return v


def _tensors(v: Any) -> Iterator[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, (list, tuple)):
        for e in v:
            yield from _tensors(e)
    elif isinstance(v, dict):
        for e in v.values():
            yield from _tensors(e)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Envs:
    """The envs of all batches between segments: whole envs in memory while their bytes fit the budget
    (in batch order), the others with every spillable tensor on disk. Never spilled: tensors sharing
    storage with the model or the input batches (held anyway, and an in-place change to the model must
    stay visible), tensors sharing storage with another live value (the alias must survive), and empty
    or non-contiguous ones. A value read back and not modified in place (same version) goes back to
    its file without a rewrite."""

    def __init__(self, n: int, budget: int):
        self.budget = budget
        self.envs: List[_Env] = [_Env() for _ in range(n)]
        self.sizes = [0] * n                 # bytes each in-memory env holds (0 when spilled)
        self.used = 0
        self.outside: set = set()
        self.values_spilled = 0
        self.bytes_spilled = 0

    def keep_outside(self, gm: nn.Module, batches: Sequence[torch.Tensor]) -> None:
        ts = list(gm.parameters()) + list(gm.buffers()) + list(batches)
        self.outside = {_storage(t) for t in ts if t.numel()}

    def get(self, k: int) -> _Env:
        self.used -= self.sizes[k]
        self.sizes[k] = 0
        return self.envs[k]

    def peek(self, k: int, node: fx.Node) -> Any:
        v = dict.__getitem__(self.envs[k], node)
        return v.read() if isinstance(v, _OnDisk) else v

    def put(self, k: int, env: _Env) -> None:
        storages: Dict[int, set] = {}          # storage -> the distinct live tensors on it
        for v in dict.values(env):
            if not isinstance(v, _OnDisk):
                for t in _tensors(v):
                    storages.setdefault(_storage(t), {})[id(t)] = t
        size = sum(next(iter(ts.values())).untyped_storage().nbytes()
                   for p, ts in storages.items() if p not in self.outside)
        read_back, env.read_back = env.read_back, {}
        for rec in read_back.values():
            rec.loaded = None
        if self.used + size <= self.budget:
            self.sizes[k] = size
            self.used += size
            return
        written: Dict[int, _OnDisk] = {}
        for node, v in list(dict.items(env)):
            if (not isinstance(v, torch.Tensor) or _storage(v) in self.outside or len(storages[_storage(v)]) > 1
                    or v.numel() == 0 or not v.is_contiguous()):
                continue
            rec = written.get(id(v))
            if rec is None:
                old = read_back.get(id(v))
                if old is not None and old.version == v._version:
                    rec = old                  # read back and unchanged: its file still holds it
                else:
                    rec = _OnDisk(v)
                    self.values_spilled += 1
                    self.bytes_spilled += rec.nbytes
                written[id(v)] = rec
            dict.__setitem__(env, node, rec)

    def close(self) -> None:
        self.envs = []


class _NodeInputs:
    """A node's first argument for every batch, read one batch at a time (a spilled one from its file)."""

    def __init__(self, envs: _Envs, arg: Any):
        self.envs, self.arg = envs, arg

    def __len__(self) -> int:
        return len(self.envs.envs)

    def __iter__(self) -> Iterator[Any]:
        for k in range(len(self.envs.envs)):
            yield fx.node.map_arg(self.arg, lambda n, k=k: self.envs.peek(k, n))


@torch.no_grad()
def node_values(gm: fx.GraphModule, batches: Sequence[torch.Tensor], name: str, device: str = "cpu") -> List[torch.Tensor]:
    """The value of graph node `name` for every batch, running gm's graph only up to that node."""
    nodes = list(gm.graph.nodes)
    first_input = next((n for n in nodes if n.op == "placeholder"), None)
    out: List[torch.Tensor] = []
    for x in batches:
        env: Dict[fx.Node, Any] = {}
        for node in nodes:
            if node.op == "output":
                raise KeyError(f"graph node '{name}' not found")
            if node.op == "placeholder":
                env[node] = x.to(device) if node is first_input else (node.args[0] if node.args else None)
            else:
                mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
                env[node] = _run_node(gm, node, env, mod)
            if node.name == name:
                out.append(env[node].detach())
                break
    return out


def run_nodes(gm: fx.GraphModule, nodes: Sequence[fx.Node], inputs: Dict[fx.Node, Any]) -> Any:
    """Run a span of gm's graph (nodes in topological order) from the values of its inputs; returns
    the value of the last node."""
    env: Dict[fx.Node, Any] = dict(inputs)
    for node in nodes:
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        env[node] = _run_node(gm, node, env, mod)
    return env[nodes[-1]]


def _run_node(gm: fx.GraphModule, node: fx.Node, env: Dict[fx.Node, Any], mod) -> Any:
    if node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "call_module":
        return mod(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def layer_forward(m: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """m's own computation on x with weight w (bias and geometry from m; no quantizers)."""
    if isinstance(m, nn.Linear):
        return F.linear(x, w, m.bias)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[w.dim() - 2]
        return fn(x, w, m.bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
    if isinstance(m, nn.modules.conv._ConvNd):
        return m._conv_forward(x, w, m.bias)
    raise TypeError(f"not a conv/linear layer: {type(m).__name__}")


def fp_weight(m: nn.Module) -> torch.Tensor:
    """The layer's FP weight before AdaRound replaced it with its rounded version (if it did)."""
    w = m.__dict__.get("qcard_fp_weight")
    return w if w is not None else m.weight.detach()


def weight_rows(w: torch.Tensor, wq):
    """(rows, scale, zero_point, back): w viewed as rows that each own one (scale, zero point) of
    the quantizer wq (one row per tensor, channel or group), and the map from rows back to w's shape."""
    spec = wq.spec
    if spec.granularity == "per_tensor":
        rows = w.reshape(1, -1)

        def back(r):
            return r.reshape(w.shape)
    elif spec.granularity == "per_channel":
        axis = wq.channel_axis
        moved = w.movedim(axis, 0)
        rows = moved.reshape(moved.shape[0], -1)
        mshape = moved.shape

        def back(r):
            return r.reshape(mshape).movedim(0, axis)
    else:
        rows, back = group_rows(w, wq.channel_axis, spec.group_size)
    return rows, wq.scale.reshape(-1, 1), wq.zero_point.round().reshape(-1, 1), back
