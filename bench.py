"""Training-step throughput of the DIH stages and the student methods: the project's fast path against a
conventional one. The code is in benchmarks/ (its docstring says what is measured and how); this is its command.

    python3 bench.py --gpu_id 0                # teacher, heads and DIH stages: res110 -> res8, 100 classes, batch 64
    python3 bench.py --gpu_id cpu --quick      # the same with few steps: under 3 minutes on a 2-core CPU
    python3 bench.py --growth                  # + epoch time for teachers res20/56/110 at batch 64/128/256
    python3 bench.py --ablation                # + the fast path with one optimisation flipped at a time
    python3 bench.py --ablation fold channels_last   # + only those two flipped
    python3 bench.py --stages none --group kd at crd dih  # students of one teacher as a group, against each alone
    python3 bench.py --stages none --project   # reproduce.py --preset paper-cifar100's cost with and without groups
    python3 bench.py pipeline --images 1024 --workers 2   # image folders' streaming input against ImageFolder + PIL
"""

import sys

import cli
from benchmarks.main import main

if __name__ == "__main__":
    cli.main_guard(lambda argv: sys.exit(main(argv)))
