"""The ``esr`` command: thin subcommands over the packages.

Each subcommand has its own parser and a ``main(args)``; heavy imports happen inside the
subcommand, so ``esr --help`` is instant. Logic lives in the packages, never here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from esr_train import __version__


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the bundled models and prepare (dequantise and cache) them")
    p.add_argument("--prepare", action="store_true", help="dequantise and cache every bundled model now")
    p.add_argument("--cache-dir", default=None, help="cache root (default $ESR_CACHE_DIR or ~/.cache/esr-train)")
    p.set_defaults(func=_models)


def _models(args) -> int:
    import time

    from esr_train.zoo import is_prepared, list_models, model_cache_path, prepare_model

    for entry in list_models():
        if args.prepare:
            t0 = time.perf_counter()
            prepare_model(entry.name, args.cache_dir)
            took = f"ready in {time.perf_counter() - t0:.1f}s"
        else:
            took = "cached" if is_prepared(entry.name, args.cache_dir) else "not prepared yet"
        print(f"{entry.name:14s} {entry.description}")
        print(f"{'':14s} steer layer {entry.default_layer}; {took}; {model_cache_path(entry.name, args.cache_dir)}")
    if args.prepare:  # the CPU kernels are compiled once per machine too
        from esr_train.speed import PATHS, load_kernel

        for path in (p for p in PATHS.values() if p.compiled):
            t0 = time.perf_counter()
            built = load_kernel(path.name, args.cache_dir) is not None
            state = f"ready in {time.perf_counter() - t0:.1f}s" if built else f"not built or off, {path.fallback}"
            print(f"{path.name:17s} {path.what}: {state}")
    return 0


def _add_steer(sub) -> None:
    p = sub.add_parser("steer", help="answer a prompt unsteered and steered, side by side")
    p.add_argument("--model", default="smollm2-135m", help="bundled name, local directory or hub id")
    p.add_argument("--prompt", required=True, help="the user's question")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--concept", help="steer toward this concept (a concept vector the model builds itself)")
    src.add_argument("--vector", help="a direction file (.safetensors from esr, or .pt/.npy with --layer)")
    src.add_argument("--sae", help="a sae-lens SAE directory, or a release name with --sae-id")
    p.add_argument("--sae-id", help="SAE id within a sae-lens release")
    p.add_argument("--latent", type=int, help="SAE latent to steer with (with --sae)")
    p.add_argument("--layer", type=int, default=None, help="decoder layer (blocks.L.hook_resid_post); default: the model's")
    p.add_argument("--strength", type=float, default=0.5, help="push size in units of the layer's median residual norm")
    p.add_argument("--unit", choices=["norm", "raw"], default="norm", help="'raw' takes --strength as an absolute scale")
    p.add_argument("--schedule", default="all", help="all | generated | prompt+first:N")
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.6) instead of greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--save-direction", help="write the direction used to this .safetensors file")
    p.set_defaults(func=_steer)


def _steer(args) -> int:
    import textwrap

    from esr_train.concepts import concept_direction, with_reference_norm
    from esr_train.directions import load_vector_file
    from esr_train.generation import generate
    from esr_train.sae import load_sae, sae_direction
    from esr_train.steering import steer
    from esr_train.preflight import InputError, check_layer, check_vector_file, model_shape
    from esr_train.zoo import ZOO, load_model, steer_layer

    if args.sae and args.latent is None:
        raise InputError("--sae needs --latent (the SAE latent to steer with)")
    shape = model_shape(args.model)  # checked from the config before the weights load
    if shape is not None:
        check_layer(args.layer, shape[0])
        if args.vector:
            default = ZOO[args.model].default_layer if args.model in ZOO else shape[0] // 2
            check_vector_file(args.vector, args.layer if args.layer is not None else default, shape[1])
    model, tok = load_model(args.model, dtype=args.dtype)
    layer = steer_layer(args.model, model, args.layer)
    if args.concept:
        direction = concept_direction(model, tok, args.concept, layer)
    elif args.vector:
        direction = with_reference_norm(load_vector_file(args.vector, layer), model, tok)
    else:
        direction = with_reference_norm(sae_direction(load_sae(args.sae, args.sae_id), args.latent), model, tok)
    if args.save_direction:
        print(f"direction saved to {direction.save(args.save_direction)}")
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, repetition_penalty=1.1, seed=args.seed)
    plain = generate(model, tok, [args.prompt], **gen)[0]
    with steer(model, direction, args.strength, unit=args.unit, schedule=args.schedule):
        steered = generate(model, tok, [args.prompt], **gen)[0]
    coef = direction.coefficient(args.strength, args.unit)
    print(f"model {args.model} | layer {direction.layer} | toward {direction.label!r} | strength {args.strength} "
          f"({args.unit}; raw {coef:.1f}) | schedule {args.schedule}")
    print(f"prompt: {args.prompt}\n")
    for title, text in (("unsteered", plain), ("steered", steered)):
        print(f"--- {title} ---")
        print(textwrap.fill(text, 100))
        print()
    return 0


def _add_generate(sub) -> None:
    from esr_train.settings import add_section_arguments

    p = sub.add_parser("generate", help="build a synthetic self-correction dataset (data_gen)",
                       description="Reads the recipe's data section (the writer model from model.name); any key "
                                   "can be overridden: --data.n 200 --data.seed 1")
    p.add_argument("recipe", nargs="?", help="recipe YAML; its 'data' section (and model.name) are read")
    p.add_argument("--out", required=True, help="dataset directory to write")
    add_section_arguments(p, ("model", "data"))
    p.set_defaults(func=_generate)


def _recipe(args, command: str) -> tuple[dict, str]:
    """The recipe named on the command line (or none) with the ``--SECTION.KEY`` overrides
    applied, and the name errors use for it."""
    from esr_train.config import load_recipe
    from esr_train.settings import with_overrides

    recipe = load_recipe(args.recipe) if getattr(args, "recipe", None) else {}
    return with_overrides(recipe, args.overrides), str(args.recipe) if getattr(args, "recipe", None) else command


def _generate(args) -> int:
    from data_gen.builder import build_dataset, format_summary
    from esr_train.settings import data_config

    from esr_train.preflight import check_out_path

    check_out_path(args.out)
    recipe, where = _recipe(args, "esr generate")
    cfg = data_config(recipe, where)
    summary = build_dataset(cfg, args.out)
    print(format_summary(summary))
    print(f"dataset: {args.out} (datasets.load_from_disk), JSONL: {args.out}/train.jsonl, {args.out}/test.jsonl")
    return 0


def _add_probe(sub) -> None:
    from data_gen.probe import OPENERS
    from esr_train.settings import add_section_arguments

    p = sub.add_parser("probe", help="sample an adapter's unpushed answers on a dataset's training prompts and write "
                                     "the dataset again with its false restarts (and cut openers) as negatives",
                       description="Reads the recipe's 'data' section like esr generate; --data.adapter is the writer, "
                                   "--data.restart_probes the samples per prompt (default 1).")
    p.add_argument("recipe", nargs="?", help="recipe YAML; its 'data' section (and model.name) are read")
    p.add_argument("--dataset", required=True, help="dataset directory to probe on and copy (esr generate's output)")
    p.add_argument("--out", required=True, help="new dataset directory to write")
    p.add_argument("--openers", choices=OPENERS, default="one",
                   help="negatives cut from the answers that did not restart: none, one random cut, or every cut")
    p.add_argument("--opener-sentences", type=int, default=3, help="cut after one of the first N sentences")
    add_section_arguments(p, ("model", "data"))
    p.set_defaults(func=_probe)


def _probe(args) -> int:
    from data_gen.probe import format_probe_summary, probe_dataset
    from esr_train.settings import data_config

    # a recipe's data section is round one's, without probes: the flag or 1
    from esr_train.preflight import check_out_path

    check_out_path(args.out)
    recipe, where = _recipe(args, "esr probe")
    cfg = data_config(recipe, where, restart_probes=(args.overrides.get("data") or {}).get("restart_probes") or 1)
    summary = probe_dataset(cfg, args.dataset, args.out, args.openers, args.opener_sentences)
    print(format_probe_summary(summary))
    print(f"dataset: {args.out} (train it with --train.unlikelihood_weight)")
    return 0


def _add_train(sub) -> None:
    from esr_train.settings import add_section_arguments

    p = sub.add_parser("train", help="train a LoRA adapter on a generated dataset (TRL SFTTrainer + PEFT)",
                       description="Reads the recipe's model and train sections; any key can be overridden: "
                                   "--train.learning_rate 1e-4 --train.max_steps 20 --train.r 8 ...")
    p.add_argument("recipe", nargs="?", help="recipe YAML (sections model, data, train, eval)")
    p.add_argument("--dataset", help="dataset directory (default: the recipe's train.dataset)")
    p.add_argument("--out", help="adapter directory to write (default: the recipe's train.output_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--list-keys", action="store_true", help="print every valid train key and exit")
    add_section_arguments(p, ("model", "train"))
    p.set_defaults(func=_train)


def _train(args) -> int:
    from esr_train.config import RecipeError

    if args.list_keys:
        from esr_train.training.recipe import all_train_keys

        for owner, keys in all_train_keys().items():
            print(f"{owner}: {', '.join(keys)}")
        return 0
    if not args.recipe:
        raise RecipeError("a recipe is required (see recipes/quick.yaml)")
    from esr_train.preflight import check_out_path
    from esr_train.settings import validate_recipe
    from esr_train.training.trainer import dataset_paths, train

    recipe, where = _recipe(args, "esr train")
    out = args.out or recipe.get("train", {}).get("output_dir") or "outputs/adapter"
    check_out_path(out)
    dataset_paths(args.dataset or recipe.get("train", {}).get("dataset"))  # before the libraries load
    validate_recipe(recipe, where)
    summary = train(recipe, out, dataset_dir=args.dataset, resume=args.resume, where=where)
    print(json.dumps({k: summary[k] for k in ("model", "dtype", "steps", "tokens", "tokens_per_s", "first_train_loss",
                                              "final_train_loss", "final_eval_loss")}, indent=2))
    print(f"adapter: {out}")
    return 0


def _add_sweep(sub) -> None:
    from esr_train.settings import add_section_arguments

    p = sub.add_parser("sweep", help="train one adapter per self-correction share (the study's 10%%-90%% sweep)")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--dataset", required=True, help="dataset directory written by esr generate")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--mixes", default="0.1,0.3,0.5,0.7,0.9", help="comma-separated self-correction shares")
    add_section_arguments(p, ("model", "train"))
    p.set_defaults(func=_sweep)


def _sweep(args) -> int:
    from esr_train.config import RecipeError
    from esr_train.settings import validate_recipe
    from esr_train.training.sweep import sweep

    try:
        mixes = [float(m) for m in args.mixes.split(",") if m.strip()]
    except ValueError:
        raise RecipeError(f"--mixes must be numbers separated by commas, got {args.mixes!r}") from None
    from esr_train.preflight import check_out_path

    check_out_path(args.out)
    recipe, where = _recipe(args, "esr sweep")
    validate_recipe(recipe, where)
    result = sweep(recipe, args.dataset, args.out, mixes, where=where)
    print(json.dumps(result, indent=2))
    return 0


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge an adapter into full-precision base weights")
    p.add_argument("adapter", help="adapter directory written by esr train")
    p.add_argument("--out", required=True, help="directory for the merged model")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.set_defaults(func=_merge)


def _merge(args) -> int:
    from esr_train.training.trainer import merge

    print(f"merged model: {merge(args.adapter, args.out, args.dtype)}")
    return 0


def _add_eval(sub) -> None:
    from esr_train.settings import add_section_arguments

    p = sub.add_parser("eval", help="steer base / meta-prompted / fine-tuned models and measure restarts (ESR)",
                       description="Reads the recipe's model and eval sections; any key can be overridden: "
                                   "--eval.trials 50 --eval.strength 0.8. With --adapter the run covers base, "
                                   "base + meta-prompt and the adapter.")
    p.add_argument("recipe", nargs="?", help="recipe YAML (its model and eval sections are read)")
    p.add_argument("--out", required=True, help="run directory (resumes if it exists)")
    p.add_argument("--adapter", action="append", default=None, help="adapter directory (repeat to compare several)")
    p.add_argument("--no-report", action="store_true", help="skip report.md / report.html")
    add_section_arguments(p, ("model", "eval"), skip=("eval.adapters",))
    p.set_defaults(func=_eval)


def _eval(args) -> int:
    from esr_train.settings import eval_config
    from eval.harness import run_eval
    from eval.report import format_table, write_report

    recipe, where = _recipe(args, "esr eval")
    cfg = eval_config(recipe, where, args.adapter)
    summary = run_eval(cfg, args.out)
    print(format_table(summary))
    print(f"trials: {args.out}/trials.jsonl  summary: {args.out}/summary.json")
    if not args.no_report:
        print(f"report: {write_report([args.out])['html']}")
    return 0


def _add_judge(sub) -> None:
    p = sub.add_parser("judge", help="judge rows {prompt, response, concept} of a JSONL file into scored attempts",
                       description="Judge rows {prompt, response, concept} of a JSONL file into scored attempts. "
                                   "Exit status: 0 all rows judged, 1 bad input or settings, 3 the output was "
                                   "written but some rows failed (their 'error' says why; re-run with "
                                   "--retry-errors to judge them again).")
    p.add_argument("file", help="input JSONL, one {prompt, response, concept?, reference?} object a line")
    p.add_argument("--out", required=True, help="output JSONL (resumes if it exists: only rows not yet in it "
                                                "are judged)")
    p.add_argument("--judge", choices=["offline", "llm"], default="offline",
                   help="offline: the bundled local judge; llm: a chat model behind --judge-base-url "
                        "(default: %(default)s)")
    p.add_argument("--judge-base-url", help="OpenAI-compatible endpoint for --judge llm, e.g. "
                                            "http://localhost:8000/v1 (no user:password@ in it: use the key variable)")
    p.add_argument("--judge-model", help="model name for --judge llm")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key for --judge llm; unset sends no key "
                        "(default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=4,
                   help="parallel requests for --judge llm (default: %(default)s)")
    p.add_argument("--retry-errors", action="store_true",
                   help="judge again the rows that a previous run into --out recorded as errors")
    p.add_argument("--allow-empty", action="store_true",
                   help="accept an input without rows (writes an empty output) instead of failing")
    p.set_defaults(func=_judge)


def _judge(args) -> int:
    from eval.config import EvalConfig
    from eval.harness import make_judge
    from eval.judge_files import failed_rows_error, judge_file

    judge = make_judge(EvalConfig(judge=args.judge, judge_base_url=args.judge_base_url, judge_model=args.judge_model,
                                  judge_api_key_env=args.judge_api_key_env, judge_concurrency=args.concurrency))
    counts = judge_file(args.file, args.out, judge, retry_errors=args.retry_errors, allow_empty=args.allow_empty)
    print(json.dumps({"judge": judge.name, **counts}, indent=2))
    failed = failed_rows_error(args.out, counts)
    if failed:  # the output is complete and printed; exit 3 so scripts notice the failed rows
        raise failed
    return 0


def _add_judge_agreement(sub) -> None:
    p = sub.add_parser("judge-agreement",
                       help="agreement of a judge with human labels (--labels), or of two judges' outputs (A B)")
    p.add_argument("a", nargs="?", help="judged JSONL of judge A (with B: compare two judges)")
    p.add_argument("b", nargs="?", help="judged JSONL of judge B")
    p.add_argument("--labels", nargs="+", metavar="PATH",
                   help="labelled JSONL files or folders (the shipped set: eval/judge_set); judged with --judge")
    p.add_argument("--out", help="with --labels: folder for the judged rows and agreement.json "
                                 "(default: runs/judge-agreement/JUDGE; resumes if it exists)")
    p.add_argument("--judge", choices=["offline", "llm"], default="offline", help="with --labels: the judge to check")
    p.add_argument("--judge-base-url", help="OpenAI-compatible endpoint for --judge llm")
    p.add_argument("--judge-model", help="model name for --judge llm")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--concurrency", type=int, default=4, help="parallel requests for --judge llm")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_judge_agreement)


def _judge_agreement(args) -> int:
    from eval.judge_files import JudgeFileError, format_agreement, judge_agreement, read_judge_rows

    if args.labels:
        if args.a or args.b:
            raise JudgeFileError("give either --labels or two judged files, not both")
        return _label_agreement(args)
    if not (args.a and args.b):
        raise JudgeFileError("give two judged files A B, or --labels PATH")
    result = judge_agreement(read_judge_rows(args.a), read_judge_rows(args.b))
    print(json.dumps(result, indent=2) if args.json else format_agreement(result))
    return 0


def _label_agreement(args) -> int:
    from pathlib import Path

    from esr_train.cache import atomic_write_json, atomic_write_text
    from eval.config import EvalConfig
    from eval.harness import make_judge
    from eval.judge_files import judge_file, read_judge_rows
    from eval.labelled import format_label_agreement, label_agreement, read_labelled

    labelled = read_labelled(args.labels)
    judge = make_judge(EvalConfig(judge=args.judge, judge_base_url=args.judge_base_url, judge_model=args.judge_model,
                                  judge_api_key_env=args.judge_api_key_env, judge_concurrency=args.concurrency))
    out = Path(args.out or Path("runs") / "judge-agreement" / judge.name.replace(":", "_"))
    inputs = out / "labelled.jsonl"
    atomic_write_text(inputs, "".join(json.dumps({k: r.get(k, "") for k in ("id", "source", "prompt", "response",
                                                                             "concept")}, ensure_ascii=False) + "\n"
                                      for r in labelled))
    counts = judge_file(inputs, out / "judged.jsonl", judge)
    result = label_agreement(labelled, read_judge_rows(out / "judged.jsonl"))
    result["judge"] = judge.name
    atomic_write_json(out / "agreement.json", result)
    print(json.dumps(result, indent=2) if args.json else format_label_agreement(result))
    print(f"judge {judge.name}: {counts['rows']} rows, {counts['errors']} errors; {out}/agreement.json")
    return 0


def _add_rejudge(sub) -> None:
    p = sub.add_parser("rejudge", help="judge a finished eval run's trials again with today's judge "
                                       "(no generation); old and new rates side by side")
    p.add_argument("run", help="eval run directory (holds eval_config.json, trials.jsonl, summary.json)")
    p.add_argument("--out", required=True, help="new run directory (resumes if it exists)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_rejudge)


def _rejudge(args) -> int:
    from eval.rejudge import format_rejudge, rejudge_run

    result = rejudge_run(args.run, args.out)
    print(json.dumps(result, indent=2) if args.json else format_rejudge(result))
    print(f"trials: {args.out}/trials.jsonl  summary: {args.out}/summary.json  both judges: {args.out}/rejudge.json")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write report.md / report.html with plots for one or more eval runs")
    p.add_argument("runs", nargs="+", help="eval run directories (several give a side-by-side table)")
    p.add_argument("--out", help="report directory (default: the run, or RUNS_PARENT/report for several)")
    p.add_argument("--examples", type=int, default=6, help="example transcripts to show")
    p.set_defaults(func=_report)


def _report(args) -> int:
    from eval.report import write_report

    paths = write_report(args.runs, args.out, n_examples=args.examples)
    print(f"report: {paths['html']}\nmarkdown: {paths['markdown']}")
    return 0


def _add_pool(sub) -> None:
    p = sub.add_parser("pool", help="pool a condition over training seeds: rates over all trials and the spread between seeds",
                       description="Each group is NAME=RUN_DIR:CONDITION[,RUN_DIR:CONDITION...], e.g. "
                                   "recipe=runs/s0/eval:adapter,runs/s1/eval:adapter (eval/pooling.py)")
    p.add_argument("groups", nargs="+", help="NAME=RUN_DIR:CONDITION[,...]")
    p.add_argument("--json", help="also write the pooled results here")
    p.set_defaults(func=_pool)


def _pool(args) -> int:
    from esr_train.cache import atomic_write_json
    from eval.pooling import format_pooled, pool

    groups = pool(args.groups)
    print(format_pooled(groups))
    if args.json:
        atomic_write_json(args.json, groups)
    return 0


def _add_sae(sub) -> None:
    import dataclasses

    from esr_train.sae_train import SAESettings

    p = sub.add_parser("sae", help="sparse autoencoders for the bundled models (sae-lens), trained offline")
    ssub = p.add_subparsers(dest="sae_command", metavar="ACTION", required=True, parser_class=_Parser)
    t = ssub.add_parser("train", help="train a TopK SAE on a model's own residuals at one layer (cached)",
                        description="The model writes answers to the bundled training prompts and texts about the "
                                    "bundled training subjects; its residuals after --layer train a sae-lens TopK "
                                    "SAE. The result is cached per model, layer and settings, and loads with "
                                    "esr eval --eval.directions sae --eval.sae DIR.")
    t.add_argument("--model", default="smollm2-135m", help="bundled name or local model directory")
    t.add_argument("--layer", type=int, required=True, help="decoder layer whose output (resid_post) is read")
    for f in dataclasses.fields(SAESettings):
        t.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=f.default,
                       help=f"{f.metadata['help']} (default: %(default)s)")
    t.add_argument("--cache-dir", default=None, help="cache root (default $ESR_CACHE_DIR or ~/.cache/esr-train)")
    p.set_defaults(func=_sae)


def _sae(args) -> int:
    import dataclasses

    from esr_train.sae_train import SAESettings, read_quality, train_sae

    settings = SAESettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SAESettings)})
    path = train_sae(args.model, args.layer, settings, cache_root=args.cache_dir)
    q = read_quality(path)
    print(f"sae: {path}")
    print(f"held-out explained variance {q.get('explained_variance')}, L0 {q.get('l0')}, dead latents "
          f"{q.get('dead_fraction')}, trained on {q.get('training_tokens')} tokens")
    for ex in q.get("top_latents", []):
        print(f"  latent {ex['latent']:5d} (active on {100 * ex['frequency']:.1f}% of tokens): {ex['context']!r}")
    print(f"steer with it: esr eval --eval.directions sae --eval.sae {path}")
    return 0


def _add_pipeline(sub) -> None:
    from esr_train.pipeline import STAGES
    from esr_train.settings import add_section_arguments

    p = sub.add_parser("pipeline", help="generate -> train -> eval -> report in one run directory (resumable)",
                       description="Overrides name their section: --data.n 100 --train.max_steps 40 "
                                   "--eval.trials 50")
    p.add_argument("recipe", help="recipe YAML (sections model, data, train, eval)")
    p.add_argument("--out", help="run directory (default runs/RECIPE_NAME)")
    p.add_argument("--stages", help="comma-separated subset of the stages (default: all of them: generate, "
                   f"train, then generateN and trainN for each roundN section, {', '.join(STAGES[-2:])})")
    add_section_arguments(p, ("model", "data", "train", "eval"), skip=("eval.adapters",))
    p.set_defaults(func=_pipeline)


def _pipeline(args) -> int:
    from pathlib import Path

    from esr_train.pipeline import describe, run_pipeline
    from eval.report import format_table

    out = args.out or str(Path("runs") / Path(args.recipe).stem)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip()) if args.stages else None
    result = run_pipeline(args.recipe, out, stages=stages, overrides=args.overrides)
    print(describe(result))
    if result.get("summary"):
        print(format_table(result["summary"]))
    if result.get("report"):
        print(f"report: {result['report']['html']}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors in one line (``esr CMD: error: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="esr", description="Induce, measure and compare endogenous steering resistance.")
    parser.add_argument("--version", action="version", version=f"esr-train {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_models(sub)
    _add_steer(sub)
    _add_generate(sub)
    _add_probe(sub)
    _add_train(sub)
    _add_sweep(sub)
    _add_merge(sub)
    _add_eval(sub)
    _add_judge(sub)
    _add_judge_agreement(sub)
    _add_rejudge(sub)
    _add_report(sub)
    _add_pool(sub)
    _add_sae(sub)
    _add_pipeline(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not hasattr(args, "override_sections"):
        print(error_line(args.command or "", argparse.ArgumentError(None, f"unrecognized arguments: {' '.join(extra)}")),
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from esr_train.errors import EsrError

    try:
        if hasattr(args, "override_sections"):
            from esr_train.settings import collect_overrides

            args.overrides = collect_overrides(args, extra)
        return int(args.func(args) or 0)
    except EsrError as exc:
        print(error_line(args.command, exc), file=sys.stderr)
        return exc.exit_code


def error_line(command: str, exc: BaseException) -> str:
    """``esr COMMAND: error: MESSAGE`` with the prefix said once, even when the message
    already starts with it."""
    prefix = f"esr {command}: "
    text = str(exc)
    while text.startswith(prefix):
        text = text[len(prefix):]
    if text.startswith("error: "):
        text = text[len("error: "):]
    return f"{prefix}error: {text}"


if __name__ == "__main__":
    sys.exit(main())
