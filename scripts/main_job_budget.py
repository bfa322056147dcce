"""The main job's fine-tuning budget: how many training images each epoch may draw so that
the job ends in its time, re-checked after every epoch (``scripts/main_job.py``)."""

from __future__ import annotations

from dataclasses import dataclass

# after fine-tuning: latency, summaries, saves, report and plot, which take a fraction of
# this on a quiet machine, so that they fit on a much slower one too
RESERVE_SECONDS = 90.0
MIN_BATCHES = 10  # the fewest batches an epoch trains on, whatever the budget


@dataclass
class FineTuningBudget:
    """Training images per fine-tuning epoch that end the job by ``deadline`` (Unix time):
    the time left, less the reserve for the steps after fine-tuning, shared among the epochs
    left, each paying for its images and one evaluation. Re-checked after every epoch
    (:meth:`epoch_done`) from what that epoch took, so that a machine that slows down gets
    fewer images in the later epochs; and an epoch that runs slower than planned stops early
    (:meth:`must_stop`), so that the job ends in time when the slowdown starts mid-epoch."""

    deadline: float
    epochs: int
    batch_size: int
    seconds_per_image: float  # training: a student step and a teacher forward
    seconds_per_eval: float  # the epoch's evaluation on the test set, and its checkpoint
    max_images: int  # the training set's size
    checked_at: float = 0.0  # when fine-tuning started (start), then when an epoch ended
    epochs_done: int = 0

    def __post_init__(self) -> None:
        self.estimate = self.seconds_per_image  # measured before fine-tuning
        self.short = False
        self._mark = (self.checked_at, 0)  # (time, images drawn) in the epoch under way
        self._recent = self.seconds_per_image  # seconds per image over the last floor

    @property
    def slowdown(self) -> float:
        """Seconds per image now against the estimate before fine-tuning."""
        return self.seconds_per_image / self.estimate

    @property
    def floor(self) -> int:
        """The fewest images an epoch trains on, whatever the budget."""
        return MIN_BATCHES * self.batch_size

    def images(self, now: float) -> int:
        """The most images each epoch left may draw (whole batches; at least :attr:`floor`,
        at most ``max_images``; ``short`` says whether the floor was more than fits)."""
        left = self.deadline - now - RESERVE_SECONDS
        per_epoch = left / (self.epochs - self.epochs_done) - self.seconds_per_eval
        images = int(per_epoch / self.seconds_per_image) // self.batch_size * self.batch_size
        self.short = images < self.floor
        return min(max(self.floor, images), self.max_images)

    def must_stop(self, drawn: int, now: float) -> bool:
        """Whether the epoch under way, ``drawn`` images in at ``now``, must stop so that its
        evaluation and, for each later epoch, the floor and an evaluation still end before
        the reserve, at the speed of its last :attr:`floor` images (never below the
        floor)."""
        marked_at, marked = self._mark
        if drawn - marked >= self.floor:
            self._recent = (now - marked_at) / (drawn - marked)
            self._mark = (now, drawn)
        if drawn < self.floor:
            return False
        slower = max(1.0, self._recent / self.seconds_per_image)
        later = self.epochs - self.epochs_done - 1
        each = self.floor * self.seconds_per_image + self.seconds_per_eval
        needed = slower * (self.seconds_per_eval + later * each)
        return now + needed > self.deadline - RESERVE_SECONDS

    def start(self, now: float) -> None:
        self.checked_at = now
        self._mark = (now, 0)

    def epoch_done(self, images: int, train_seconds: float, now: float) -> int:
        """Record an epoch that trained ``train_seconds`` on ``images`` and ended at ``now``;
        returns :meth:`images` for the epochs left (0 after the last)."""
        self.seconds_per_image = train_seconds / max(images, 1)
        self.seconds_per_eval = max(0.0, now - self.checked_at - train_seconds)
        self.start(now)
        self.epochs_done += 1
        return self.images(now) if self.epochs_done < self.epochs else 0
