"""Run under torchrun by test_strategy_choice.py: the fastft command, its --budget read on a clock that advances 10 s
a reading (conftest.TenSecondClock), so that where a trial stops does not depend on the machine's speed."""
from fastft.cli import main
from fastft.train import budget
from conftest import TenSecondClock

budget.now = TenSecondClock()

if __name__ == "__main__":
    main()
