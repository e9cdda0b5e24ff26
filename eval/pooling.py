"""Pool one condition over several training seeds (or runs) and show the spread between them.

One adapter is one draw of the training seed, and on a small model the seed alone can move
the ESR and false-restart rates as much as any lever tried (see docs/results.md). So a
lever is judged on a *group*: the same condition trained with
several seeds, each evaluated on the same trials. This module pools the trials of a
group (rates and Wilson intervals over all of them) and reports each member's rate and
the between-member standard deviation beside it: the pooled interval only counts trial
noise, the spread is what the seed adds.

    esr pool recipe=runs/a/eval:adapter,runs/b/eval:adapter names=runs/c/eval:adapter ...
"""

from __future__ import annotations

from esr_train.errors import EsrError
import json
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean, stdev
from typing import Any, Sequence

from eval.metrics import summarize_trials


class PoolError(EsrError, ValueError):
    """A group spec or a run it names is unusable (the message names which)."""


@dataclass(frozen=True)
class Member:
    run: Path
    condition: str

    @property
    def name(self) -> str:
        return f"{self.run}:{self.condition}"


def parse_group(spec: str) -> tuple[str, list[Member]]:
    """``NAME=RUN:COND[,RUN:COND...]`` -> (NAME, members)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise PoolError(f"group {spec!r}: expected NAME=RUN_DIR:CONDITION[,RUN_DIR:CONDITION...]")
    members = []
    for part in rest.split(","):
        run, cond = _split_member(part.strip())
        if not run or not cond:
            raise PoolError(f"group {name!r}: member {part!r} is not RUN_DIR:CONDITION")
        members.append(Member(Path(run), cond))
    return name.strip(), members


def _split_member(part: str) -> tuple[str, str]:
    """RUN_DIR:CONDITION where conditions hold colons themselves (``adapter:NAME``,
    ``base+metaprompt:notice``): the run is the shortest prefix that is a directory,
    else everything before the first colon."""
    cuts = [i for i, ch in enumerate(part) if ch == ":"]
    for i in cuts:
        if Path(part[:i]).is_dir():
            return part[:i], part[i + 1:]
    return (part[:cuts[0]], part[cuts[0] + 1:]) if cuts else ("", "")


def member_trials(member: Member) -> list[dict[str, Any]]:
    """The member's judged trials (steered and unsteered) from ``RUN/trials.jsonl``."""
    path = member.run / "trials.jsonl"
    if not path.is_file():
        raise PoolError(f"{path}: no such file (member {member.name})")
    trials, seen = [], set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise PoolError(f"{path}:{lineno}: not a JSON object") from None
        if not isinstance(obj, dict):
            raise PoolError(f"{path}:{lineno}: not a JSON object")
        seen.add(str(obj.get("condition")))
        if obj.get("condition") == member.condition:
            trials.append(obj)
    if not trials:
        raise PoolError(f"{path}: no trials of condition {member.condition!r}; it has {', '.join(sorted(seen)) or 'none'}")
    return trials


def _spread(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return stdev(vals) if len(vals) >= 2 else None


def pool_group(members: Sequence[Member]) -> dict[str, Any]:
    """Pooled steered/unsteered metrics of the members, each member's own, and the
    between-member mean and standard deviation of the headline rates."""
    per = []
    pooled_steered: list[dict] = []
    pooled_unsteered: list[dict] = []
    for m in members:
        trials = member_trials(m)
        steered = [t for t in trials if t.get("steered")]
        unsteered = [t for t in trials if not t.get("steered")]
        pooled_steered += steered
        pooled_unsteered += unsteered
        per.append({"member": m.name, "steered": summarize_trials(steered), "unsteered": summarize_trials(unsteered)})
    out: dict[str, Any] = {"members": per, "steered": summarize_trials(pooled_steered),
                           "unsteered": summarize_trials(pooled_unsteered), "between_members": {}}
    for side, key in (("steered", "multi_attempt_rate"), ("steered", "esr_rate"), ("steered", "mean_first_score"),
                      ("unsteered", "multi_attempt_rate"), ("unsteered", "mean_first_score")):
        values = [p[side][key] for p in per if p[side]["n"]]
        label = f"{side}_{key}"
        out["between_members"][label] = {"mean": fmean(values) if values else None, "sd": _spread(values),
                                          "values": values}
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _rate_cell(s: dict, key: str) -> str:
    if not s["n"]:
        return "-"
    lo, hi = s[key.replace("_rate", "_ci")]
    return f"{_pct(s[key])} [{_pct(lo)}, {_pct(hi)}]"


def format_pooled(groups: dict[str, dict[str, Any]]) -> str:
    """One table: a pooled row per group (rates with Wilson intervals over all its
    trials, and the between-member SD in points), then one row per member."""
    head = ("group / member", "n", "multi-attempt %", "ESR %", "first", "n unst.", "false restart %", "unst. score")
    rows = []
    for name, g in groups.items():
        s, u, b = g["steered"], g["unsteered"], g["between_members"]

        def sd(label: str, scale: float = 100.0) -> str:
            v = b[label]["sd"]
            return "" if v is None else f" sd {v * scale:.1f}"

        rows.append((f"{name} ({len(g['members'])} pooled)", str(s["n"]),
                     _rate_cell(s, "multi_attempt_rate") + sd("steered_multi_attempt_rate"),
                     _rate_cell(s, "esr_rate") + sd("steered_esr_rate"),
                     "-" if s["mean_first_score"] is None else f"{s['mean_first_score']:.1f}",
                     str(u["n"]), _rate_cell(u, "multi_attempt_rate") + sd("unsteered_multi_attempt_rate"),
                     "-" if u["mean_first_score"] is None else f"{u['mean_first_score']:.1f}"))
        for p in g["members"]:
            ps, pu = p["steered"], p["unsteered"]
            rows.append((f"  {p['member']}", str(ps["n"]), _pct(ps["multi_attempt_rate"]) if ps["n"] else "-",
                         _pct(ps["esr_rate"]) if ps["n"] else "-",
                         "-" if ps["mean_first_score"] is None else f"{ps['mean_first_score']:.1f}",
                         str(pu["n"]), _pct(pu["multi_attempt_rate"]) if pu["n"] else "-",
                         "-" if pu["mean_first_score"] is None else f"{pu['mean_first_score']:.1f}"))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pool(specs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{group name: pooled result} for ``NAME=RUN:COND,...`` specs (names must differ)."""
    groups: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, members = parse_group(spec)
        if name in groups:
            raise PoolError(f"group {name!r} given twice")
        groups[name] = pool_group(members)
    return groups
