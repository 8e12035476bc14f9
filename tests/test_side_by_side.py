"""benchmarks.side_by_side: the ABBA order of ours and the reference, the per-round ratios against
the reference's best setting, and the checks made before any long run (the timings themselves are
benchmarks, not tests); and how benchmarks.run dispatches the training steps it times."""

import statistics

import pytest

from benchmarks import side_by_side as sbs
from helpers import FakeArray


def test_rounds_alternate_which_side_goes_first():
    calls = []
    settings = {"train_small": [sbs.EAGER, sbs.COMPILED], "train_medium": [sbs.EAGER]}
    records = sbs.measure(settings, 2, lambda q: calls.append((q, "ours")) or 1.0,
                          lambda q, s: calls.append((q, s)) or 1.0)
    assert calls == [
        ("train_small", "ours"), ("train_small", sbs.EAGER), ("train_small", sbs.COMPILED),
        ("train_medium", "ours"), ("train_medium", sbs.EAGER),
        ("train_small", sbs.EAGER), ("train_small", sbs.COMPILED), ("train_small", "ours"),
        ("train_medium", sbs.EAGER), ("train_medium", "ours"),
    ]
    assert [(r["round"], r["quantity"], r["side"]) for r in records] == [(0 if i < 5 else 1, q, s)
                                                                         for i, (q, s) in enumerate(calls)]


def test_ratios_are_per_round_against_that_rounds_best_setting():
    values = {  # round -> side -> images/s
        0: {"ours": 300.0, sbs.EAGER: 100.0, sbs.COMPILED: 150.0},
        1: {"ours": 200.0, sbs.EAGER: 100.0, sbs.COMPILED: 50.0},
        2: {"ours": 240.0, sbs.EAGER: 80.0, sbs.COMPILED: 120.0},
    }
    records = [{"round": r, "quantity": "sample_small", "side": s, "value": v}
               for r, sides in values.items() for s, v in sides.items()]
    (row,) = sbs.summarise(records)
    assert row["rounds"] == 3
    assert row["median ours"] == 240.0 and row[f"median {sbs.EAGER}"] == 100.0
    # best per round: 150, 100, 120 -> ratios 2.0, 2.0, 2.0; against eager: 3.0, 2.0, 3.0
    assert row["ratio vs best"] == pytest.approx(2.0) and row["ratio vs best range"] == pytest.approx((2.0, 2.0))
    assert row[f"ratio vs {sbs.EAGER}"] == pytest.approx(3.0)
    assert row[f"ratio vs {sbs.EAGER} range"] == pytest.approx((2.0, 3.0))


def test_abba_order_cancels_a_steady_drift():
    """The machine slows by a fraction a per measurement, ours is truly 2x the reference. A fixed
    order (ours always first) is biased by ~+a in every round; with the ABBA order the even and odd
    rounds are biased by ~+a and ~-a, and the median of the per-round ratios keeps only the
    second-order term, |error| <= 2 * (2a)^2 here (speeds relative to round 0 stay within 2a of
    each other inside a round)."""
    a = 0.02
    clock = {"k": 0}

    def speed(base):
        clock["k"] += 1
        return base * (1 - a * clock["k"])

    records = sbs.measure({"train_small": [sbs.EAGER]}, 4, lambda q: speed(2.0), lambda q, s: speed(1.0))
    (row,) = sbs.summarise(records)
    assert abs(row["ratio vs best"] - 2.0) <= 2 * (2 * a) ** 2
    fixed = [2.0 * (1 - a * (2 * r + 1)) / (1 - a * (2 * r + 2)) for r in range(4)]  # ours always first
    assert statistics.median(fixed) - 2.0 > 2 * a * 0.9  # what the ABBA order removes


def test_reference_json_lines_are_read_among_other_output():
    text = 'warning: something\n{"bench": "train_step", "images_per_s": 2500.0}\n{not json\n'
    assert sbs._json_lines(text) == [{"bench": "train_step", "images_per_s": 2500.0}]


def test_a_missing_reference_is_reported_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sbs.main(["--torch_python", "python3", "--bench_dir", str(tmp_path / "nowhere")])
    assert e.value.code == 2
    assert "no bench_torch_seed.py in --bench_dir" in capsys.readouterr().err


def test_benchmarks_run_refuses_to_skip_everything(capsys):
    from benchmarks import run

    with pytest.raises(SystemExit) as e:
        run.main(["--skip_sampling", "--skip_training"])
    assert e.value.code == 2
    assert "leave nothing to measure" in capsys.readouterr().err


def test_benchmark_stepper_queues_each_step_before_waiting_for_the_one_before():
    """benchmarks.run times training steps as the training loop dispatches them: step i is
    queued, then step i − 1 waited for; ``finish`` waits for the last. Checked with fakes that log
    every dispatch and wait."""
    from benchmarks.run import _stepper

    log = []

    def compiled(state, schedule, x):
        log.append(("run", state))
        return state + 1, {"loss": FakeArray(("wait", state), log)}

    step, finish, counts = _stepper(compiled, 0, None, None)
    for _ in range(3):
        step()
    assert log == [("run", 0), ("run", 1), ("wait", 0), ("run", 2), ("wait", 1)]
    finish()
    finish()  # nothing left to wait for
    assert log[5:] == [("wait", 2)] and counts[0] == 3
