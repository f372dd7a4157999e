"""Data parallelism over processes started by `accelerate launch` (or torchrun): one global batch, split by rows.

How one RL step splits over N processes, so that N processes follow the 1-process run (up to float summation
order, within 1e-5 on CPU; tests/end_to_end/test_distributed.py):
- every process draws the same prompts and trained timesteps (seeded by step) and the noise of the WHOLE batch,
  and keeps its contiguous share of rows (`rows`); so process r samples exactly rows r of the 1-process batch;
- each process scores its own images; the scores are gathered, so advantages (group and batch statistics) are
  those of the whole batch;
- each process's loss is its share of the global mean; gradients are summed over processes before clipping, so
  every process takes the same optimiser step and keeps the same weights and EMA; only the main process writes.

One process (the default, and whenever WORLD_SIZE is unset) never imports accelerate and computes exactly as before.
How a stage command gets several processes: flowopd.runtime.launch.
"""

from __future__ import annotations

import numpy as np
import torch

from flowopd.runtime.launch import launched_world_size


class Processes:
    """This process's place in the job: `count`, `index`, `is_main`, `device`, and the collectives trainers use."""

    def __init__(self, state=None):
        self.state = state  # accelerate.PartialState, None for a single process
        self.count = state.num_processes if state is not None else 1
        self.index = state.process_index if state is not None else 0
        self.is_main = self.index == 0
        self.device = state.device if state is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @classmethod
    def from_environment(cls) -> Processes:
        if launched_world_size() <= 1:
            return cls()
        from accelerate import PartialState

        # gloo on CPU; accelerate picks NCCL and each process's own GPU when there are GPUs
        return cls(PartialState(cpu=not torch.cuda.is_available()))

    # -- splitting the batch ---------------------------------------------------------------------------
    def rows(self, n: int) -> slice:
        """This process's contiguous share of a global batch of n rows."""
        if n % self.count:
            raise ValueError(f"a batch of {n} samples does not split over {self.count} processes: make "
                             "prompts_per_step x group_size a multiple of the process count")
        share = n // self.count
        return slice(self.index * share, (self.index + 1) * share)

    def split(self, n: int) -> slice:
        """This process's contiguous share of n items that need not split evenly (prompts to sample or score):
        the first n % count processes take one item more."""
        share, extra = divmod(n, self.count)
        start = self.index * share + min(self.index, extra)
        return slice(start, start + share + (self.index < extra))

    # -- collectives (identity for one process) ----------------------------------------------------------
    def gather_objects(self, value) -> list:
        """Every process's `value` (anything picklable: arrays, CPU tensors, dicts), in process order, on every
        process; [value] for one process."""
        if self.count == 1:
            return [value]
        gathered = [None] * self.count
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def gather(self, values: np.ndarray) -> np.ndarray:
        """Concatenate every process's rows (axis 0) in process order; the same shape on every process."""
        if self.count == 1:
            return values
        from accelerate.utils import gather

        local = torch.as_tensor(np.ascontiguousarray(values), dtype=torch.float64, device=self.device)
        return gather(local).cpu().numpy()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes of a list of floats (one collective)."""
        if self.count == 1 or not values:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return total.tolist()

    def mean(self, values: list[float]) -> list[float]:
        """Element-wise mean over processes (of per-process means over equal shares)."""
        return values if self.count == 1 else [v / self.count for v in self.sum(values)]

    def pooled_mean(self, mean: float, n: int) -> float:
        """The mean over all processes' rows of a quantity each process averaged over its n rows (NaN if none)."""
        if self.count == 1:
            return mean if n else float("nan")
        total, count = self.sum([mean * n if n else 0.0, float(n)])
        return total / count if count else float("nan")

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Sum the gradients over processes (each process's loss is its share of the global mean)."""
        if self.count == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()
