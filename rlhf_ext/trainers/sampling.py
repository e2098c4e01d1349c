"""The prompt order of GRPO-style trainers, made a function of (seed, epoch) so that a resumed run sees the same
prompts as an uninterrupted one."""

from __future__ import annotations

from torch.utils.data import Sampler
from trl.trainer.utils import RepeatSampler


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler` whose shuffle of epoch e is drawn from a generator seeded with `seed + e`.

    `RepeatSampler` seeds its generator once and draws each epoch's permutation from where the previous epoch left
    it, so a run resumed after its first epoch starts a fresh generator and replays the first epoch's order instead of
    the second's: with fewer prompts than the run uses, the resumed run trains on other batches than the
    uninterrupted one. The Trainer calls `set_epoch(epoch)` (through accelerate's data loader) before every epoch,
    as for accelerate's `SeedableRandomSampler`, which seeds the same way.
    """

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed + epoch)


def epoch_seeded(sampler: Sampler) -> Sampler:
    """`sampler` made an `EpochSeededRepeatSampler` if it is TRL's plain `RepeatSampler` (it only gains
    `set_epoch`, so re-classing the instance keeps everything TRL set up); any other sampler is returned as is."""
    if type(sampler) is RepeatSampler:
        sampler.__class__ = EpochSeededRepeatSampler
    return sampler
