"""`prefix-serve train`: from data to a served task.

The headline test trains a prefix on a synthetic task the base model cannot do zero-shot (arbitrary code
words for three categories), uploads it to a real server process, and measures held-out exact match
over HTTP. The rest uses a tiny Llama folder (with the real tokenizer) to cover every method quickly.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from prefixes.formats import parse_artifact
from server.engine.model import default_model_dir, load_base_model
from server.example import CATEGORIES  # the shipped example's categories: one table
from tests.helpers.server_process import ServerProcess
from tests.helpers.support import assert_oracle_tokens, save_tiny_llama
from training.loop import TrainConfig, TrainingError, collate, load_examples, train

# minutes of real processes or fault drills: `make test-long`, which CI runs too (Makefile)
pytestmark = pytest.mark.long


def write_code_word_task(folder: Path) -> tuple[Path, Path, list[dict]]:
    """60 items -> 45 train / 15 held out. The labels are made-up words: zero-shot accuracy is nil."""
    rows = [{"prompt": f"Item: {w}\nCode:", "completion": f" {label}"}
            for label, words in CATEGORIES.items() for w in words]
    random.Random(0).shuffle(rows)
    train_path, eval_path = folder / "train.jsonl", folder / "eval.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in rows[15:]))
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in rows[:15]))
    return train_path, eval_path, rows[:15]


def served_accuracy(url: str, task: str | None, rows: list[dict]) -> tuple[float, list[dict]]:
    answers = []
    for row in rows:
        params = {"task": task} if task else {}
        r = httpx.post(f"{url}/generate", params=params, json={"prompt": row["prompt"], "max_new_tokens": 6},
                       timeout=120)
        assert r.status_code == 200, r.text
        answers.append(r.json())
    correct = sum(a["text"].strip() == row["completion"].strip() for a, row in zip(answers, rows))
    return correct / len(rows), answers


@pytest.mark.slow
def test_trained_prefix_lifts_accuracy_through_the_server(tmp_path):
    train_path, eval_path, held_out = write_code_word_task(tmp_path)
    out = tmp_path / "adapter"
    with ServerProcess(tmp_path / "store", tmp_path / "server.log") as server:
        base_accuracy, _ = served_accuracy(server.url, None, held_out)
        cmd = [sys.executable, "-m", "server.cli", "train", "--data", str(train_path),
               "--eval", str(eval_path), "--out", str(out), "--method", "prefix",
               "--num-virtual-tokens", "8", "--epochs", "15",
               "--lr", "3e-2", "--seed", "0", "--upload", server.url, "--task", "codes"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "exact match" in done.stderr  # the per-epoch report
        accuracy, answers = served_accuracy(server.url, "codes", held_out)
        # Multi-task initialisation from the served task (fetched over HTTP), zero steps: an exact copy.
        copy_out = tmp_path / "copy"
        cmd = [sys.executable, "-m", "server.cli", "train", "--data", str(train_path), "--out", str(copy_out),
               "--num-virtual-tokens", "8", "--steps", "0", "--init-from", "codes", "--upload", server.url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
    assert torch.equal(load_file(out / "adapter_model.safetensors")["prompt_embeddings"],
                       load_file(copy_out / "adapter_model.safetensors")["prompt_embeddings"])
    assert base_accuracy == 0.0
    assert accuracy >= 0.5, f"held-out exact match {accuracy:.0%}: {[a['text'] for a in answers]}"

    # The saved folder is a PEFT adapter: PEFT loads it and its forward pass gives the served tokens.
    base_model = AutoModelForCausalLM.from_pretrained(default_model_dir())
    peft_model = PeftModel.from_pretrained(base_model, out).eval()
    tokenizer = load_base_model("default", torch.float32, "cpu").tokenizer
    for row, answer in zip(held_out[:5], answers[:5]):
        assert_oracle_tokens(peft_model, tokenizer(row["prompt"])["input_ids"], answer["token_ids"],
                             row["prompt"])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    """A tiny random Llama saved as a model folder with the real tokenizer: `--model PATH` for training."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer, max_positions=512)


def run_tiny(folder: Path, tmp_path: Path, name: str, **options):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data, eval_data, _ = write_code_word_task(tmp_path)
    cfg = TrainConfig(data=data, eval=eval_data, out=tmp_path / name, model=str(folder),
                      steps=options.pop("steps", 2), batch_size=4, progress=False, **options)
    base = load_base_model(str(folder), torch.float32, "cpu")
    return train(cfg, base), base


@pytest.mark.parametrize("options", [
    {"method": "prefix"},
    {"method": "prefix", "prefix_projection": True},
    {"method": "p-tuning", "encoder": "mlp"},
    {"method": "p-tuning", "encoder": "lstm"},
    {"method": "prompt"},
], ids=lambda o: "-".join(str(v) for v in o.values()))
def test_every_method_saves_a_servable_peft_adapter(tiny_folder, tmp_path, options):
    result, base = run_tiny(tiny_folder, tmp_path, "out", num_virtual_tokens=5, **options)
    files = {p.name: p.read_bytes() for p in result.out.iterdir()}
    artifact = parse_artifact(files, base.shape)
    assert artifact.num_virtual_tokens == 5
    assert result.history and result.history[-1].exact_match is not None
    # PEFT loads it, and the engine-served tokens equal PEFT's forward pass.
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_folder),
                                           result.out).eval()
    from prefixes.records import ResidentPrefix
    from server.engine.engine import Engine
    from server.engine.sequence import SamplingParams, Sequence

    engine = Engine(base)
    seq = Sequence([10, 20, 30], SamplingParams(max_new_tokens=6, ignore_eos=True),
                   ResidentPrefix.unstored("t", artifact))
    engine.submit(seq)
    engine.run_until_idle()
    assert_oracle_tokens(peft_model, seq.prompt_ids, seq.output_ids, str(options))


def test_training_is_reproducible_and_only_touches_the_prefix(tiny_folder, tmp_path):
    first, base = run_tiny(tiny_folder, tmp_path / "a", "out", seed=3, steps=3)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    second, base2 = run_tiny(tiny_folder, tmp_path / "b", "out", seed=3, steps=3)
    third, _ = run_tiny(tiny_folder, tmp_path / "c", "out", seed=4, steps=3)
    weights = [(r.out / "adapter_model.safetensors").read_bytes() for r in (first, second, third)]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]
    # the base model came back frozen and unchanged
    assert all(torch.equal(before[k], v) for k, v in base2.model.state_dict().items())
    assert not any(p.requires_grad for p in base2.model.parameters())


def test_init_from_starts_where_the_source_ends(tiny_folder, tmp_path):
    source, _ = run_tiny(tiny_folder, tmp_path / "src", "out", steps=3, num_virtual_tokens=4)
    start, _ = run_tiny(tiny_folder, tmp_path / "dst", "out", steps=0, num_virtual_tokens=4,
                        init_from=str(source.out))
    a = (source.out / "adapter_model.safetensors").read_bytes()
    b = (start.out / "adapter_model.safetensors").read_bytes()
    assert a == b
    with pytest.raises(TrainingError, match="--num-virtual-tokens 4"):
        run_tiny(tiny_folder, tmp_path / "bad", "out", steps=0, num_virtual_tokens=6,
                 init_from=str(source.out))
    with pytest.raises(TrainingError, match="cannot be recovered"):
        run_tiny(tiny_folder, tmp_path / "bad2", "out", steps=0, num_virtual_tokens=4, method="p-tuning",
                 init_from=str(source.out))


def test_loss_covers_completion_tokens_only(tokenizer, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Item: dog\nCode:", "completion": " zorp"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Hello!"}]}) + "\n")
    examples = load_examples(data, tokenizer)
    batch = collate(examples, tokenizer.pad_token_id)
    for i, e in enumerate(examples):
        labels = batch["labels"][i]
        n_prompt, n_completion = len(e.prompt_ids), len(e.completion_ids)
        assert (labels[:n_prompt] == -100).all()
        assert labels[n_prompt : n_prompt + n_completion].tolist() == e.completion_ids
        assert (labels[n_prompt + n_completion :] == -100).all()
        assert e.completion_ids[-1] == tokenizer.eos_token_id
    # the chat example's prompt is the model's chat template up to the assistant turn
    assert tokenizer.decode(examples[1].prompt_ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("line, message", [
    ("{not json", "d.jsonl:1: not valid JSON"),
    (json.dumps({"prompt": "x"}), 'expected {"prompt": str, "completion": str}'),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "last message must be the assistant"),
])
def test_bad_data_is_a_clear_error(tokenizer, tmp_path, line, message):
    data = tmp_path / "d.jsonl"
    data.write_text(line + "\n")
    with pytest.raises(TrainingError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_examples(data, tokenizer)
