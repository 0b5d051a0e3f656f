"""bench.py: training-step throughput of the DIH stages and the student methods, the project's fast path against a
conventional one.

    harness.py       the random models and images both paths start from, the fast path, timing, tables
    conventional.py  the conventional path, the foil
    measures.py      what is measured: each stage through both paths, methods, groups, growth, the ablation
    main.py          the command line (bench.py runs it)

sweep/cost.py prices a preset's graph with the steps timed here (--project).

Both paths train copies of the same randomly initialised models on the same random CIFAR-shaped uint8 images;
the arithmetic of a step does not depend on the weights, so random teacher and heads are enough for timing.
The fast path is the project's own code: a `DeviceDataset` with `data.train_batches`, the stages of
`stages.py`, and the engine's step (`engine.GroupStep` on a `Run`: the teacher's shared pass, then the train step)
with the `TrainConfig` the stage scripts would build for these flags (`--amp` and `--channels_last` force the
settings, e.g. to measure another CPU's defaults), the frozen teacher with its batch norms folded as the stage
scripts fold it.
The conventional path (conventional.py), the foil, is how most KD code trains: a torchvision DataLoader with
per-image PIL transforms, fp32, eager, NCHW, the frozen teacher and each head called as separate modules
under no_grad, the loss summed over the cohort in a Python loop, `loss.item()` every step.

Before timing, the two paths of each stage compute the loss of one un-augmented batch; they must agree
(fp32: to rounding, bf16: within its precision) or the script exits 1. Times are the median over repeats of
`--steps` steps each, after `--warmup` steps, with the device synchronised before the clock is read; the paths
compared (fast and conventional, or an ablation's two variants) take turns, repeat by repeat, so that a change
of load on a shared machine hits both alike.
A group's students must have the same losses as each alone (bit for bit on the CPU) or the script exits 1.
The last line printed is one JSON object for the DIH stage (or the last stage measured).
"""
