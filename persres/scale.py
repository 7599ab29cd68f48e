"""Several processes through Hugging Face accelerate: which process am I, which units are mine.

Started plainly, a command is one process (rank 0 of 1) and accelerate is never imported.
Started by `accelerate launch` or `torchrun` (WORLD_SIZE > 1 in the environment), `cluster()`
wraps accelerate's `PartialState`: each process takes its GPU (`PartialState().device`), or
on the CPU a gloo group with torch threads = cores / local processes; units are assigned by
`split_between_processes` over a list every process computes identically, so each unit is
done by exactly one process; `wait` is `wait_for_everyone`; `gather` is `gather_object`.
The process group is destroyed on the way out: without that, gloo aborts at interpreter exit
("terminate called without an active exception") in about 1 run in 4.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from persres.errors import InputError


def launched() -> bool:
    """Whether this process was started as one of several (accelerate launch, torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


@dataclass
class Cluster:
    rank: int = 0
    world: int = 1
    local_world: int = 1
    device: torch.device = torch.device("cpu")
    state: Any = None  # accelerate.PartialState when launched

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def multi_node(self) -> bool:
        """Processes on several machines: SQLite must then be written by rank 0 alone."""
        return self.world > self.local_world

    def split(self, units: Sequence) -> list:
        """This process's share of `units` (contiguous, deterministic, balanced to within one)."""
        if self.state is None:
            return list(units)
        with self.state.split_between_processes(list(units)) as mine:
            return list(mine)

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def gather(self, items: list) -> list:
        """Every process's `items`, concatenated in rank order, on every process."""
        if self.state is None:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))

    def share(self, value):
        """Rank 0's `value`, on every process."""
        if self.state is None:
            return value
        box = [value if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


@contextmanager
def cluster(device: str = "auto") -> Iterator[Cluster]:
    """This process's place among the launched ones (a 1-process cluster when not launched)."""
    if not launched():
        from persres.models import pick_device

        yield Cluster(device=pick_device(device))
        return
    try:
        from accelerate import PartialState
    except ImportError:
        raise InputError("this command was launched as several processes, which needs accelerate: "
                         "pip install 'persres[scale]'") from None
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
    if cpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    try:
        yield Cluster(state.process_index, state.num_processes, local_world,
                      torch.device("cpu") if cpu else state.device, state)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
