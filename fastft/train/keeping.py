"""Which epoch a run keeps, and when it stops before its last: --keep (best by --monitor, or last), --patience, and
in a strategy trial --budget. Watched on the validation split, never on the test split unless the user insists (and
then the run says its test accuracy is optimistic)."""
from __future__ import annotations

MONITORED = {"accuracy": ("valid_acc", "test_acc", max), "valid_loss": ("valid_loss", "test_loss", min)}


class KeptEpoch:
    """The best epoch so far by `monitor` (and its weights, when `keep` is best), and whether to stop early: `patience`
    epochs without improvement, or a next epoch that would likely end past `budget`'s deadline. Its state goes into the
    checkpoint (`state` / `restore`)."""

    def __init__(self, keep: str, monitor: str, patience: int, budget, total_epochs: int, dist):
        self.keep, self.monitor, self.patience, self.budget = keep, monitor, patience, budget
        self.total_epochs, self.dist = total_epochs, dist
        self.best = None  # {"epoch", "value", "weights" (with --keep best)}

    def monitored(self, entry: dict) -> float:
        on_validation, on_test, _ = MONITORED[self.monitor]
        return entry[on_validation] if on_validation in entry else entry[on_test]

    def track(self, entry: dict, weights: dict) -> bool:
        """Whether the epoch of `entry` (its measured `weights`) is the best so far."""
        better = MONITORED[self.monitor][2]
        value = self.monitored(entry)
        if self.best is None or better(value, self.best["value"]) != self.best["value"]:
            self.best = {"epoch": entry["epoch"], "value": value, "weights": weights if self.keep == "best" else None}
            return True
        return False

    def kept_epoch(self, done: int) -> int:
        return self.best["epoch"] if self.keep == "best" else done

    def kept_weights(self, last: dict) -> dict:
        """The weights the run keeps (`last`: the last finished epoch's)."""
        return self.best["weights"] if self.keep == "best" else last

    def stop_reason(self, epochs: list[dict], probe_epoch: bool) -> str:
        """Why the run stops after these finished `epochs` before its last, or "" (every rank gets rank 0's budget
        verdict, so all stop together). `probe_epoch`: the last was a probe's, which passes forward only once."""
        done = len(epochs)
        if done >= self.total_epochs:
            return ""
        if self.budget is not None and self.dist.from_main(lambda: self.out_of_time(epochs[-1]["seconds"], probe_epoch)):
            return (f"--budget {self.budget.text}: the next epoch would likely end past it; the trial stops after "
                    f"epoch {done} of {self.total_epochs}, and the candidates are scored on its weights so far")
        if self.patience and done - self.best["epoch"] >= self.patience:
            return (f"stopping early: {self.monitor} has not improved for {self.patience} epoch(s) (best "
                    f"{self.best['value']:.4f} at epoch {self.best['epoch']}); skipping epochs "
                    f"{done + 1}-{self.total_epochs}")
        return ""

    def out_of_time(self, last_seconds: float, probe_epoch: bool) -> bool:
        """Whether the next epoch would likely end past the deadline."""
        # a probe epoch passes forward over the images once; a fine-tuning epoch also backward: about 3x as long
        return self.budget.would_pass(3 * last_seconds if probe_epoch else last_seconds)

    def state(self) -> dict | None:
        return dict(self.best) if self.best else None  # a copy: the next epoch replaces it while a checkpoint is written

    def restore(self, state: dict | None) -> None:
        self.best = state
