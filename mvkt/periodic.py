"""When the loop's periodic actions happen, as a function of the step alone (big_vision's
``itstime``): every process computes the same points, so all of them log, evaluate, save
and check for a stop request at the same steps."""

from __future__ import annotations

import dataclasses


def itstime(done: int, every: int, *, total: int | None = None) -> bool:
    """True after ``done`` steps when ``done`` is a multiple of ``every`` (0: never), or the last step."""
    return (every > 0 and done % every == 0) or (total is not None and done == total)


@dataclasses.dataclass(frozen=True)
class Cadence:
    """The loop's schedule: log every ``log_every`` steps, at epoch ends and at a planned stop;
    evaluate every ``eval_every_epochs`` epochs and at the end; checkpoint every
    ``checkpoint_every_epochs`` epochs, at stops and at the end (``best/`` at every improving
    validation); look for stop requests (SIGTERM on any process) at log points."""

    steps_per_epoch: int
    total_steps: int
    log_every: int
    eval_every_epochs: int
    stop_at: int | None = None  # config.train.stop_at_step: a planned interruption
    checkpoint_every_epochs: int = 1

    def epoch_end(self, done: int) -> bool:
        return itstime(done, self.steps_per_epoch)

    def planned_stop(self, done: int) -> bool:
        return self.stop_at is not None and done >= self.stop_at

    def log_point(self, done: int) -> bool:
        return itstime(done, self.log_every) or self.epoch_end(done) or self.planned_stop(done)

    def eval_point(self, done: int) -> bool:
        return self.epoch_end(done) and (
            itstime(done // self.steps_per_epoch, self.eval_every_epochs) or done == self.total_steps)

    def next_point(self, done: int) -> int:
        """The first step after ``done`` that is a log point (the end, at the latest)."""
        points = [self.total_steps] + [(done // every + 1) * every
                                       for every in (self.log_every, self.steps_per_epoch) if every > 0]
        if self.stop_at is not None and self.stop_at > done:
            points.append(self.stop_at)
        return min(points)

    def checkpoint_point(self, done: int) -> bool:
        """An epoch end where ``checkpoints/`` gets one (the best checkpoint is kept whenever
        validation improves, and stops and the end always save)."""
        return self.epoch_end(done) and itstime(done // self.steps_per_epoch, self.checkpoint_every_epochs)

    def epoch(self, done: int) -> float:
        return done / self.steps_per_epoch
