"""The ``self`` backend: on-policy transcripts written by the model itself.

Published work finds that training on synthetic errors unlike the model's own teaches
little, so the distraction here is what the model writes when *steered* toward the
subject with the steering core (the same kind of text it produces when steered at
evaluation time), cut at a sentence boundary after 1-5 sentences so the restart comes at
different depths. The answer is the model's own unsteered answer to the prompt.

Given a PEFT model (``esr generate --data.adapter``), the adapter writes both: its own steered
drifts, the failures it still makes, become the next round's lesson. Concept directions
are always built on the base weights (adapters off), the same vectors as the first round.

Each stage sends all its pending prompts through one refilling decode loop
(``iter_generate``), and every generated text is stored in a JSONL cache the moment its
row finishes, so a killed run loses only the rows that were still in the batch. Every
sampled row draws from its own seed, fixed by its cache key (``seed_from``), so the rows a
resumed run writes are the rows the uninterrupted run would have written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from esr_train.text import complete_part, first_sentences
from esr_train.records import JsonlStore


@dataclass(frozen=True)
class SelfConfig:
    layer: int | None = None
    strength: float = 0.5
    schedule: str = "all"
    distraction_tokens: int = 96
    answer_tokens: int = 200
    temperature: float = 0.8
    repetition_penalty: float = 1.1
    answer_repetition_penalty: float = 1.1
    answer_temperature: float | None = None
    """None: greedy answers. A temperature samples them instead: at 1.0 with no repetition
    penalty the answers are draws from the model's own distribution, whose expected
    log-likelihood gradient is zero, so training on them does not sharpen the model the way
    its greedy (modal) answers do."""
    batch_size: int = 16
    probe_temperature: float = 0.6
    """Sampling temperature of the restart probes (the evaluation's unsteered trials)."""


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:20]


class SelfBackend:
    """Holds the model and the caches for one generation run."""

    def __init__(self, model, tokenizer, model_label: str, cfg: SelfConfig, work_dir: Path,
                 answerer: tuple | None = None) -> None:
        """``answerer`` = (model, tokenizer, label) writes the answers instead of the writer
        (``esr generate --answer_model``); the drifts and restart probes stay the writer's."""
        from esr_train.zoo import steer_layer

        self.model, self.tok, self.label, self.cfg = model, tokenizer, model_label, cfg
        self.answerer = answerer or (model, tokenizer, model_label)
        self.layer = steer_layer(model_label, model, cfg.layer)
        self.work = Path(work_dir)
        self.answers = JsonlStore(self.work / "answers.jsonl")
        self.distractions = JsonlStore(self.work / "distractions.jsonl")
        self.probes = JsonlStore(self.work / "probes.jsonl")
        self._directions: dict = {}  # subject -> direction, loaded or built once per run

    def answer(self, prompts: Sequence[str]) -> dict[str, str]:
        """The answerer's (by default the writer's own) unsteered answer to each prompt
        (greedy, or sampled at ``answer_temperature``), cut to complete sentences; cached
        under the answerer's label."""
        from esr_train.generation import iter_generate, seed_from

        model, tok, label = self.answerer
        temperature = self.cfg.answer_temperature
        sampled = () if temperature is None else (temperature,)  # greedy keys stay as they were

        def key(p):
            return _key(label, p, self.cfg.answer_tokens, self.cfg.answer_repetition_penalty, *sampled)

        todo = [p for p in dict.fromkeys(prompts) if key(p) not in self.answers]
        for i, out in iter_generate(model, tok, todo, max_new_tokens=self.cfg.answer_tokens,
                                    repetition_penalty=self.cfg.answer_repetition_penalty,
                                    batch_size=self.cfg.batch_size, do_sample=temperature is not None,
                                    temperature=temperature or 1.0, seeds=[seed_from(key(p)) for p in todo],
                                    progress="answers" if todo else False):
            self.answers.put(key(todo[i]), complete_part(out))
        return {p: self.answers[key(p)] for p in prompts}

    def probe(self, prompts: Sequence[str], samples: int) -> dict[str, list[str]]:
        """``samples`` sampled unsteered answers per prompt, as the evaluation's unsteered
        trials draw them (``probe_temperature``, ``distraction_tokens`` long, the
        distractions' repetition penalty): where the writer restarts when nothing pushed it
        (``esr_train.negatives``)."""
        from esr_train.generation import iter_generate, seed_from

        cfg = self.cfg

        def key(job):
            return _key(self.label, job[0], job[1], cfg.distraction_tokens, cfg.probe_temperature,
                        cfg.repetition_penalty, "probe")

        jobs = [(p, s) for p in dict.fromkeys(prompts) for s in range(samples)]
        todo = [j for j in jobs if key(j) not in self.probes]
        for i, out in iter_generate(self.model, self.tok, [p for p, _ in todo], do_sample=True,
                                    temperature=cfg.probe_temperature, max_new_tokens=cfg.distraction_tokens,
                                    repetition_penalty=cfg.repetition_penalty, batch_size=cfg.batch_size,
                                    seeds=[seed_from(key(j)) for j in todo],
                                    progress="restart probes" if todo else False):
            self.probes.put(key(todo[i]), out)
        return {p: [self.probes[key((p, s))] for s in range(samples)] for p in dict.fromkeys(prompts)}

    def directions(self, subjects: Sequence[str]) -> dict:
        """Each subject's concept direction, built once (all missing ones in shared
        batches), saved beside the caches and kept in memory, so the builder's directions
        stage and the distraction stage do not both read them from disk."""
        from esr_train.concepts import saved_concept_directions
        from esr_train.zoo import adapters_off

        missing = [s for s in dict.fromkeys(subjects) if s not in self._directions]
        if missing:
            with adapters_off(self.model):
                self._directions.update(zip(missing, saved_concept_directions(
                    self.model, self.tok, missing, self.layer, self.work / "directions",
                    batch_size=self.cfg.batch_size)))
        return {s: self._directions[s] for s in dict.fromkeys(subjects)}

    def distract(self, jobs: Sequence[dict]) -> dict[str, str]:
        """Steered openings for jobs {"id", "prompt", "subject", "sentences", "seed"};
        returns job id -> distraction cut to the job's number of sentences ('' if the
        text had no complete sentence)."""
        from esr_train.generation import iter_generate, seed_from

        cfg = self.cfg

        def key(job):
            return _key(self.label, job["prompt"], job["subject"], job["seed"], self.layer, cfg.strength,
                        cfg.schedule, cfg.distraction_tokens, cfg.temperature)

        todo = [j for j in jobs if key(j) not in self.distractions]
        directions = self.directions([j["subject"] for j in todo])
        for i, out in iter_generate(self.model, self.tok, [j["prompt"] for j in todo], do_sample=True,
                                    temperature=cfg.temperature, max_new_tokens=cfg.distraction_tokens,
                                    repetition_penalty=cfg.repetition_penalty, batch_size=cfg.batch_size,
                                    seeds=[seed_from(key(j)) for j in todo],
                                    row_steering=[directions[j["subject"]] for j in todo], strength=cfg.strength,
                                    schedule=cfg.schedule, progress="distractions" if todo else False):
            self.distractions.put(key(todo[i]), out)
        return {j["id"]: first_sentences(self.distractions[key(j)], j["sentences"]) for j in jobs}
