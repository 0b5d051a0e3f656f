"""sweep/cost.py prices the preset's own graph: every node `build_graph` makes, each run at its epochs."""

from __future__ import annotations

import pytest

from sweep.cost import group_key, node_seconds, owner, preset_sweep, step_key
from sweep.graph import build_graph
from utils import UserError


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


def test_the_cross_architecture_preset_is_priced_pair_by_pair():
    """repdistiller-cifar100-cross (RepDistiller's table 2), per seed: four teachers and their heads, CE once per
    student model (four), six students per pair (KD, FitNets, AT, CRD, DIH, DKD) over six pairs, 240 epochs each,
    FitNets 40 hint epochs more; grouped, each pair's six are one process. Naming res50 keeps its two pairs."""
    sweep = preset_sweep([], "repdistiller-cifar100-cross")
    separate, grouped = build_graph(sweep, group=False), build_graph(sweep, group=True)
    step_s = {step_key(expect): 1.0 for node in separate for expect in node.runs.values()}
    group_s = {group_key(node): 1.0 for node in grouped if len(node.runs) > 1}
    seeds, epochs = len(sweep.seeds), 240
    assert sum(node_seconds(node, step_s, group_s) for node in separate) == seeds * ((4 + 4 + 4 + 36) * epochs + 6 * 40)
    assert sum(node_seconds(node, step_s, group_s) for node in grouped) == seeds * ((4 + 4 + 4 + 6) * epochs + 6 * 40)
    assert preset_sweep(["res50"], "repdistiller-cifar100-cross").pairs == [("res50", "mobilenetv2"), ("res50", "vgg8")]
    with pytest.raises(UserError, match="res110 teaches no row"):
        preset_sweep(["res110"], "repdistiller-cifar100-cross")
