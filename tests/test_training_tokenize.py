"""Token-level checks of the training sequences for both real tokenizers: the ids match
the chat template's own rendering, the loss mask covers exactly the prompt and the
distraction, Gemma stops on <end_of_turn>, and TRL's SFTTrainer keeps our labels."""

from __future__ import annotations

from functools import cache

import pytest

from esr_train.training.tokenize import IGNORE, end_of_turn_ids, tokenize_dataset, tokenize_row

MODELS = ["smollm2-135m", "gemma3-270m"]
END_TOKEN = {"smollm2-135m": "<|im_end|>", "gemma3-270m": "<end_of_turn>"}

SC_ROW = {
    "prompt": "What is the capital of France?",
    "distraction": "Bananas are a great source of potassium, and they grow in warm climates.",
    "restart": "Wait, that is off-topic; back to the question.",
    "answer": "The capital of France is Paris.",
    "kind": "self_correction",
}
NORMAL_ROW = {"prompt": "Name a primary colour.", "distraction": "", "restart": "",
              "answer": "Blue is a primary colour.", "kind": "normal"}


@cache
def _tokenizer(name: str):
    """Loaded once per module run (a few seconds each, from the esr cache)."""
    from esr_train.zoo import load_tokenizer

    t = load_tokenizer(name)
    t.esr_name = name
    return t


@pytest.fixture(params=MODELS)
def tok(request):
    return _tokenizer(request.param)


def _decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _assistant_text(row: dict) -> str:
    if row["kind"] == "normal":
        return row["answer"]
    return f"{row['distraction']} {row['restart']} {row['answer']}"


def _rendered_through_end(tok, row: dict) -> str:
    """The template's full chat rendering, cut right after the end-of-turn token."""
    messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": _assistant_text(row)}]
    full = tok.apply_chat_template(messages, tokenize=False)
    end = END_TOKEN[tok.esr_name]
    return full[: full.rindex(end) + len(end)]


def test_end_of_turn_ids(tok):
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids(END_TOKEN[tok.esr_name])]


def test_self_correction_ids_match_template(tok):
    out = tokenize_row(SC_ROW, tok, max_length=512)
    expected = _rendered_through_end(tok, SC_ROW)
    assert _decode(tok, out["input_ids"]) == expected
    # exact ids too: segment-wise tokenization equals one-shot tokenization of the rendering
    assert out["input_ids"] == tok(expected, add_special_tokens=False)["input_ids"]
    assert out["attention_mask"] == [1] * len(out["input_ids"])


def test_self_correction_mask(tok):
    out = tokenize_row(SC_ROW, tok, max_length=512)
    ids, labels = out["input_ids"], out["labels"]
    n_masked = sum(1 for lab in labels if lab == IGNORE)
    # masked tokens form one prefix; everything after it is trained with labels == ids
    assert all(lab == IGNORE for lab in labels[:n_masked])
    assert labels[n_masked:] == ids[n_masked:]
    end = END_TOKEN[tok.esr_name]
    assert _decode(tok, labels[n_masked:]) == f" {SC_ROW['restart']} {SC_ROW['answer']}{end}"
    masked = _decode(tok, ids[:n_masked])
    assert masked.endswith(SC_ROW["distraction"])
    assert masked[: -len(SC_ROW["distraction"])].endswith("\n")  # distraction follows the turn header directly
    assert out["n_loss_tokens"] == len(ids) - n_masked
    # the answer starts right after the restart (steer_span: until_answer pushes before it)
    assert _decode(tok, ids[out["answer_start"]:]) == f" {SC_ROW['answer']}{end}"
    assert _decode(tok, ids[n_masked:out["answer_start"]]) == f" {SC_ROW['restart']}"


def test_normal_row_trains_whole_answer(tok):
    out = tokenize_row(NORMAL_ROW, tok, max_length=512)
    assert _decode(tok, out["input_ids"]) == _rendered_through_end(tok, NORMAL_ROW)
    kept = [lab for lab in out["labels"] if lab != IGNORE]
    assert _decode(tok, kept) == NORMAL_ROW["answer"] + END_TOKEN[tok.esr_name]
    assert out["answer_start"] == len(out["labels"]) - len(kept)


def test_answer_loss_tokens_keeps_the_restart_and_the_answer_start(tok):
    """answer_tokens=N trains the restart and N answer tokens, and the row ends there (no
    end-of-turn: the answer was cut); N above the answer's length changes nothing."""
    full = tokenize_row(SC_ROW, tok, max_length=512)
    out = tokenize_row(SC_ROW, tok, max_length=512, answer_tokens=3)
    start = out["answer_start"]
    assert start == full["answer_start"] and out["input_ids"] == full["input_ids"][:start + 3]
    assert out["labels"] == full["labels"][:start + 3] and out["n_loss_tokens"] == full["n_loss_tokens"] - (
        len(full["input_ids"]) - start - 3)
    assert tokenize_row(SC_ROW, tok, max_length=512, answer_tokens=10_000) == full
    normal = tokenize_row(NORMAL_ROW, tok, max_length=512, answer_tokens=2)
    assert normal["n_loss_tokens"] == 2 and normal["labels"][-2:] == normal["input_ids"][-2:]
    assert tokenize_row(NORMAL_ROW, tok, max_length=512, answer_tokens=0) is None
    # normal rows may keep a longer window than the self-correction answers
    assert tokenize_row(NORMAL_ROW, tok, max_length=512, answer_tokens=0, normal_tokens=10_000) == \
        tokenize_row(NORMAL_ROW, tok, max_length=512)


def test_normal_skip_keeps_the_opener_in_context_but_out_of_the_loss(tok):
    """normal_skip=K: the same input ids, the first K answer tokens of a normal row masked,
    the rest trained; self-correction rows untouched; a skip covering the whole answer
    leaves nothing to train (the row is dropped)."""
    full = tokenize_row(NORMAL_ROW, tok, max_length=512)
    out = tokenize_row(NORMAL_ROW, tok, max_length=512, normal_skip=2)
    start = full["answer_start"]
    assert out["input_ids"] == full["input_ids"] and out["n_loss_tokens"] == full["n_loss_tokens"] - 2
    assert out["labels"][:start + 2] == [IGNORE] * (start + 2) and out["labels"][start + 2:] == full["labels"][start + 2:]
    assert tokenize_row(SC_ROW, tok, max_length=512, normal_skip=2) == tokenize_row(SC_ROW, tok, max_length=512)
    assert tokenize_row(NORMAL_ROW, tok, max_length=512, normal_skip=10_000) is None


def test_bos_never_doubled(tok):
    ids = tokenize_row(SC_ROW, tok, max_length=512)["input_ids"]
    if tok.esr_name == "gemma3-270m":
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    else:  # SmolLM2's "BOS" is <|im_start|>: only the template's own turn openers, none added
        assert ids.count(tok.bos_token_id) == _rendered_through_end(tok, SC_ROW).count(tok.bos_token)
        assert ids[0] != ids[1]


def test_gemma_stops_on_end_of_turn_not_eos():
    tok = _tokenizer("gemma3-270m")
    out = tokenize_row(SC_ROW, tok, max_length=512)
    assert out["labels"][-1] == out["input_ids"][-1] == 106
    assert tok.eos_token_id not in out["labels"]


def test_too_long_dropped_and_counted(tok):
    from datasets import Dataset

    n = len(tokenize_row(SC_ROW, tok, max_length=512)["input_ids"])
    assert tokenize_row(SC_ROW, tok, max_length=n) is not None
    assert tokenize_row(SC_ROW, tok, max_length=n - 1) is None
    empty = {**NORMAL_ROW, "answer": "  "}  # trains nothing: dropped and counted apart
    assert tokenize_row(empty, tok, max_length=512) is None
    ds = Dataset.from_list([SC_ROW, NORMAL_ROW, empty])
    out, stats = tokenize_dataset(ds, tok, max_length=n - 1)
    assert stats["rows_in"] == 3 and stats["rows_kept"] == 1
    assert stats["dropped_too_long"] == 1 and stats["dropped_no_loss"] == 1
    assert out.column_names == ["input_ids", "attention_mask", "labels"]
    row = tokenize_row(NORMAL_ROW, tok, max_length=512)
    assert list(out[0]["labels"]) == row["labels"]
    assert stats["tokens"] == len(row["input_ids"]) and stats["loss_tokens"] == row["n_loss_tokens"]


def test_trl_sft_trainer_honours_labels(tmp_path):
    """TRL 1.16 keeps a pre-tokenized 'labels' column and pads it with -100."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = _tokenizer("smollm2-135m")
    rows = [SC_ROW, NORMAL_ROW]
    ds, stats = tokenize_dataset(Dataset.from_list(rows), tok, max_length=512)
    assert stats["rows_kept"] == 2
    expected = [tokenize_row(r, tok, max_length=512) for r in rows]
    assert len(expected[0]["input_ids"]) != len(expected[1]["input_ids"])  # so the batch needs padding

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=512))
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                     use_cpu=True, max_length=None, save_strategy="no", logging_strategy="no", dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["labels"].shape == batch["input_ids"].shape == (2, max(len(e["input_ids"]) for e in expected))
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                 batch["attention_mask"].tolist()):
        exp = next(e for e in expected if ids[: len(e["input_ids"])] == e["input_ids"])
        n = len(exp["input_ids"])
        assert labels[:n] == exp["labels"]  # prompt + distraction stay -100
        assert labels[n:] == [IGNORE] * (len(labels) - n)  # padding is -100
        assert mask == [1] * n + [0] * (len(mask) - n)


def test_false_restart_row_scores_only_the_restart_as_unlikely(tok):
    """A false-restart negative: the opener is context, the restart tokens are both the
    labels (so TRL's fused head scores them) and the unlikely marks, nothing else is
    trained, no end-of-turn follows; other rows carry no unlikely marks."""
    row = {"prompt": NORMAL_ROW["prompt"], "distraction": "Blue is a primary colour.",
           "restart": "Wait, let me start over.", "answer": "", "kind": "false_restart"}
    out = tokenize_row(row, tok, max_length=512)
    marked = [t for t in out["unlikely"] if t != IGNORE]
    assert _decode(tok, marked) == " Wait, let me start over."
    assert out["labels"] == out["unlikely"] and out["n_loss_tokens"] == 0
    assert out["input_ids"][-len(marked):] == marked
    assert _decode(tok, out["input_ids"]).endswith("Blue is a primary colour. Wait, let me start over.")
    for other in (SC_ROW, NORMAL_ROW):
        assert set(tokenize_row(other, tok, max_length=512)["unlikely"]) == {IGNORE}
    with pytest.raises(ValueError, match="false_restart row needs"):
        tokenize_row({**row, "distraction": ""}, tok, max_length=512)
