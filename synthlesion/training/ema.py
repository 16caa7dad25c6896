"""Exponential moving average of the trainable weights, saved by us as safetensors.

The decay follows diffusers' ``EMAModel`` (optionally with its warm-up), but the state is a
plain dict of named tensors and numbers so checkpoints never go through pickle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from synthlesion.training.errors import CheckpointError


class EMA:
    """Shadow copies (float32) of named parameters.

    Args:
        named_parameters: ``(name, parameter)`` pairs to follow (the trainable ones).
        decay: Largest decay.
        update_after_step: Steps before the average starts following.
        use_warmup: diffusers' warm-up ``1 - (1 + step / inv_gamma) ** -power``; otherwise
            ``(1 + step) / (10 + step)``.
        inv_gamma, power: Warm-up shape.
    """

    def __init__(
        self,
        named_parameters: Sequence[tuple[str, torch.nn.Parameter]],
        *,
        decay: float = 0.9999,
        update_after_step: int = 0,
        use_warmup: bool = True,
        inv_gamma: float = 1.0,
        power: float = 0.75,
    ) -> None:
        self.names = [n for n, _ in named_parameters]
        self.params = [p for _, p in named_parameters]
        self.shadow = [p.detach().to(torch.float32, copy=True) for p in self.params]
        self.decay = decay
        self.update_after_step = update_after_step
        self.use_warmup = use_warmup
        self.inv_gamma = inv_gamma
        self.power = power
        self.optimization_step = 0

    def current_decay(self) -> float:
        step = max(0, self.optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_warmup:
            value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            value = (1 + step) / (10 + step)
        return min(value, self.decay)

    @torch.no_grad()
    def step(self) -> None:
        """Move the average one optimizer step towards the current weights."""
        self.optimization_step += 1
        weight = 1.0 - self.current_decay()
        current = [p.detach().to(torch.float32) for p in self.params]
        torch._foreach_lerp_(self.shadow, current, weight)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the average; afterwards their own values."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup, strict=True):
                    p.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {
            "shadow": dict(zip(self.names, self.shadow, strict=True)),
            "optimization_step": self.optimization_step,
            "decay": self.decay,
            "update_after_step": self.update_after_step,
            "use_warmup": self.use_warmup,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
        }

    def load_state_dict(self, state: Mapping[str, Any], where: str = "ema") -> None:
        shadow = state.get("shadow", {})
        missing = [n for n in self.names if n not in shadow]
        if missing:
            raise CheckpointError(f"{where}: EMA lacks {missing[:5]}")
        device = self.shadow[0].device if self.shadow else None
        self.shadow = [shadow[n].to(device=device, dtype=torch.float32) for n in self.names]
        self.optimization_step = int(state["optimization_step"])
