"""Hooks as context managers that always remove themselves (after ROME's ``util/nethook.py``).

Everything in memoe that reads or rewrites activations goes through :func:`hooks`, :func:`capture` or
:func:`patch`, so no hook outlives the ``with`` block, even when the body raises.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

HookFn = Callable[[nn.Module, tuple, object], object]


def output_tensor(output: object) -> torch.Tensor:
    """The hidden-state tensor inside a module's output (decoder layers may return tuples)."""
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def replace_output(output: object, tensor: torch.Tensor) -> object:
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


@contextlib.contextmanager
def hooks(model: nn.Module, forward: dict[str, HookFn] | None = None,
          pre: dict[str, Callable] | None = None) -> Iterator[None]:
    """Register forward hooks (``fn(module, inputs, output) -> new output or None``) and forward pre-hooks
    (``fn(module, inputs) -> new inputs or None``) by module name; remove them all on exit."""
    handles = []
    try:
        for name, fn in (forward or {}).items():
            handles.append(model.get_submodule(name).register_forward_hook(fn))
        for name, fn in (pre or {}).items():
            handles.append(model.get_submodule(name).register_forward_pre_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


class StopForward(Exception):
    """Raised by a ``capture(..., stop=True)`` hook once everything asked for is recorded."""


@contextlib.contextmanager
def capture(model: nn.Module, names: list[str], inputs: bool = False, detach: bool = True,
            stop: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output (or, with ``inputs=True``, the first positional input) of each named module.

    The dict is filled during the forward passes run inside the block; a second pass overwrites it. With
    ``stop=True`` the forward is cut short as soon as every named module has run (the layers above are never
    computed) and the rest of the block is skipped: put only the forward pass inside it.
    """
    store: dict[str, torch.Tensor] = {}

    def make(name: str) -> HookFn:
        def fn(module, args, output):
            t = args[0] if inputs else output_tensor(output)
            store[name] = t.detach() if detach else t
            if stop and len(store) == len(names):
                raise StopForward

        return fn

    try:
        with hooks(model, forward={n: make(n) for n in names}):
            yield store
    except StopForward:
        pass


@contextlib.contextmanager
def patch(model: nn.Module, edits: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Replace each named module's output tensor ``h`` by ``edits[name](h)`` during the block."""

    def make(fn):
        def hook(module, args, output):
            return replace_output(output, fn(output_tensor(output)))

        return hook

    with hooks(model, forward={n: make(f) for n, f in edits.items()}):
        yield


@contextlib.contextmanager
def start_after(model: nn.Module, names: list[str], state: Callable[[], torch.Tensor], as_tuple: bool = False) -> Iterator[None]:
    """Run forward passes from a known state: the modules in ``names`` (consecutive blocks from the first) are not
    computed; each but the last passes its input on, the last returns ``state()``. For fixed prompts whose state
    after a block is cached, so the blocks below it are not run again at every step. ``as_tuple``: the blocks
    return tuples (hidden state first)."""
    wrap = (lambda t: (t,)) if as_tuple else (lambda t: t)
    mods = [model.get_submodule(n) for n in names]
    try:
        for m in mods[:-1]:
            m.forward = lambda hidden_states, *args, **kwargs: wrap(hidden_states)
        mods[-1].forward = lambda *args, **kwargs: wrap(state())
        yield
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)  # the class's forward again
