"""``DeviceLoader``: batches from a uint8 dataset kept on one device, augmented on that device.

The whole dataset is moved to ``device`` once. Each epoch, the permutation, crop offsets and flips
for every sample are drawn from a CPU ``torch.Generator`` seeded by ``(seed, epoch)`` and moved to
the device in one go, so:

* the same seed gives the same batches on CPU and GPU;
* no per-batch host synchronisation happens (batches are built with device-side indexing only).

Epochs: every pass that actually yields a batch is one epoch. A pass that runs to the end advances
to the next epoch; a pass abandoned early also counts, and the next pass starts the following
epoch from its first batch. Merely calling ``iter()`` without taking a batch changes nothing
(Lightning calls ``iter()`` for checks). ``set_epoch(e)`` jumps to epoch ``e``; Lightning calls it
(through ``loader.sampler.set_epoch``) at the start of every training epoch, so the loader's epoch
follows the trainer's even with ``limit_train_batches``.

``state_dict()`` / ``load_state_dict()`` save the epoch and the number of batches already yielded,
so a resumed run continues mid-epoch with the identical data order; Lightning 2.x calls them for
stateful training iterables in its checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from sharpbench.data.augment import crop_flip, normalize, normalizer
from sharpbench.data.errors import DataConfigError
from sharpbench.data.seeding import make_generator


class DeviceLoader:
    """Iterable of ``(x, y)`` batches: ``x`` float32 ``[B,C,H,W]`` normalised, ``y`` int64 ``[B]``.

    Args:
        x_uint8: images ``[N, C, H, W]``, dtype uint8 (any device; copied to ``device`` once).
        y: labels ``[N]`` (int64).
        batch_size: samples per batch on this rank.
        shuffle: new seeded permutation every epoch (else dataset order).
        augment: random crop (zero padding ``pad``, offsets in ``[0, 2*pad]``) + horizontal flip.
        mean, std: per-channel statistics on the 0..1 scale used for normalisation.
        device: where data, augmentation and batches live (default CPU).
        drop_last: drop the last incomplete batch (and, with several ranks, the samples that do
            not divide evenly); without it the last batch is smaller and ranks are padded by
            repeating samples from the start of the permutation, like ``DistributedSampler``.
        seed: base seed of the per-epoch randomness.
        rank, world_size: this process's shard; rank ``r`` takes positions ``r, r+W, r+2W, ...``
            of each epoch's permutation, so shards are disjoint and equally long.
        channels_last: return batches in ``torch.channels_last`` memory format.
        pad: crop padding in pixels.
    """

    def __init__(
        self,
        x_uint8: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        device: torch.device | str | None = None,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        pad: int = 4,
    ) -> None:
        _check_inputs(x_uint8, y, batch_size, rank, world_size, mean, std)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.x = x_uint8.to(self.device)
        self.y = y.to(device=self.device, dtype=torch.int64)
        self.batch_size = int(batch_size)
        self.shuffle, self.augment, self.drop_last = bool(shuffle), bool(augment), bool(drop_last)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.channels_last, self.pad = bool(channels_last), int(pad)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._scale, self._shift = normalizer(self.mean, self.std, self.device)
        n = len(self.y)
        if self.drop_last:
            self.samples_per_rank = n // self.world_size
            self._num_batches = self.samples_per_rank // self.batch_size
        else:
            self.samples_per_rank = -(-n // self.world_size)
            self._num_batches = -(-self.samples_per_rank // self.batch_size)
        if self._num_batches == 0:
            raise DataConfigError(
                f"batch_size={batch_size} is larger than the {self.samples_per_rank} images each of "
                f"the {self.world_size} rank(s) gets from this {n}-image set, so an epoch would have "
                "no batch. Lower batch_size or use more data (e.g. a larger dataset.train_subset)."
            )
        self._epoch = 0
        self._yielded = 0  # batches yielded in the current epoch
        self._started = False  # a pass of the current epoch has yielded at least one batch
        # Lightning calls ``loader.sampler.set_epoch(epoch)`` at the start of every training epoch
        # (also after resuming); these two attributes exist only to receive that call.
        self.sampler = _EpochSetter(self)
        self.batch_sampler = None
        self._consumed: tuple[int, int] | None = None  # (epoch, batches) the driver has used

    # ----------------------------------------------------------------- epoch bookkeeping
    def __len__(self) -> int:
        """Number of batches per epoch on this rank."""
        return self._num_batches

    @property
    def epoch(self) -> int:
        """The epoch the current (or next) pass belongs to."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch``; a restored mid-epoch position for it is kept."""
        if epoch != self._epoch or self._started:
            self._yielded = 0
        self._epoch = int(epoch)
        self._started = False

    def mark_consumed(self, epoch: int, batches: int) -> None:
        """The driver has *used* ``batches`` batches of ``epoch``. A trainer that prefetches holds
        batches the loader has yielded but no step has seen; after this call :meth:`state_dict`
        reports the consumed position, so a resumed run re-serves the prefetched batches."""
        self._consumed = (int(epoch), int(batches))

    def _position(self) -> tuple[int, int]:
        if self._consumed is None:
            return self._epoch, self._yielded
        epoch, batches = self._consumed
        return (epoch + 1, 0) if batches >= self._num_batches else (epoch, batches)

    def state_dict(self) -> dict[str, Any]:
        """Return the position in the data stream: epoch and batches already used in it."""
        epoch, batches = self._position()
        return {
            "epoch": epoch,
            "batches_yielded": batches,
            "num_samples": len(self.y),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next pass continues where the saved one stopped."""
        yielded = int(state.get("batches_yielded", 0))
        if yielded:
            for key in ("num_samples", "batch_size", "world_size", "seed", "shuffle"):
                saved, now = state.get(key), self.state_dict()[key]
                if saved is not None and saved != now:
                    raise ValueError(
                        f"Cannot resume this loader mid-epoch: the checkpoint was saved with "
                        f"{key}={saved} but the loader now has {key}={now}. Resume with the same data "
                        "settings (dataset, batch size, devices, seed) or from an end-of-epoch checkpoint."
                    )
        if yielded >= self._num_batches:
            raise ValueError(
                f"Saved position {yielded} is past the {self._num_batches} batches of an epoch; "
                "the checkpoint does not belong to this data configuration."
            )
        self._epoch = int(state["epoch"])
        self._yielded = yielded
        self._started = False
        self._consumed = None

    def _finish_epoch(self) -> None:
        self._epoch += 1
        self._yielded = 0
        self._started = False

    # ----------------------------------------------------------------- batches
    def epoch_plan(self, epoch: int) -> dict[str, torch.Tensor]:
        """Return this rank's sample indices (and crop/flip parameters) for ``epoch``, on the device."""
        n, total = len(self.y), self.samples_per_rank * self.world_size
        g = make_generator(self.seed, "epoch", epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if total > n:  # pad by wrapping around, so that every rank gets the same number of samples
            order = order.repeat(-(-total // n))
        order = order[:total]
        positions = torch.arange(self.rank, total, self.world_size)
        plan = {"index": order[positions]}
        if self.augment:
            offsets = torch.randint(0, 2 * self.pad + 1, (2, total), generator=g)
            flips = torch.randint(0, 2, (total,), generator=g).bool()
            plan.update(dy=offsets[0, positions], dx=offsets[1, positions], flip=flips[positions])
        return {k: v.to(self.device, non_blocking=True) for k, v in plan.items()}

    def sample_ids(self, epoch: int, batch: int) -> torch.Tensor:
        """The dataset positions (into this loader's ``y``) of batch ``batch`` of ``epoch``, on the
        device: what SAF keys its per-sample outputs by. From the epoch's plan (kept for the
        epoch being served; recomputed, deterministically, for another)."""
        cached = getattr(self, "_plan", None)
        if cached is None or cached[0] != epoch:
            cached = self._plan = (epoch, self.epoch_plan(epoch))
        return cached[1]["index"][batch * self.batch_size:(batch + 1) * self.batch_size]

    def make_batch(self, plan: dict[str, torch.Tensor], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Build batch number ``batch`` of an epoch from its :meth:`epoch_plan`."""
        sl = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
        index = plan["index"][sl]
        x = self.x.index_select(0, index)
        if self.augment:
            x = crop_flip(x, plan["dy"][sl], plan["dx"][sl], plan["flip"][sl], self.pad)
        x = normalize(x, self._scale, self._shift)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.y.index_select(0, index)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Return a pass over one epoch; bookkeeping starts only when the first batch is taken."""
        return self._run_epoch()

    def _run_epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._started:  # the previous pass stopped early: it still counts as an epoch
            self._finish_epoch()
        self._started = True
        epoch, start = self._epoch, self._yielded
        plan = self.epoch_plan(epoch)
        self._plan = (epoch, plan)
        for b in range(start, self._num_batches):
            batch = self.make_batch(plan, b)
            self._yielded = b + 1
            if self._yielded == self._num_batches:
                # finish before handing out the last batch: Lightning never asks past len(self)
                self._finish_epoch()
            yield batch


class _EpochSetter:
    """Forwards ``set_epoch`` to its loader (the hook Lightning looks for on ``loader.sampler``)."""

    def __init__(self, loader: DeviceLoader) -> None:
        self._loader = loader

    def set_epoch(self, epoch: int) -> None:
        """Call :meth:`DeviceLoader.set_epoch`."""
        self._loader.set_epoch(epoch)


def _check_inputs(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, rank: int, world_size: int,
    mean: Sequence[float], std: Sequence[float],
) -> None:
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise DataConfigError(f"DeviceLoader expects uint8 images [N, C, H, W]; got {x.dtype} {tuple(x.shape)}.")
    if y.dim() != 1 or len(y) != len(x):
        raise DataConfigError(f"DeviceLoader needs one label per image; got {tuple(y.shape)} labels for {len(x)} images.")
    if len(x) == 0:
        raise DataConfigError("DeviceLoader got an empty dataset; check the dataset settings.")
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise DataConfigError(f"mean/std need {x.shape[1]} values (one per channel); got {len(mean)} and {len(std)}.")
    if batch_size < 1:
        raise DataConfigError(f"batch_size={batch_size} must be at least 1.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataConfigError(f"rank={rank} must be in [0, world_size={world_size}).")
