"""The sweep behind reproduce.py: one paper table as a dependency graph of stage runs.

    grid.py    presets, the `Sweep` (what to run) and its flags
    graph.py   `Node`s (one stage run each: argv, folder, dependencies, expected summary) and their order
    local.py   runs the graph on this machine (--jobs, --gpus)
    slurm.py   submits the graph to Slurm (--slurm)
    report.py  results.md, results.csv and the plots, from whatever runs have finished
    cost.py    what a preset's graph costs on this device, from steps bench.py times (bench.py --project)

Both runners see only `Node`s, so a new kind of stage run is a change to build_graph alone.
"""
