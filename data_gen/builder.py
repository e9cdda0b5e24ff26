"""Building a transcript dataset: plan rows from a seed, run a backend, filter, dedupe,
split by prompt, and write a ``datasets`` DatasetDict (``save_to_disk``) plus JSONL and a
summary.

Splits are by prompt: train rows come from train prompts and train subjects, test rows
from test prompts and test subjects, so nothing in the test split is ever trained on.
The plan (which prompt meets which subject, how many sentences of drift, which restart
phrase) is drawn from ``seed`` alone, so the same arguments give a byte-identical dataset.
The run is complete only once ``summary.json`` is written (last, atomically).
"""

from __future__ import annotations

from esr_train.errors import EsrError
import json
import math
import random
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from statistics import mean

from esr_train.banks import format_restart, load_prompts, load_restart_phrases, load_subjects
from data_gen.filters import FilterConfig, answer_problems, distraction_problems
from esr_train.rows import COLUMNS, Transcript, TranscriptError, stable_fraction
from esr_train.cache import atomic_write_json, atomic_write_text, read_json

BACKENDS = ("self", "template", "llm")


class GenerateError(EsrError, ValueError):
    """Bad generation settings or inputs; the message is one line."""


@dataclass
class GenerateConfig:
    """Settings of ``esr generate`` (and the ``data`` section of a recipe)."""

    backend: str = field(default="self", metadata={"help": "self (on-policy, default) | template | llm"})
    model: str = field(default="smollm2-135m", metadata={"help": "model for the self backend"})
    n: int = field(default=300, metadata={"help": "number of rows, train + test"})
    mix: float = field(default=0.5, metadata={"help": "share of self-correction rows (the study swept 0.1-0.9)"})
    test_size: float = field(default=0.1, metadata={"help": "share of rows in the test split (test prompts and subjects)"})
    seed: int = field(default=0, metadata={"help": "seed of the whole plan"})
    prompts: str | None = field(default=None, metadata={"help": "prompt file (one per line or JSONL); default: bundled"})
    subjects: str | None = field(default=None, metadata={"help": "subject file (one per line or JSONL); default: bundled"})
    restart_phrases: str | None = field(default=None, metadata={"help": "restart phrase file; default: bundled"})
    template_file: str | None = field(default=None, metadata={"help": "JSONL of {prompt, answer, distraction?, subject?, restart?} for the template backend"})
    min_sentences: int = field(default=1, metadata={"help": "shortest distraction, in sentences"})
    max_sentences: int = field(default=5, metadata={"help": "longest distraction, in sentences"})
    layer: int | None = field(default=None, metadata={"help": "steering layer for the self backend (default: the model's)"})
    strength: float = field(default=0.5, metadata={"help": "steering strength for distractions, in reference-norm units"})
    schedule: str = field(default="all", metadata={"help": "steering schedule while writing distractions"})
    distraction_tokens: int = field(default=96, metadata={"help": "tokens generated per distraction before cutting"})
    answer_tokens: int = field(default=200, metadata={"help": "max tokens of an answer"})
    answer_repetition_penalty: float = field(default=1.1, metadata={"help": "repetition penalty of the greedy answers (a base model such as Gemma 3 270M loops below ~1.3)"})
    answer_temperature: float | None = field(default=None, metadata={
        "help": "sample the self backend's answers at this temperature (default: greedy); 1.0 with "
                "answer_repetition_penalty 1.0 draws from the model's own distribution"})
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature of distractions"})
    batch_size: int = field(default=16, metadata={"help": "generation batch size"})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})
    base_url: str | None = field(default=None, metadata={"help": "llm backend: OpenAI-compatible base URL"})
    llm_model: str | None = field(default=None, metadata={"help": "llm backend: model name at the endpoint"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "llm backend: env var holding the key"})
    concurrency: int = field(default=4, metadata={"help": "llm backend: requests in flight"})
    requests_per_minute: float | None = field(default=None, metadata={"help": "llm backend: rate limit"})
    overgenerate: float = field(default=1.6, metadata={
        "help": "self backend: jobs planned per needed row, the most it may run; it runs them in waves, only as many "
                "as the filters need"})
    adapter: str | None = field(default=None, metadata={
        "help": "self backend: a LoRA adapter (esr train's output) that writes the distractions and answers: an "
                "on-policy second round, the drifts the adapter still makes as its next lesson"})
    answer_model: str | None = field(default=None, metadata={
        "help": "self backend: a model (zoo name, hub id or local dir) that writes the answers while the writer "
                "still writes its own steered drifts: for a writer whose own answers are poor (Gemma 3 270M is a base "
                "model that mostly continues a list of questions)"})
    restart_probes: int = field(default=0, metadata={
        "help": "self backend: unsteered answers sampled per training prompt to find where the writer restarts "
                "unpushed; those restarts go to false_restarts.jsonl as negatives for train.unlikelihood_weight"})

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise GenerateError(f"unknown backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        if not 0.0 <= self.mix <= 1.0:
            raise GenerateError(f"mix must be within 0..1, got {self.mix}")
        if not 0.0 <= self.test_size < 1.0:
            raise GenerateError(f"test_size must be within 0..1, got {self.test_size}")
        if self.n < 1:
            raise GenerateError(f"n must be at least 1, got {self.n}")
        if not 1 <= self.min_sentences <= self.max_sentences:
            raise GenerateError("need 1 <= min_sentences <= max_sentences")
        if self.backend == "template" and not self.template_file:
            raise GenerateError("the template backend needs template_file (a JSONL of prompt/answer/distraction rows)")
        if self.backend == "llm" and not (self.base_url and self.llm_model):
            raise GenerateError("the llm backend needs base_url and llm_model")
        if self.restart_probes < 0 or (self.restart_probes and self.backend != "self"):
            raise GenerateError(f"restart_probes must be >= 0 and needs the self backend, got {self.restart_probes} "
                                f"with {self.backend!r}")
        if self.answer_model is not None and self.backend != "self":
            raise GenerateError(f"answer_model is for the self backend, not {self.backend!r}")
        if self.adapter is not None:
            if self.backend != "self":
                raise GenerateError(f"adapter is for the self backend, not {self.backend!r}")
            from esr_train.preflight import InputError, check_adapter_dir

            try:
                check_adapter_dir(self.adapter, "data.adapter")
            except InputError as exc:
                raise GenerateError(str(exc)) from None

    def fingerprint(self) -> dict:
        """Every setting, except those added after datasets were first written while they
        are at their defaults (so those datasets stay complete for a resume)."""
        return {k: v for k, v in asdict(self).items() if not (k in _LATER_DEFAULTS and v == _LATER_DEFAULTS[k])}


_LATER_DEFAULTS = {"restart_probes": 0, "answer_model": None}


def config_fields() -> list:
    return list(fields(GenerateConfig))


def _split_counts(cfg: GenerateConfig) -> dict[str, dict[str, int]]:
    n_test = round(cfg.n * cfg.test_size)
    out = {}
    for split, total in (("train", cfg.n - n_test), ("test", n_test)):
        sc = round(total * cfg.mix)
        out[split] = {"self_correction": sc, "normal": total - sc}
    return out


def _bank_split(rows: list[dict], split: str, test_size: float, key: str) -> list[dict]:
    """Rows of one split; rows without a split field (user files) are assigned by a
    stable hash of their text."""
    out = []
    for r in rows:
        s = r.get("split")
        if s is None:
            s = "test" if stable_fraction(r[key]) < max(test_size, 0.2) else "train"
        if s == split:
            out.append(r)
    return out


def plan_jobs(cfg: GenerateConfig, split: str, prompts: list[dict], subjects: list[dict], phrases: list[dict],
              n_sc: int, n_normal: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Seeded self-correction and normal jobs. For the self backend both are over-planned
    (``overgenerate`` per row) as a reserve for the filters; it runs a prefix of each
    list, as long as the filters make it (``_run_self``)."""
    if n_sc and not subjects:
        raise GenerateError(f"no subjects in the {split} split; need at least one")
    if (n_sc or n_normal) and not prompts:
        raise GenerateError(f"no prompts in the {split} split; need at least one")
    factor = cfg.overgenerate if cfg.backend == "self" else 1.0  # the self backend runs only what it needs
    planned = max(n_sc, int(round(n_sc * factor)))
    sc_jobs = []
    for i in range(planned):
        p, s, ph = rng.choice(prompts), rng.choice(subjects), rng.choice(phrases)
        sc_jobs.append({"id": f"{split}-sc-{i}", "split": split, "prompt": p["prompt"], "subject": s["subject"],
                        "subject_row": s, "sentences": rng.randint(cfg.min_sentences, cfg.max_sentences),
                        "restart": format_restart(ph, s["subject"]), "seed": cfg.seed * 100003 + i})
    order = list(prompts)
    rng.shuffle(order)
    normal_jobs = [{"id": f"{split}-n-{i}", "split": split, "prompt": order[i % len(order)]["prompt"],
                    "seed": cfg.seed} for i in range(max(n_normal, int(round(n_normal * factor))))]
    return sc_jobs, normal_jobs


def build_dataset(cfg: GenerateConfig, out_dir: str | Path, backend_impl=None) -> dict:
    """Generate, filter, write. Returns the summary. ``backend_impl`` lets a caller pass
    a ready backend (e.g. a loaded model) instead of building one here."""
    out = Path(out_dir)
    done = read_json(out / "summary.json")
    if done and done.get("config") == cfg.fingerprint():
        return done
    t0 = time.perf_counter()
    rng = random.Random(cfg.seed)
    all_prompts = load_prompts(None, cfg.prompts)
    all_subjects = load_subjects(None, cfg.subjects)
    phrases = load_restart_phrases(cfg.restart_phrases)
    rejected: Counter = Counter()
    rows: dict[str, list[Transcript]] = {}
    counts = _split_counts(cfg)
    stage_s: Counter = Counter()  # seconds per stage of the self backend (where the time goes)
    mined: dict | None = None  # the writer's own false restarts (restart_probes)

    if cfg.backend == "template":
        from data_gen.backends.template import read_template_rows

        items = read_template_rows(cfg.template_file, phrases, rng, cfg)
        for split in ("train", "test"):
            rows[split] = [t for s, t in items if s == split]
    else:
        plans = {}
        for split in ("train", "test"):
            plans[split] = plan_jobs(cfg, split, _bank_split(all_prompts, split, cfg.test_size, "prompt"),
                                     _bank_split(all_subjects, split, cfg.test_size, "subject"), phrases,
                                     counts[split]["self_correction"], counts[split]["normal"], rng)
        if cfg.backend == "self":
            backend_impl = self_backend(cfg, out, backend_impl, stage_s)
            rows = _run_self(plans, counts, rejected, backend_impl, stage_s)
            if cfg.restart_probes:
                train_prompts = [p["prompt"] for p in _bank_split(all_prompts, "train", cfg.test_size, "prompt")]
                mined = _probe_restarts(cfg, backend_impl, train_prompts, stage_s)
        else:
            rows = _run_llm(cfg, plans, counts, rejected)

    summary = _write(cfg, out, rows, rejected, time.perf_counter() - t0, stage_s, mined)
    return summary


@contextmanager
def _timed(stage_s: Counter, stage: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stage_s[stage] += time.perf_counter() - t0


def _self_model(cfg: GenerateConfig):
    """The writer of the self backend: the zoo model, or the model with ``cfg.adapter``
    active; the label keys the generation caches (an adapter's by its weights)."""
    from esr_train.zoo import load_model

    model, tok = load_model(cfg.model, dtype=cfg.dtype)
    if cfg.adapter is None:
        return model, tok, cfg.model
    from peft import PeftModel

    from esr_train.concepts import weights_fingerprint

    model = PeftModel.from_pretrained(model, cfg.adapter)
    model.eval()
    return model, tok, f"{cfg.model}+adapter:{weights_fingerprint(model)}"


def self_backend(cfg: GenerateConfig, out: Path, backend_impl, stage_s: Counter):
    """``backend_impl`` when given (benchmarks, tests), else the zoo model's backend."""
    from data_gen.backends.self_backend import SelfBackend, SelfConfig

    if backend_impl is not None:
        return backend_impl
    with _timed(stage_s, "load_model"):
        model, tok, label = _self_model(cfg)
        answerer = None
        if cfg.answer_model is not None:
            from esr_train.zoo import load_model

            answerer = (*load_model(cfg.answer_model, dtype=cfg.dtype), cfg.answer_model)
    return SelfBackend(model, tok, label, SelfConfig(
        layer=cfg.layer, strength=cfg.strength, schedule=cfg.schedule, distraction_tokens=cfg.distraction_tokens,
        answer_tokens=cfg.answer_tokens, answer_repetition_penalty=cfg.answer_repetition_penalty,
        answer_temperature=cfg.answer_temperature, temperature=cfg.temperature, batch_size=cfg.batch_size),
        out / ".work", answerer=answerer)


def _probe_restarts(cfg: GenerateConfig, backend_impl, prompts: list[str], stage_s: Counter) -> dict:
    """The writer's unpushed restarts on the training prompts (``esr_train.negatives``):
    {"rows": mined rows, "samples", "restarted", "no_opener"}."""
    from esr_train import negatives

    with _timed(stage_s, "restart_probes"):
        texts = backend_impl.probe(prompts, cfg.restart_probes)
    rows, bare = negatives.mine_each(texts, backend_impl.label, cfg.seed)
    return {"rows": rows, "samples": len(prompts) * cfg.restart_probes, "restarted": len(rows) + bare,
            "no_opener": bare}


FIRST_PASS_SHARE = 0.8
"""The share of a self backend's self-correction jobs expected to pass the filters before
any has been seen: the first wave runs ``need / FIRST_PASS_SHARE`` jobs. Set a little below
the share measured on SmolLM2-135M (see docs/performance.md)."""

TOP_UP_MARGIN = 2.0
"""A top-up wave runs this many times the jobs its measured pass share says it needs:
a small wave costs about as much per step as a smaller one (the weights are read either
way), so a generous one is cheap and a third wave is rare."""


def _run_self(plans, counts, rejected, backend_impl, stage_s: Counter) -> dict[str, list[Transcript]]:
    """Generate in waves until every split has its rows or its plan is spent.

    The plan is drawn in full (``overgenerate`` times the rows needed, so it is the same
    plan whatever happens), but jobs are run as a prefix of it: the first wave holds the
    normal jobs and the self-correction jobs the filters are expected to need; each later
    wave tops up what the filters rejected, sized by the pass share measured so far. A
    row is kept in plan order, so the dataset holds the first jobs of the plan that
    passed, as if every planned job had been generated. Each wave sends all its prompts
    (every split's) through one decode stream per stage."""
    fcfg = FilterConfig()
    answers: dict[str, str] = {}
    bad_answer: dict[str, str | None] = {}
    kept = {split: {"normal": [], "self_correction": []} for split in plans}
    taken = {split: {"normal": 0, "self_correction": 0} for split in plans}
    examined, passed = Counter(), Counter()  # per kind, over every split: the pass share so far
    while True:
        wave: dict[str, dict[str, list[dict]]] = {}
        for split, (sc_jobs, normal_jobs) in plans.items():
            for kind, jobs in (("normal", normal_jobs), ("self_correction", sc_jobs)):
                short = counts[split][kind] - len(kept[split][kind])
                if short <= 0 or taken[split][kind] >= len(jobs):
                    continue
                if not taken[split][kind]:  # first wave: all normal jobs, the expected share of the others
                    size = short if kind == "normal" else math.ceil(short / FIRST_PASS_SHARE)
                else:
                    share = passed[kind] / examined[kind] if examined[kind] else 0.5
                    size = math.ceil(TOP_UP_MARGIN * short / max(share, 0.1))
                start = taken[split][kind]
                taken[split][kind] = min(len(jobs), start + size)
                wave.setdefault(split, {})[kind] = jobs[start:taken[split][kind]]
        if not wave:
            break
        wave_jobs = [(split, kind, j) for split, kinds in wave.items() for kind, jobs in kinds.items() for j in jobs]
        new = sorted({j["prompt"] for _, _, j in wave_jobs} - answers.keys())
        if new:
            with _timed(stage_s, "answers"):
                answers.update(backend_impl.answer(new))
            with _timed(stage_s, "filters"):
                bad_answer.update(zip(new, answer_problems(new, [answers[p] for p in new], [""] * len(new), fcfg)))
        for split, kind, job in wave_jobs:
            if kind == "normal":
                examined[kind] += 1
                if bad_answer[job["prompt"]]:
                    rejected[f"answer:{bad_answer[job['prompt']]}"] += 1
                elif len(kept[split]["normal"]) < counts[split]["normal"]:
                    passed[kind] += 1
                    kept[split]["normal"].append(Transcript(job["prompt"], answers[job["prompt"]], "normal",
                                                            backend="self", model=backend_impl.label,
                                                            seed=job["seed"]))
        sc = [(split, j) for split, kind, j in wave_jobs if kind == "self_correction"]
        usable = [(split, j) for split, j in sc if not bad_answer[j["prompt"]]]
        rejected["answer_for_self_correction"] += len(sc) - len(usable)
        examined["self_correction"] += len(sc) - len(usable)
        if not usable:
            continue
        with _timed(stage_s, "directions"):  # built and held here; the distraction stage reuses them
            backend_impl.directions([j["subject"] for _, j in usable])
        with _timed(stage_s, "distractions"):
            texts = backend_impl.distract([j for _, j in usable])
        with _timed(stage_s, "filters"):
            problems = distraction_problems([j["prompt"] for _, j in usable], [texts[j["id"]] for _, j in usable],
                                            [j["subject_row"] for _, j in usable], fcfg)
        for (split, job), problem in zip(usable, problems):
            if len(kept[split]["self_correction"]) >= counts[split]["self_correction"]:
                continue  # this split is full: the job is surplus, neither kept nor rejected
            examined["self_correction"] += 1
            problem = "no_complete_sentence" if not texts[job["id"]] else problem
            if problem:
                rejected[problem] += 1
                continue
            passed["self_correction"] += 1
            kept[split]["self_correction"].append(Transcript(
                job["prompt"], answers[job["prompt"]], "self_correction", texts[job["id"]], job["restart"],
                job["subject"], "self", backend_impl.label, job["seed"]))
    return {split: k["normal"] + k["self_correction"] for split, k in kept.items()}


def _run_llm(cfg, plans, counts, rejected) -> dict[str, list[Transcript]]:
    from data_gen.backends.llm import generate_llm
    from esr_train.chat_client import ChatClient, ChatClientConfig

    client = ChatClient(ChatClientConfig(base_url=cfg.base_url, model=cfg.llm_model, api_key_env=cfg.api_key_env,
                                         concurrency=cfg.concurrency, requests_per_minute=cfg.requests_per_minute))
    rows: dict[str, list[Transcript]] = {}
    for split, (sc_jobs, normal_jobs) in plans.items():
        jobs = [{"prompt": j["prompt"], "subject": j["subject"], "kind": "self_correction",
                 "restart_hint": j["restart"], "seed": j["seed"], "id": j["id"]} for j in sc_jobs]
        jobs += [{"prompt": j["prompt"], "subject": "", "kind": "normal", "restart_hint": "", "seed": j["seed"],
                  "id": j["id"]} for j in normal_jobs]
        done: dict[str, Transcript] = {}
        failures = 0
        for job, transcript, error in generate_llm(jobs, client, cfg.llm_model):
            if transcript is None:
                rejected["llm_error"] += 1
                failures += 1
            else:
                done[job["id"]] = transcript
        if jobs and failures == len(jobs):
            raise GenerateError(f"the endpoint {cfg.base_url} failed on every request ({failures}); see the log")
        rows[split] = [done[j["id"]] for j in jobs if j["id"] in done]
    return rows


def _write(cfg: GenerateConfig, out: Path, rows: dict[str, list[Transcript]], rejected: Counter, elapsed: float,
           stage_s: Counter | None = None, mined: dict | None = None) -> dict:
    from datasets import Dataset, DatasetDict, Features, Value, List

    seen: set[str] = set()
    duplicates = 0
    splits: dict[str, list[dict]] = {}
    for split in ("train", "test"):
        clean = []
        for t in rows.get(split, []):
            try:
                row = t.to_row()
            except TranscriptError as exc:
                rejected[f"invalid:{exc}"] += 1
                continue
            if row["id"] in seen:
                duplicates += 1
                continue
            seen.add(row["id"])
            clean.append(row)
        splits[split] = clean
    features = Features({
        "id": Value("string"), "prompt": Value("string"), "distraction": Value("string"), "restart": Value("string"),
        "answer": Value("string"), "subject": Value("string"), "kind": Value("string"), "backend": Value("string"),
        "model": Value("string"), "seed": Value("int64"),
        "messages": List({"role": Value("string"), "content": Value("string")}),
    })
    ds = DatasetDict({s: Dataset.from_list(r, features=features) if r else Dataset.from_dict({c: [] for c in COLUMNS}, features=features)
                      for s, r in splits.items()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # the dataset is incomplete until the summary is back
    # one shard per split, even an empty one: an empty split saved with no shard cannot be loaded back
    ds.save_to_disk(str(out), num_shards={k: 1 for k in ds})
    jsonl = {f"{split}.jsonl": r for split, r in splits.items()}
    if mined is not None:
        from esr_train import negatives

        jsonl[negatives.FILE] = mined["rows"]
    for name, r in jsonl.items():
        atomic_write_text(out / name, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in r))
    summary = summarize(cfg, splits, rejected, duplicates, elapsed, stage_s)
    if mined is not None:
        summary["restart_probes"] = {k: len(v) if k == "rows" else v for k, v in mined.items()}
    from esr_train.dtype import resolve_dtype
    from esr_train.provenance import provenance

    summary["provenance"] = provenance(resolve_dtype(cfg.dtype) if cfg.backend == "self" else None)
    atomic_write_json(out / "summary.json", summary)
    return summary


def summarize(cfg: GenerateConfig, splits: dict[str, list[dict]], rejected: Counter, duplicates: int, elapsed: float,
              stage_s: Counter | None = None) -> dict:
    from esr_train.text import sentences, word_count

    allrows = [r for rs in splits.values() for r in rs]
    sc = [r for r in allrows if r["kind"] == "self_correction"]
    return {
        "config": cfg.fingerprint(),
        "rows": {s: dict(Counter(r["kind"] for r in rs)) for s, rs in splits.items()},
        "total": len(allrows),
        "per_subject": dict(sorted(Counter(r["subject"] for r in sc).items())),
        "rejected": dict(sorted(rejected.items())),
        "duplicates_removed": duplicates,
        "mean_words": {
            "distraction": round(mean(word_count(r["distraction"]) for r in sc), 1) if sc else None,
            "answer": round(mean(word_count(r["answer"]) for r in allrows), 1) if allrows else None,
        },
        "distraction_sentences": dict(sorted(Counter(len(sentences(r["distraction"])) for r in sc).items())),
        "elapsed_s": round(elapsed, 1),
        "transcripts_per_min": round(len(allrows) / elapsed * 60, 1) if elapsed > 0 else None,
        "stage_s": {k: round(v, 1) for k, v in (stage_s or {}).items()},
    }


def format_summary(summary: dict) -> str:
    """The printed table."""
    lines = [f"{'split':8s} {'self_correction':>16s} {'normal':>8s}"]
    for split, c in summary["rows"].items():
        lines.append(f"{split:8s} {c.get('self_correction', 0):>16d} {c.get('normal', 0):>8d}")
    lines.append(f"total {summary['total']} rows in {summary['elapsed_s']}s ({summary['transcripts_per_min']} per min); "
                 f"duplicates removed {summary['duplicates_removed']}")
    lines.append(f"mean words: distraction {summary['mean_words']['distraction']}, answer {summary['mean_words']['answer']}")
    if summary.get("stage_s"):
        lines.append("seconds by stage: " + ", ".join(f"{k} {v}" for k, v in summary["stage_s"].items()))
    if summary.get("restart_probes"):
        p = summary["restart_probes"]
        lines.append(f"restart probes: {p['restarted']} of {p['samples']} unsteered samples restarted; "
                     f"{p['rows']} false-restart negatives")
    if summary["rejected"]:
        lines.append("rejected: " + ", ".join(f"{k} {v}" for k, v in summary["rejected"].items()))
    if summary["per_subject"]:
        top = sorted(summary["per_subject"].items(), key=lambda kv: -kv[1])[:8]
        lines.append(f"subjects ({len(summary['per_subject'])}): " + ", ".join(f"{k} {v}" for k, v in top))
    return "\n".join(lines)
