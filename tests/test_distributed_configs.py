"""The multi-GPU launch configs in recipes/ (accelerate YAML + DeepSpeed JSON), checked on CPU.

No GPU is needed: in transformers 5.23 ``TrainingArguments(deepspeed=...)`` runs its DeepSpeed
set-up on a CPU-only machine (HfTrainerDeepSpeedConfig fills the "auto" values, accelerate builds a
DeepSpeedPlugin; no process group is started), so the JSON files are checked through the same
path the Trainer uses. The YAML files are checked with accelerate's own config loader and the code
``accelerate launch`` uses to turn them into the training processes' environment.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
DS_DIR = ROOT / "recipes" / "deepspeed"
ACC_DIR = ROOT / "recipes" / "accelerate"
DS_FILES = sorted(DS_DIR.glob("*.json"))
ACC_FILES = sorted(ACC_DIR.glob("*.yaml"))
ZERO3 = {"zero3.json", "zero3_offload.json"}
# "auto" values that only trainer_config_finalize fills (they need the model's hidden size)
HIDDEN_SIZE_KEYS = {"reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"}
EXPECTED_ACC = {"single_gpu.yaml", "multi_gpu.yaml", "zero2.yaml", "zero3.yaml", "multi_node.yaml"}


def _autos(node, prefix=""):
    """Dotted keys whose value is still "auto"."""
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "auto" else []


@pytest.fixture(autouse=True)
def _clean_global_state():
    """TrainingArguments(deepspeed=...) registers a process-wide DeepSpeed config (a weakref that
    makes from_pretrained think ZeRO-3 is on) and accelerate keeps a shared state; undo both so
    other tests in the session load models normally."""
    yield
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    except Exception:  # private API; best effort only
        pass


def _training_args(tmp_path, ds_path, **kw):
    from transformers import TrainingArguments

    kw = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "bf16": False, **kw}
    return TrainingArguments(output_dir=str(tmp_path), deepspeed=str(ds_path), report_to=[], **kw)


# ---- DeepSpeed JSON ---------------------------------------------------------------------------

def test_expected_files_present():
    assert {p.name for p in DS_FILES} >= {"zero2.json", "zero3.json", "zero3_offload.json"}
    assert {p.name for p in ACC_FILES} >= EXPECTED_ACC


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.name)
def test_deepspeed_json_parses_with_trainer_owned_autos(path):
    cfg = json.loads(path.read_text())
    # the Trainer (the recipe) owns these; a fixed value here would fight the recipe
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                "train_batch_size"):
        assert cfg[key] == "auto", key
    assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto"
    # optimizer and scheduler come from the recipe (optim, lr_scheduler_type)
    assert "optimizer" not in cfg and "scheduler" not in cfg
    assert cfg["zero_optimization"]["stage"] == (3 if path.name in ZERO3 else 2)


@pytest.mark.parametrize("name", sorted(ZERO3))
def test_zero3_gathers_16bit_weights_on_save(name):
    zero = json.loads((DS_DIR / name).read_text())["zero_optimization"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_offload_puts_optimizer_and_params_on_pinned_cpu():
    zero = json.loads((DS_DIR / "zero3_offload.json").read_text())["zero_optimization"]
    for part in ("offload_optimizer", "offload_param"):
        assert zero[part] == {"device": "cpu", "pin_memory": True}
    for name in ("zero2.json", "zero3.json"):
        zero = json.loads((DS_DIR / name).read_text())["zero_optimization"]
        assert zero.get("offload_optimizer", {}).get("device", "none") == "none"
        assert zero.get("offload_param", {}).get("device", "none") == "none"


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.name)
def test_training_arguments_fill_the_autos(tmp_path, path):
    """TrainingArguments(deepspeed=...) works without a GPU in transformers 5.23; its
    trainer_config_process stage fills everything but the hidden-size keys."""
    args = _training_args(tmp_path, path)
    hf = args.hf_deepspeed_config
    cfg = hf.config
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 2 * 4 * args.world_size
    assert cfg["gradient_clipping"] == args.max_grad_norm
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    left = _autos(cfg)
    assert {k.split(".")[-1] for k in left} <= HIDDEN_SIZE_KEYS, left
    assert all(k.startswith("zero_optimization.") for k in left), left
    assert hf.is_zero3() == (path.name in ZERO3)
    plugin = args.deepspeed_plugin
    assert plugin.zero_stage == cfg["zero_optimization"]["stage"]
    assert plugin.zero3_save_16bit_model is (path.name in ZERO3)


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.name)
def test_finalized_config_is_valid_for_deepspeed(tmp_path, path):
    """After the Trainer's second stage (model known) no "auto" is left, and DeepSpeed's own
    (strict, extra-keys-forbidden) config parser accepts the result."""
    from deepspeed.runtime.config import DeepSpeedConfig

    args = _training_args(tmp_path, path)
    hf = args.hf_deepspeed_config
    hf.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=64)), num_training_steps=10)
    assert _autos(hf.config) == []
    ds = DeepSpeedConfig(hf.config)
    assert ds.train_batch_size == 8 and ds.train_micro_batch_size_per_gpu == 2
    assert ds.zero_optimization_stage == (3 if path.name in ZERO3 else 2)
    if path.name in ZERO3:
        assert ds.zero_config.gather_16bit_weights_on_model_save is True


def test_fixed_value_that_disagrees_with_the_recipe_is_an_error(tmp_path):
    """Why the JSON files say "auto": a hard-coded value that differs from the recipe fails."""
    cfg = json.loads((DS_DIR / "zero2.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(cfg))
    args = _training_args(tmp_path / "out", bad)
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        args.hf_deepspeed_config.trainer_config_finalize(
            args, SimpleNamespace(config=SimpleNamespace(hidden_size=64)), num_training_steps=10)


# ---- accelerate YAML ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", ACC_FILES, ids=lambda p: p.name)
def test_accelerate_yaml_parses(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["compute_environment"] == "LOCAL_MACHINE"
    assert isinstance(cfg["num_processes"], int) and cfg["num_processes"] >= 1
    line = next(ln for ln in path.read_text().splitlines() if ln.startswith("num_processes:"))
    if cfg["num_processes"] > 1:
        assert "--num_processes" in line, "say how to override num_processes on the command line"
    if cfg["distributed_type"] == "DEEPSPEED":
        ds = cfg["deepspeed_config"]
        target = ROOT / ds["deepspeed_config_file"]
        assert target.is_file(), target
        assert target.parent == DS_DIR
        # accelerate refuses these next to deepspeed_config_file; bf16 comes from the JSON's "auto"
        assert "mixed_precision" not in cfg
        assert not set(ds) & {"zero_stage", "offload_optimizer_device", "offload_param_device",
                              "gradient_accumulation_steps", "gradient_clipping", "zero3_save_16bit_model"}
    else:
        assert cfg["mixed_precision"] == "bf16"


def test_zero_yamls_match_their_json():
    z2 = yaml.safe_load((ACC_DIR / "zero2.yaml").read_text())["deepspeed_config"]
    z3 = yaml.safe_load((ACC_DIR / "zero3.yaml").read_text())["deepspeed_config"]
    assert z2["deepspeed_config_file"] == "recipes/deepspeed/zero2.json" and z2.get("zero3_init_flag") is False
    assert z3["deepspeed_config_file"] == "recipes/deepspeed/zero3.json" and z3["zero3_init_flag"] is True


def test_multi_node_yaml():
    cfg = yaml.safe_load((ACC_DIR / "multi_node.yaml").read_text())
    assert cfg["distributed_type"] == "MULTI_GPU" and cfg["num_machines"] == 2 and cfg["machine_rank"] == 0
    assert cfg["rdzv_backend"] == "static" and cfg["same_network"] is True
    assert cfg["main_process_ip"] and cfg["num_processes"] % cfg["num_machines"] == 0
    line = next(ln for ln in (ACC_DIR / "multi_node.yaml").read_text().splitlines()
                if ln.startswith("main_process_ip:"))
    assert "#" in line and "PLACEHOLDER" in line


@pytest.mark.parametrize("path", ACC_FILES, ids=lambda p: p.name)
def test_accelerate_config_class_accepts(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    raw = yaml.safe_load(path.read_text())
    assert cfg.distributed_type == DistributedType(raw["distributed_type"])
    assert cfg.num_processes == raw["num_processes"]


def _launch_env(config_file, *extra):
    """What `accelerate launch --config_file FILE ...` puts in the training processes' environment
    (accelerate's own parsing and env-building code; nothing is started). Private accelerate API."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(config_file), *extra, "-m", "esr_train.cli", "train", "r.yaml"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        env = {"ACCELERATE_MIXED_PRECISION": args.mixed_precision}
    return args, {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


@pytest.mark.parametrize("name", ["single_gpu.yaml", "multi_gpu.yaml", "multi_node.yaml"])
def test_ddp_yamls_launch_in_bf16(name):
    args, env = _launch_env(ACC_DIR / name)
    assert not args.use_deepspeed and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert args.multi_gpu == (name != "single_gpu.yaml")


@pytest.mark.parametrize(("name", "stage", "init", "extra", "offload"), [
    ("zero2.yaml", 2, False, (), "none"),
    ("zero3.yaml", 3, True, (), "none"),
    ("zero3.yaml", 3, True, ("--deepspeed_config_file", "recipes/deepspeed/zero3_offload.json"), "cpu"),
])
def test_zero_yamls_give_the_plugin_accelerate_builds(monkeypatch, tmp_path, name, stage, init, extra, offload):
    """The environment accelerate launch builds from the ZeRO files yields a DeepSpeedPlugin with the
    JSON's settings, and a recipe that also names a JSON (`deepspeed:`) is accepted."""
    from accelerate.utils import DeepSpeedPlugin

    monkeypatch.chdir(ROOT)  # the files name their JSON relative to the repo root
    _, env = _launch_env(ACC_DIR / name, *extra)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage and plugin.zero3_init_flag is init
    assert plugin.offload_optimizer_device == offload and plugin.offload_param_device == offload
    assert plugin.zero3_save_16bit_model is (stage == 3)
    # as in recipes/llama-3.1-8b-instruct.yaml: the recipe names a JSON as well
    json_path = env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
    args = _training_args(tmp_path, json_path)
    assert args.deepspeed_plugin.zero_stage == stage


def test_mixed_precision_next_to_config_file_is_refused(monkeypatch, tmp_path):
    """Why the ZeRO files carry no `mixed_precision`: accelerate rejects it beside a JSON file."""
    from accelerate.utils import DeepSpeedPlugin

    cfg = yaml.safe_load((ACC_DIR / "zero3.yaml").read_text())
    cfg["mixed_precision"] = "bf16"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(ROOT)
    _, env = _launch_env(bad)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="deepspeed_config_file"):
        DeepSpeedPlugin()


# ---- optional end to end (about 20 s): ZeRO-3 + LoRA through the Trainer on CPU ----------------

_E2E = textwrap.dedent("""
    import os, sys, tempfile
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    out = sys.argv[2]
    args = TrainingArguments(output_dir=out, deepspeed=sys.argv[1], per_device_train_batch_size=2,
                             max_steps=2, bf16=False, report_to=[], save_strategy="no")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    # r=16: every LoRA tensor (16 x 64) is above ZeRO-3's persistence threshold ("auto" = 10 x hidden),
    # so it is partitioned, as LoRA tensors of real models are
    model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "o_proj"], task_type="CAUSAL_LM"))
    rows = [{"input_ids": (ids := torch.randint(3, 128, (16,))), "labels": ids} for _ in range(8)]
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    trainer.save_model(out)
    good = load_file(os.path.join(out, "adapter_model.safetensors"))
    direct = tempfile.mkdtemp()
    trainer.model.save_pretrained(direct)  # the trap: sharded params, nothing gathered
    empty = load_file(os.path.join(direct, "adapter_model.safetensors"))
    print("NUMEL", sum(v.numel() for v in good.values()), sum(v.numel() for v in empty.values()))
""")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ESR_TEST_DEEPSPEED_E2E") != "1",
                    reason="set ESR_TEST_DEEPSPEED_E2E=1 to run a ZeRO-3 + LoRA training step on CPU (~20 s)")
def test_zero3_lora_adapter_is_not_empty_end_to_end(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "e2e.py"
    script.write_text(_E2E)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(script), str(DS_DIR / "zero3.json"), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("NUMEL"))
    saved, direct = map(int, line.split()[1:])
    assert saved == 2 * 2 * (16 * 64 + 64 * 16)  # 2 layers x (q, o) x (A + B)
    assert direct == 0
