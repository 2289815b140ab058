"""python -m nas.search"""

import sys

from nas.interrupts import catch_stop_signals, exit_now_if_interrupted
from nas.search.runner import main

if __name__ == "__main__":
    catch_stop_signals()  # remembers the interrupt whatever Optuna makes of it
    status = main()
    exit_now_if_interrupted(status)
    sys.exit(status)
