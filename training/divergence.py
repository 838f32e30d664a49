"""Divergence: a non-finite loss or gradient never reaches a checkpoint.

``NonFiniteWatch`` remembers, on the device and without synchronising, the first iteration
whose training loss or gradient norm was not finite; the trainer polls it where it
synchronises anyway (every ``log_interval`` and before each evaluation and save). A save also
refuses weights that are not finite. On divergence the trainer either stops (the default:
exit 1, checkpoints untouched) or rolls back (``on_divergence='rollback'``):

1. reload the last checkpoint this run wrote or resumed from (iteration M), its optimizer,
   RNG and data state included;
2. skip the training batches of iterations M+1 .. N, N the first non-finite one: iteration i
   now reads the batches iteration i + (N - M) would have read (skips add up);
3. multiply the learning rate by ``rollback_lr_factor`` for the rest of the run (factors
   compound);
4. go on; after ``max_rollbacks`` rollbacks the next divergence stops the run.

The skip count and the learning-rate scale are saved in the checkpoint (``recovery``), so a
run resumed after a rollback continues exactly as it would have.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist

_NONE = 2 ** 62        # "no divergence" when ranks agree on the earliest one with MIN


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or the weights stopped being finite."""


@dataclass
class Divergence:
    iter: int            # numbered as in the logs: the iteration count after the step
    what: str            # e.g. "training loss nan, gradient norm nan"

    def __str__(self) -> str:
        return f"training diverged at iter {self.iter}: {self.what}"


class NonFiniteWatch:
    """The first iteration whose training loss or gradient norm was not finite."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.first = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.loss = torch.zeros((), device=self.device)
        self.norm = torch.zeros((), device=self.device)

    def observe(self, iter_num: int, loss: torch.Tensor, grad_norm: Optional[torch.Tensor] = None) -> None:
        """Record the step that brought the count to ``iter_num``; no synchronisation."""
        bad = ~torch.isfinite(loss)
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm)
        new = bad & (self.first < 0)
        self.first = torch.where(new, iter_num, self.first)
        self.loss = torch.where(new, loss.detach().float(), self.loss)
        if grad_norm is not None:
            self.norm = torch.where(new, grad_norm.detach().float(), self.norm)

    def poll(self) -> Optional[Divergence]:
        """The earliest non-finite iteration over all ranks, or None (synchronises; under DDP
        every rank must call it at the same point)."""
        earliest = torch.where(self.first < 0, _NONE, self.first)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(earliest, op=dist.ReduceOp.MIN)
        it = int(earliest.item())
        if it == _NONE:
            return None
        if int(self.first.item()) != it:
            return Divergence(it, "the training loss or gradient norm is not finite on another rank")
        return Divergence(it, f"training loss {self.loss.item():.4g}, gradient norm {self.norm.item():.4g}")


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding a NaN or an infinity (one synchronisation)."""
    named = list(model.named_parameters())
    finite = torch.stack([torch.isfinite(p).all() for _, p in named])
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


def check_validation_loss(iter_num: int, val_loss: float) -> Optional[Divergence]:
    return None if math.isfinite(val_loss) else Divergence(iter_num, f"validation loss {val_loss}")


@dataclass
class Recovery:
    """What rollbacks changed, saved in every checkpoint."""
    rollbacks: int = 0
    skipped_steps: int = 0   # iteration i reads the batches of iteration i + skipped_steps
    lr_scale: float = 1.0

    def roll_back(self, diverged_iter: int, checkpoint_iter: int, lr_factor: float) -> int:
        """Account for a rollback from ``diverged_iter`` to ``checkpoint_iter``; returns the
        number of iterations whose batches are skipped."""
        skipped = diverged_iter - checkpoint_iter
        self.rollbacks += 1
        self.skipped_steps += skipped
        self.lr_scale *= lr_factor
        return skipped

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Optional[dict]) -> "Recovery":
        return cls(**state) if state else cls()
