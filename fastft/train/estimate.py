"""How long `--strategy auto` will take, said before the work starts and again as each phase ends (issue 41: the
user was told a trial would cost "about 0.8 of this run's training", then waited 3.7x a probe's time).

The whole command is the backbone choice (when it lists several), the trial (its probe; then, where fine-tuning can
still be chosen over that probe, its fine-tuning epochs and the WiSE-FT mixes scored on its held-out fifth) and the
run (the probe, or lp-ft again on every training image). The least it can take is the trial stopping after its probe,
the most is fine-tuning chosen: that range is said, each phase with it. Each is counted in images passed, at speeds
timed here on one small batch: a frozen backbone's pass over an image and its mirror image, and a training and a
validation step in the run's precision (`measure`). A phase that has ended is replaced by its measured seconds, and
the speeds by the ones its epochs showed, so the later figures are the better ones.
"""
from __future__ import annotations

import copy
import time
from typing import NamedTuple

import torch

MIXES_SCORED = 11  # the trial's WiSE-FT mixes, each scored on the held-out images (WEIGHTS in wise.py: 0, 0.1 ... 1)
SET_UP_SECONDS = 5.0  # a run's set-up and end: its network built, weights read; its report, figures, model written


class Speeds(NamedTuple):
    """Seconds per image on this machine, for the backbone timed (others scale by their parameters)."""
    features: float  # a frozen backbone's pass: decoding, the image and its mirror image forward, in eval mode
    training: float  # a training step in the run's precision: decoding and augmentation, forward and backward
    scoring: float  # a validation step in the run's precision: decoding, one forward in eval mode


class Counts(NamedTuple):
    """What the command will pass over, known before any image is read (the split's files)."""
    train: int  # the run's training images
    trial_train: int  # the trial's: the training images less its held-out fifth
    held_out: int
    test: int
    epochs: int
    candidates: tuple = ()  # each backbone the choice scores: its pass's cost against the first one's (timed)


class Phases(NamedTuple):
    backbone: float
    trial_probe: float  # the trial's set-up and probe epoch: all of the trial where its probe is out of reach
    trial_fine_tuning: float  # its fine-tuning epochs and the WiSE-FT mixes, where fine-tuning can still be chosen
    run_probe: float  # the run, where the probe wins
    run_fine_tuned: float  # where fine-tuning does

    def outcomes(self) -> dict[str, float]:
        """Seconds of the whole command by how the choice goes: the trial stops after its probe epoch
        (tie.probe_out_of_reach), it fine-tunes and the probe still wins, or fine-tuning wins."""
        before = self.backbone + self.trial_probe
        return {"probe_out_of_reach": before + self.run_probe,
                "probe_after_fine_tuning": before + self.trial_fine_tuning + self.run_probe,
                "fine_tuning": before + self.trial_fine_tuning + self.run_fine_tuned}

    def whole(self) -> tuple[float, float]:
        """(least, most) seconds of the whole command."""
        return min(self.outcomes().values()), max(self.outcomes().values())


def phases(counts: Counts, speeds: Speeds, features_cached: bool = False, trial_set_up: bool = True) -> Phases:
    """Seconds of each phase. `features_cached`: the trial's backbone has its features of the trial's training images
    stored already (a backbone choice computed them, or an earlier command). `trial_set_up`: the trial's set-up is
    still to come (False where the speeds were timed on the trial's own Learner: it has been spent, and counting it
    again overstated 12 s commands by 5 s)."""
    n, held, test = counts.trial_train, counts.held_out, counts.test
    backbone = sum(SET_UP_SECONDS + speeds.features * n * scale for scale in counts.candidates)
    trial_probe = ((SET_UP_SECONDS if trial_set_up else 0) + (0 if features_cached else speeds.features * n)
                   + speeds.scoring * held)
    trial_fine_tuning = ((counts.epochs - 1) * (speeds.training * n + speeds.scoring * held)
                         + MIXES_SCORED * speeds.scoring * held)
    # the run's features: the trial's images are stored, the held-out fifth is new (the label check passes over it
    # when the trial chose the backbone, the probe otherwise); the test split scored after each epoch and at the end
    run_probe = SET_UP_SECONDS + speeds.features * held + 2 * speeds.scoring * test
    run_fine_tuned = run_probe + (counts.epochs - 1) * (speeds.training * counts.train + speeds.scoring * test)
    return Phases(backbone, trial_probe, trial_fine_tuning, run_probe, run_fine_tuned)


def measure(learn, items: list, precision: str, clock=time.perf_counter) -> Speeds:
    """Speeds timed on one batch of `items` (at most 16) through the Learner's backbone: a pass as the probe makes
    it (in fp32), then a training step and a validation step on a copy of the network in the run's `precision`
    (resolved), as its epochs will take them: bf16 trained 1.7x faster than fp32 on a CPU with native bf16, and the
    estimate once timed fp32 for such runs. The Learner's own weights and random state are untouched. The first
    batch decodes cold, as the first pass over the images does."""
    from fastai.torch_core import no_random

    from fastft.train.devices import ChannelsLast, autocast_for
    from fastft.train.distributed import unwrapped
    from fastft.train.features import pooled_features

    batch = items[: min(len(items), 16)]
    network = copy.deepcopy(unwrapped(learn.model)).train()
    with no_random():  # the run's random numbers, after, as if nothing had been timed (a loader draws its seed)
        started = clock()
        pooled_features(learn, batch)
        features = (clock() - started) / len(batch)
        started = clock()
        # a copy of the training loader: its own shuffling is left as it was
        xb, yb = learn.dls.train.new(bs=len(batch)).one_batch()
        xb, yb = xb.as_subclass(torch.Tensor), yb.as_subclass(torch.Tensor)
        loading = (clock() - started) / len(xb)  # decoding and augmentation: in every step, training or not
        if any(isinstance(cb, ChannelsLast) for cb in learn.cbs):  # --channels-last: the layout its steps take
            xb = xb.contiguous(memory_format=torch.channels_last)
        started = clock()
        with autocast_for(precision, learn.dls.device.type):
            loss = learn.loss_func(network(xb).float(), yb)
        loss.backward()
        training = loading + (clock() - started) / len(xb)
        network.eval()
        started = clock()
        with torch.inference_mode(), autocast_for(precision, learn.dls.device.type):
            network(xb)
        scoring = loading + (clock() - started) / len(xb)
    return Speeds(features, training, scoring)


def duration(seconds: float) -> str:
    """'45 s', '3m10s', '1h05m'."""
    seconds = round(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def span(least: float, most: float) -> str:
    return duration(least) if abs(most - least) < 0.15 * most else f"{duration(least)} to {duration(most)}"


class Forecast:
    """The whole command's estimate: made when its speeds are first timed (`timed`), said again as the backbone
    choice and the trial end (`ended`), and its record for metrics.json (`record`). Rank 0's alone speaks."""

    def __init__(self, counts: Counts, clock=time.perf_counter):
        self.counts, self.clock, self.began = counts, clock, clock()
        self.phases: Phases | None = None
        self.speeds: Speeds | None = None
        self.said: dict = {}  # when -> [least, most] seconds of the whole command, as said then
        self.by_outcome: dict = {}  # up front: seconds of the whole command by how the choice goes

    def timed(self, speeds: Speeds, features_cached: bool = False, trial_set_up: bool = True) -> None:
        """The estimate, from `speeds` timed now, said: the work to come, and what it adds up to (`phases`)."""
        self.phases, self.speeds = phases(self.counts, speeds, features_cached, trial_set_up), speeds
        p, spent = self.phases, self.clock() - self.began
        least, most = (spent + s for s in p.whole())
        self.said["up_front"] = [round(least), round(most)]
        self.by_outcome = {outcome: round(spent + s) for outcome, s in p.outcomes().items()}
        choice = f"the backbone choice about {duration(p.backbone)}, " if self.counts.candidates else ""
        print(f"about {span(least, most)} in all, by this machine's speed on one batch: {choice}the trial's probe about "
              f"{duration(p.trial_probe)} and its fine-tuning about {duration(p.trial_fine_tuning)} (none where the "
              f"probe is out of reach), then the run about {duration(p.run_probe)} where the probe wins or "
              f"{duration(p.run_fine_tuned)} where fine-tuning does", flush=True)

    def ended(self, phase: str, fine_tuned: bool | None = None, epoch_seconds: float | None = None) -> None:
        """`phase` ("backbone" or "trial") has ended: the rest estimated again from the time spent so far; after the
        trial, from what it chose (`fine_tuned`) and how long its fine-tuning epochs took (`epoch_seconds`, each)."""
        if self.phases is None:
            return
        p, spent, c = self.phases, self.clock() - self.began, self.counts
        if phase == "backbone":
            least, most = (s - p.backbone for s in p.whole())
        else:
            if epoch_seconds is not None and c.epochs > 1:  # the run's epochs: the trial's, on all training images
                epoch = epoch_seconds * c.train / max(c.trial_train, 1) + self.speeds.scoring * c.test
                p = self.phases = p._replace(run_fine_tuned=p.run_probe + (c.epochs - 1) * epoch)
            least = most = p.run_fine_tuned if fine_tuned else p.run_probe
        self.said[f"after_{phase}"] = [round(spent + least), round(spent + most)]
        print(f"{duration(spent)} so far; about {span(spent + least, spent + most)} in all", flush=True)

    def record(self) -> dict:
        """metrics.json's `strategy_choice.trial.estimate`: the whole command's seconds as each line said them
        ([least, most]), up front by how the choice would go (`Phases.outcomes`), and the speeds they came from."""
        if self.phases is None:
            return dict(self.said)
        return {**self.said, "up_front_by_outcome": dict(self.by_outcome),
                "seconds_per_image": {k: round(v, 5) for k, v in self.speeds._asdict().items()}}
