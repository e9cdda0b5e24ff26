"""Pooling one condition over several training seeds (eval/pooling.py, ``esr pool``)."""

from __future__ import annotations

import json

import pytest

from esr_train.cli import main
from eval.pooling import PoolError, parse_group, pool


def trial(cond, steered, scores):
    return {"condition": cond, "steered": steered, "attempts": [{"text": "x", "score": s} for s in scores]}


def write_run(path, trials):
    path.mkdir(parents=True)
    (path / "trials.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trials))
    return path


@pytest.fixture
def two_seeds(tmp_path):
    # seed 0: 2 of 4 steered restart (one improves); 0 of 2 unsteered. seed 1: 0 of 4; 1 of 2 unsteered.
    a = write_run(tmp_path / "s0", [trial("adapter", True, [10, 80]), trial("adapter", True, [50, 20]),
                                    trial("adapter", True, [90]), trial("adapter", True, [40]),
                                    trial("adapter", False, [85]), trial("adapter", False, [88]),
                                    trial("base", True, [5]), trial("adapter:seed0", True, [20, 60])])
    b = write_run(tmp_path / "s1", [trial("adapter", True, [30])] * 4 +
                  [trial("adapter", False, [70, 90]), trial("adapter", False, [80])])
    return a, b


def test_pool_counts_every_trial_and_reports_the_spread_between_seeds(two_seeds):
    a, b = two_seeds
    g = pool([f"recipe={a}:adapter,{b}:adapter"])["recipe"]
    assert g["steered"]["n"] == 8 and g["steered"]["n_multi_attempt"] == 2 and g["steered"]["n_esr"] == 1
    assert g["unsteered"]["n"] == 4 and g["unsteered"]["n_multi_attempt"] == 1
    spread = g["between_members"]["steered_multi_attempt_rate"]
    assert spread["values"] == [0.5, 0.0] and spread["sd"] == pytest.approx(0.3536, abs=1e-4)
    assert g["between_members"]["steered_esr_rate"]["mean"] == pytest.approx(0.125)
    assert [m["steered"]["n"] for m in g["members"]] == [4, 4]  # the base condition of s0 is not pooled


def test_esr_pool_prints_the_table_and_writes_json(two_seeds, tmp_path, capsys):
    a, b = two_seeds
    out = tmp_path / "pooled.json"
    assert main(["pool", f"recipe={a}:adapter,{b}:adapter", f"base={a}:base", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recipe (2 pooled)" in printed and "25.0 [" in printed and "sd 35.4" in printed
    assert json.loads(out.read_text())["base"]["steered"]["n"] == 1
    # conditions named with a colon (adapter:NAME, base+metaprompt:ID) split after the run directory
    assert pool([f"s={a}:adapter:seed0"])["s"]["steered"]["n_esr"] == 1


def test_pool_errors_name_the_group_file_or_condition(two_seeds, tmp_path, capsys):
    a, _ = two_seeds
    with pytest.raises(PoolError, match="NAME=RUN_DIR:CONDITION"):
        parse_group("no-equals-sign")
    with pytest.raises(PoolError, match="'nocolon' is not RUN_DIR:CONDITION"):
        parse_group("g=nocolon")
    with pytest.raises(PoolError, match=r"no trials of condition 'ghost'; it has adapter, adapter:seed0, base"):
        pool([f"g={a}:ghost"])
    (a / "trials.jsonl").write_text('{"condition": "adapter", "steered": true, "attempts": []}\n{torn')
    assert main(["pool", f"g={a}:adapter"]) == 1
    assert "trials.jsonl:2: not a JSON object" in capsys.readouterr().err
