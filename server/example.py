"""`prefix-serve example`: what the README's first task needs, made locally in seconds, nothing downloaded.

Writes into one folder:

- ``adapter/``: a PEFT prefix-tuning adapter for the served base model (``adapter_config.json`` +
  ``adapter_model.safetensors``, made by PEFT's own ``get_peft_model`` + ``save_pretrained``). It is random,
  not trained: PEFT's initial prefix, seeded and scaled down so that it changes the model's outputs without
  derailing them (the recipe of the lm-eval test in tests/api/test_clients.py). `prefix-serve train` makes
  a trained one from ``train.jsonl``.
- ``train.jsonl`` / ``heldout.jsonl``: a small task the base model cannot do zero-shot (made-up code words
  for three categories of things), in the ``{"prompt", "completion"}`` lines `prefix-serve train` reads.
- ``tasks/ps_mc.yaml`` + ``tasks/mc.jsonl``: an 8-question multiple-choice lm-eval task over local data.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import torch

# The adapter's recipe: 8 virtual tokens, PEFT's init under this seed, times this scale.
NUM_VIRTUAL_TOKENS = 8
SEED = 5
SCALE = 0.2

CATEGORIES = {
    "zorp": ["dog", "cat", "horse", "cow", "sheep", "goat", "lion", "tiger", "bear", "wolf", "fox", "rabbit",
             "mouse", "deer", "monkey", "zebra", "camel", "pig", "elephant", "giraffe"],
    "blip": ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum",
             "melon", "kiwi", "lime", "apricot", "papaya", "coconut", "fig", "guava", "strawberry",
             "pineapple"],
    "krell": ["car", "bus", "truck", "train", "bicycle", "plane", "boat", "ship", "taxi", "tram", "scooter",
              "motorcycle", "van", "helicopter", "subway", "tractor", "canoe", "yacht", "jeep", "rocket"],
}

QUESTIONS = [  # (question, choices, index of the right one); lm-eval puts " " between them
    ("The capital of France is", ["Paris", "Berlin", "Madrid"], 0),
    ("Water freezes at a temperature of zero degrees", ["Celsius", "Kelvin", "Newton"], 0),
    ("The largest planet in the solar system is", ["Mars", "Jupiter", "Venus"], 1),
    ("A week has seven", ["months", "years", "days"], 2),
    ("The opposite of hot is", ["cold", "tall", "green"], 0),
    ("Cats often chase", ["mice", "clouds", "trains"], 0),
    ("The sun rises in the", ["west", "east", "north"], 1),
    ("Two plus two equals", ["five", "three", "four"], 2),
]

LM_EVAL_TASK = """task: ps_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""


def write_adapter(model: torch.nn.Module, out: Path) -> None:
    """A PEFT prefix-tuning adapter for ``model`` (left untouched: PEFT wraps a copy) saved into ``out``."""
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(SEED)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for param in peft_model.prompt_encoder.parameters():
            param.mul_(SCALE)
    peft_model.save_pretrained(str(out), safe_serialization=True)


def write_training_data(out: Path) -> tuple[Path, Path]:
    """60 code-word examples, shuffled with a fixed seed: 45 to train on, 15 held out."""
    rows = [{"prompt": f"Item: {word}\nCode:", "completion": f" {label}"}
            for label, words in CATEGORIES.items() for word in words]
    random.Random(0).shuffle(rows)
    train, heldout = out / "train.jsonl", out / "heldout.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows[15:]))
    heldout.write_text("".join(json.dumps(row) + "\n" for row in rows[:15]))
    return train, heldout


def write_lm_eval_task(out: Path) -> Path:
    """``out/tasks``: lm-eval's ``--include_path``; the YAML names its data by absolute path, so lm-eval
    finds it from any working directory."""
    tasks = out / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    data = tasks / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": label}) + "\n"
                            for q, c, label in QUESTIONS))
    (tasks / "ps_mc.yaml").write_text(LM_EVAL_TASK.format(data=json.dumps(str(data.resolve()))))
    return tasks


def make_example(out: Path, model: torch.nn.Module) -> list[Path]:
    """Everything above into ``out`` (created; files already there are overwritten). Returns what it wrote."""
    out.mkdir(parents=True, exist_ok=True)
    write_adapter(model, out / "adapter")
    train, heldout = write_training_data(out)
    tasks = write_lm_eval_task(out)
    return [out / "adapter", train, heldout, tasks]
