"""Replay a :class:`~synthlesion.augment.Compose` as CUDA graphs: one launch per batch.

On a GPU the augmentation of a batch is a few hundred small operations (parameter draws,
the coarse map, the fused warp, noise, bias field, gamma, the records); issuing them from
Python, not the device, sets the pace. ``Compose(..., cuda_graph=True)`` captures that work
once per input signature (keys, shapes, dtypes, strides, device and spacing) and replays
it afterwards: copy the batch into the graph's static inputs, one replay, copy the outputs
out (so a returned batch is never overwritten by the next call).

Random draws are unchanged: every transform's generator is registered with the graph
(PyTorch's graph-safe Philox state), so replay ``k`` draws exactly what eager call ``k``
would, and the records hold the applied parameters as usual. The first call of a
signature runs eagerly and returns its result; the lazy work (kernel compilation, cached
constants, the first-batch value checks) is then warmed up once more with the generators
restored, and the graph is captured. A pipeline that cannot be captured (a step that waits
for the device: e.g. Gaussian noise without Triton, or a spacing given as a CUDA tensor)
runs eagerly for that signature, with one warning.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthlesion.augment.base import APPLIED_KEY, SPACING_KEY, Transform
from synthlesion.augment.device_cache import keep_cached_alive

logger = logging.getLogger(__name__)


@dataclass
class _Graph:
    """One captured signature: the graph, its static inputs and outputs."""

    graph: torch.cuda.CUDAGraph | None  # None: this signature runs eagerly
    generators: tuple[torch.Generator, ...]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    keep_alive: list[torch.Tensor] = field(default_factory=list)


def _clone(value: Any) -> Any:
    """Deep copy of the tensors in a record (dicts, lists, tuples); other values as is."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


class CudaGraphRunner:
    """Runs ``run`` (a Compose's eager call) through one CUDA graph per input signature.

    Args:
        run: The eager pipeline, ``dict -> dict``.
        transforms: Its transforms (their generators are registered with each graph).
        keys: Every image and label key the pipeline reads.
        name: For messages.
        max_graphs: Signatures kept; each graph holds its own device memory for the
            intermediate tensors, so the oldest is dropped beyond this (varying shapes are
            better served by a fixed crop size, or by ``cuda_graph=False``).
    """

    def __init__(
        self,
        run: Callable[[Mapping[str, Any]], Any],
        transforms: list[Transform],
        keys: tuple[str, ...],
        name: str = "Compose",
        max_graphs: int = 8,
    ) -> None:
        self.run = run
        self.transforms = transforms
        self.keys = keys
        self.name = name
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, _Graph] = {}
        self._warned: set[str] = set()

    @staticmethod
    def available() -> bool:
        """Whether this PyTorch can capture with user generators (CUDA build, >= 2.5)."""
        return (
            torch.cuda.is_available()
            and hasattr(torch.cuda.CUDAGraph, "register_generator_state")
            and hasattr(torch.Generator, "graphsafe_set_state")
        )

    def applies(self, data: Any) -> bool:
        """True for a dict whose tensors under the keys are on a CUDA device."""
        if not isinstance(data, Mapping):
            return False
        first = next((data[k] for k in self.keys if k in data), None)
        return (
            isinstance(first, torch.Tensor)
            and first.is_cuda
            and not torch.cuda.is_current_stream_capturing()
        )

    def signature(self, data: Mapping[str, Any]) -> tuple | None:
        """What a graph is specialised on; None where the input cannot be graphed."""
        tensors = []
        for key in self.keys:
            if key in data:
                x = data[key]
                if not isinstance(x, torch.Tensor):
                    return None
                tensors.append((key, tuple(x.shape), x.dtype, x.stride(), str(x.device)))
        raw = data.get(SPACING_KEY)
        if raw is None:
            spacing = None
        else:
            try:
                array = np.asarray(raw, dtype=np.float64)
            except (TypeError, ValueError, RuntimeError):
                return None  # e.g. a spacing tensor on the device: read per call, eagerly
            spacing = (array.shape, tuple(array.ravel().tolist()))
        return (tuple(tensors), spacing)

    def __call__(self, data: Mapping[str, Any]) -> Any:
        if not self.available():
            self._warn("torch", f"PyTorch {torch.__version__} cannot capture its generators")
            return self.run(data)
        key = self.signature(data)
        if key is None:
            self._warn("input", "a spacing that is not a host value (list, numpy, CPU tensor)")
            return self.run(data)
        entry = self._graphs.get(key)
        if entry is not None and not self._same_generators(entry):
            entry = None  # set_random_state made new generators: capture again
        if entry is None:
            result, entry = self._capture(data)
            self._graphs.pop(key, None)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
                self._warn("signatures", f"more than {self.max_graphs} input shapes; the "
                           "oldest graphs are dropped and captured again when seen")  # fmt: skip
            return result
        if entry.graph is None:
            return self.run(data)
        for name, static in entry.inputs.items():
            static.copy_(data[name])
        entry.graph.replay()
        out = dict(data)
        for name, value in entry.outputs.items():
            out[name] = value.clone()
        out[APPLIED_KEY] = list(data.get(APPLIED_KEY, [])) + _clone(entry.records)
        return out

    # capture --------------------------------------------------------------------------------------

    def _generators(self) -> tuple[torch.Generator, ...]:
        return tuple(t._generator for t in self.transforms if t._generator is not None)

    def _same_generators(self, entry: _Graph) -> bool:
        current = self._generators()
        return len(current) == len(entry.generators) and all(
            a is b for a, b in zip(current, entry.generators, strict=True)
        )

    def _capture(self, data: Mapping[str, Any]) -> tuple[Any, _Graph]:
        """Run ``data`` eagerly (the result of this call), then capture the pipeline."""
        result = self.run(data)  # also creates the generators and runs the value checks
        generators = self._generators()
        states = [g.get_state() for g in generators]
        inputs = {k: data[k].clone() for k in self.keys if k in data}
        static = {k: v for k, v in data.items() if k != APPLIED_KEY}
        static.update(inputs)
        device = next(iter(inputs.values())).device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.run(static)  # warm-up: lazy work happens outside the capture
        torch.cuda.current_stream(device).wait_stream(side)
        for g, s in zip(generators, states, strict=True):
            g.set_state(s)
        # A failed capture leaves the registered generators (and the device's default one)
        # in capture mode, refusing every later draw: they get clean copies back.
        index = device.index if device.index is not None else torch.cuda.current_device()
        every = (*generators, torch.cuda.default_generators[index])
        clean = [g.clone_state() for g in every]
        graph = torch.cuda.CUDAGraph()
        try:
            for g in generators:
                graph.register_generator_state(g)
            with keep_cached_alive() as kept, torch.cuda.graph(graph):
                out = self.run(static)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager
            del graph
            for g, c in zip(every, clean, strict=True):
                g.graphsafe_set_state(c)
            while exc.__context__ is not None:  # the first error, not the failed capture_end
                exc = exc.__context__
            frames = traceback.extract_tb(exc.__traceback__)
            torch_dir = str(Path(torch.__file__).parent)  # the innermost frame outside torch
            at = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames)
                       if not f.filename.startswith(torch_dir)), "?")  # fmt: skip
            message = str(exc).splitlines()[0][:200] if str(exc) else ""
            self._warn("capture", f"{type(exc).__name__} at {at}: {message}")
            return result, _Graph(None, generators)
        for g, s in zip(generators, states, strict=True):
            g.set_state(s)  # the capture draws nothing: the next replay is eager call 2
        if not isinstance(out, Mapping):
            self._warn("capture", "the pipeline returned several items (a crop)")
            return result, _Graph(None, generators)
        outputs = {k: out[k] for k in self.keys if k in out}
        records = list(out.get(APPLIED_KEY, []))
        logger.debug("%s: captured a CUDA graph for %s", self.name, list(outputs))
        return result, _Graph(graph, generators, inputs, outputs, records, kept)

    def _warn(self, kind: str, why: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            if kind == "signatures":
                logger.warning("%s: cuda_graph=True: %s", self.name, why)
            else:
                logger.warning("%s: cuda_graph=True runs eagerly here: %s", self.name, why)
