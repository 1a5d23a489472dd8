"""A data loader that can start at any sample: resuming a run continues the exact sample stream.

megatron-core's datasets are already shuffled (their sample order is fixed by the seed), so the
loader reads them in order. Positions are counted in *global* samples (summed over data-parallel
ranks), which is what a checkpoint stores as ``consumed_samples``.
"""

from __future__ import annotations

from typing import Iterator, List

import torch
from torch.utils.data import DataLoader, Sampler


class ResumableBatchSampler(Sampler[List[int]]):
    """Yields this rank's micro-batches of sample indices, starting at ``consumed_samples``.

    Each step takes the next ``micro_batch_size * data_parallel_size`` samples; rank r gets the
    r-th slice of ``micro_batch_size``. With ``drop_last`` an incomplete final step is skipped
    (every rank must run the same number of steps).
    """

    def __init__(
        self,
        total_samples: int,
        micro_batch_size: int,
        consumed_samples: int = 0,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        drop_last: bool = True,
    ):
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise ValueError("micro_batch_size and data_parallel_size must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} not in [0, {total_samples}]")
        self.total_samples = total_samples
        self.micro_batch_size = micro_batch_size
        self.consumed_samples = consumed_samples
        self.rank = data_parallel_rank
        self.world = data_parallel_size
        self.drop_last = drop_last

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.world

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        full, partial = divmod(remaining, self.global_batch)
        if self.drop_last or partial == 0:
            return full
        return full + 1

    def __iter__(self) -> Iterator[List[int]]:
        start = self.consumed_samples
        while start < self.total_samples:
            end = min(start + self.global_batch, self.total_samples)
            if end - start < self.global_batch and self.drop_last:
                return
            lo = start + self.rank * self.micro_batch_size
            hi = min(lo + self.micro_batch_size, end)
            if lo < hi:
                yield list(range(lo, hi))
            start = end


def build_loader(
    dataset,
    micro_batch_size: int,
    consumed_samples: int = 0,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    num_workers: int = 0,
    drop_last: bool = True,
) -> DataLoader:
    """A DataLoader over ``dataset`` starting at global sample ``consumed_samples``.

    Batches are dicts of stacked tensors (megatron's samples collate with the default collate).
    """
    sampler = ResumableBatchSampler(
        len(dataset), micro_batch_size, consumed_samples, data_parallel_rank,
        data_parallel_size, drop_last,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # Without its own generator, DataLoader draws its workers' base seed from the global torch
        # RNG each time an iterator is made: a resumed run would then draw dropout masks one
        # step behind the uninterrupted run. The samples themselves are not random here.
        generator=torch.Generator().manual_seed(0),
    )
