"""Run under torchrun by test_strategy_choice.py: the fastft command, on a machine that estimates the trial's probe
pass at nothing, so that a budget spent at once passes the check for the probe and stops the trial's epochs."""
from fastft.cli import main
from fastft.train import run

run.pass_seconds = lambda learn, items: 0.0

if __name__ == "__main__":
    main()
