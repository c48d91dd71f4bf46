"""Mask diversity by brute force, the Pareto front, and pattern selection."""

import itertools
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vnmsparse import VNMPattern, analytic_speedups, mask_diversity, pareto_patterns, select_pattern
from vnmsparse.select import ANALYTIC_SOURCE, SpeedTable


def choices_by_enumeration(V: int, M: int) -> int:
    """Count (kept-column set, per-row pairs) encodings by walking every V x M boolean block."""
    total = 0
    for bits in itertools.product((0, 1), repeat=V * M):
        rows = [bits[r * M : (r + 1) * M] for r in range(V)]
        if any(sum(row) != 2 for row in rows):
            continue
        used = {c for row in rows for c in range(M) if row[c]}
        # each 4-column set containing every used column is one distinct choice of the pruning step
        total += sum(1 for cols in itertools.combinations(range(M), 4) if used <= set(cols))
    return total


@pytest.mark.parametrize("V, M", [(1, 4), (1, 6), (2, 4), (2, 5), (2, 6), (3, 5)])
def test_diversity_counts_match_brute_force(V, M):
    count = choices_by_enumeration(V, M)
    assert count == math.comb(M, 4) * 6**V
    assert mask_diversity(VNMPattern(V=V, M=M)) == pytest.approx(math.log(count) / (V * M))


def test_diversity_orders_patterns_sensibly():
    assert mask_diversity("64:2:8") > mask_diversity("128:2:8") > mask_diversity("128:2:16")
    assert mask_diversity("1:2:4") == pytest.approx(math.log(6) / 4)  # plain 2:4


speed_tables = st.dictionaries(
    st.builds(VNMPattern, V=st.sampled_from([16, 32, 64, 128]), M=st.integers(4, 32)),
    st.floats(0.1, 10.0),
    min_size=1,
    max_size=30,
)


@given(table=speed_tables)
def test_pareto_front_is_exactly_the_undominated_set(table):
    point = {p: (table[p], mask_diversity(p)) for p in table}

    def dominates(q, p):
        return point[q][0] >= point[p][0] and point[q][1] >= point[p][1] and point[q] != point[p]

    front = pareto_patterns(table)
    undominated = [p for p in table if not any(dominates(q, p) for q in table)]
    assert all(p in undominated for p in front)
    assert {point[p] for p in front} == {point[p] for p in undominated}  # equal points: one representative
    speeds = [table[p] for p in front]
    assert speeds == sorted(speeds, reverse=True)


@given(table=speed_tables, target=st.floats(0.1, 10.0))
def test_selection_is_the_most_diverse_fast_enough_pattern(table, target):
    fast = [p for p in table if table[p] >= target]
    if not fast:
        with pytest.raises(ValueError, match="no pattern reaches"):
            select_pattern(target, table)
        return
    choice = select_pattern(target, table)
    assert table[choice] >= target
    assert mask_diversity(choice) == max(mask_diversity(p) for p in fast)
    assert choice in pareto_patterns(table)


def test_ties_on_speed_and_diversity_pick_the_same_pattern_as_the_front():
    # V:2:4 patterns all have log 6 / 4 per weight: equal speeds make an exact tie on both axes (found by hypothesis)
    table = {"16:2:4": 2.0, "128:2:4": 2.0, "64:2:8": 1.0}
    choice = select_pattern(1.5, table)
    assert choice == VNMPattern.parse("16:2:4") and choice in pareto_patterns(table)


def test_select_accepts_strings_and_uses_the_analytic_estimate_without_a_table():
    assert select_pattern(1.5, {"64:2:5": 1.6, "64:2:8": 2.2, "128:2:8": 2.4}) == VNMPattern.parse("64:2:5")
    estimate = analytic_speedups()
    assert select_pattern(2.0) == select_pattern(2.0, estimate)
    assert estimate[VNMPattern.parse("64:2:8")] == pytest.approx(2 / VNMPattern.parse("64:2:8").bytes_per_weight())


@pytest.mark.parametrize("target, table, match", [
    (0, {"64:2:8": 2.0}, "target_speedup"),
    (1.5, {}, "non-empty"),
    (1.5, {"64:2:8": -1.0}, "finite positive"),
    (1.5, {"64:3:8": 2.0}, "N must be 2"),
])
def test_bad_selection_input(target, table, match):
    with pytest.raises(ValueError, match=match):
        select_pattern(target, table)


def test_speed_table_file(tmp_path):
    path = tmp_path / "h100.json"
    path.write_text(json.dumps({"gpu": "NVIDIA H100", "speedups": {"64:2:8": 2.1, "64:2:5": 1.5}}))
    table = SpeedTable.load(path)
    assert table.source == "NVIDIA H100"
    assert table.speedups[VNMPattern.parse("64:2:8")] == 2.1
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SpeedTable.load(path)
    path.write_text(json.dumps({"gpu": "x"}))
    with pytest.raises(ValueError, match="'speedups'"):
        SpeedTable.load(path)
    assert SpeedTable.analytic().source == ANALYTIC_SOURCE


def plan_by_brute_force(layers, target, other_time):
    dense_total = other_time + sum(layer.dense_time for layer in layers)
    best = None
    for combo in itertools.product(*[list(layer.speedups) for layer in layers]):
        time = other_time + sum(layer.dense_time / layer.speedups[p] for layer, p in zip(layers, combo))
        value = sum(layer.weights * mask_diversity(p) for layer, p in zip(layers, combo))
        if dense_total / time >= target and (best is None or value > best[0]):
            best = (value, combo)
    return best


@given(
    speeds=st.lists(st.dictionaries(st.sampled_from(["64:2:5", "64:2:8", "128:2:8", "64:2:16", "32:2:6"]),
                                    st.floats(1.0, 4.0), min_size=1), min_size=1, max_size=4),
    sizes=st.lists(st.integers(1, 1000), min_size=4, max_size=4),
    target=st.floats(1.0, 3.0),
    other=st.floats(0.0, 0.5),
)
def test_layer_plan_meets_the_target_and_is_near_optimal(speeds, sizes, target, other):
    from vnmsparse.select import LayerCost, select_layer_patterns

    layers = [LayerCost(f"l{i}", sizes[i], 0.1 + sizes[i] / 100, s) for i, s in enumerate(speeds)]
    brute = plan_by_brute_force(layers, target, other)
    if brute is None:
        with pytest.raises(ValueError, match="no plan reaches|out of reach"):
            select_layer_patterns(layers, target, other_time=other)
        return
    resolution = 20000
    dense_total = other + sum(layer.dense_time for layer in layers)
    budget = dense_total / target - other
    # the DP rounds each layer's cost up by less than one step, so every plan with that much slack is open to it
    slack_target = dense_total / (other + budget * (1 - len(layers) / resolution))
    reachable = plan_by_brute_force(layers, slack_target, other)
    if reachable is None:
        return
    plan = select_layer_patterns(layers, target, other_time=other, resolution=resolution)
    assert plan.speedup >= target * (1 - 1e-9)
    assert reachable[0] - 1e-9 <= plan.log_diversity <= brute[0] + 1e-9


def test_layer_plan_bad_input():
    from vnmsparse.select import LayerCost, select_layer_patterns

    layer = LayerCost("a", 10, 1.0, {"64:2:8": 2.0})
    with pytest.raises(ValueError, match="non-empty"):
        select_layer_patterns([], 1.5)
    with pytest.raises(ValueError, match="out of reach"):
        select_layer_patterns([layer], 2.0, other_time=1.0)
    with pytest.raises(ValueError, match="no plan reaches"):
        select_layer_patterns([layer], 3.0)
    with pytest.raises(ValueError, match="dense_time"):
        select_layer_patterns([LayerCost("a", 10, 0.0, {"64:2:8": 2.0})], 1.5)
