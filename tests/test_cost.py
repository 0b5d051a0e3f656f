"""sweep/cost.py prices the preset's own graph: every node `build_graph` makes, each run at its epochs."""

from __future__ import annotations

from sweep.cost import group_key, node_seconds, owner, preset_sweep, step_key
from sweep.graph import build_graph


def test_the_projection_prices_every_node_of_the_graph_at_its_epochs():
    """With every step costing 1 s, a graph costs its runs' epochs. Per seed of teacher res20 in paper-cifar100: the
    teacher, TOFD's teacher, the heads, TAKD's assistant (KD into res14) and nine students, 200 epochs each, FitNets
    40 hint epochs more; grouped, KD, FitNets, AT, CRD, MHKD and DIH train as one process (200 shared epochs, then
    FitNets' 40), the others (teachers, heads, assistant, CE, TAKD, TOFD) on their own."""
    sweep = preset_sweep(["res20"])
    separate, grouped = build_graph(sweep, group=False), build_graph(sweep, group=True)
    step_s = {step_key(expect): 1.0 for node in separate for expect in node.runs.values()}
    group_s = {group_key(node): 1.0 for node in grouped if len(node.runs) > 1}
    seeds = len(sweep.seeds)
    assert sum(node_seconds(node, step_s, group_s) for node in separate) == seeds * (13 * 200 + 40)
    assert sum(node_seconds(node, step_s, group_s) for node in grouped) == seeds * (7 * 200 + 200 + 40)
    assert {owner(node) for node in separate} == {"res20", ""}  # "": CE, one run per seed for every teacher's row
    assert [group_key(node) for node in grouped if len(node.runs) > 1] == [
        ("res20", "res8", "kd", "fitnets", "at", "crd", "mhkd", "dih")] * seeds
