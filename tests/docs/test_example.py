"""`prefix-serve example`: the README's first task starts from what it writes, so it must be what it says.

(tests/docs/test_doc_commands.py runs the README's own commands on it against a real server: the upload
is accepted and generation with the task works.)
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel

from prefixes.formats import parse_artifact
from tests.helpers.adapters import read_dir
from tests.helpers.server_process import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    out = tmp_path_factory.mktemp("example") / "example"
    done = subprocess.run([sys.executable, "-m", "server.cli", "example", "--out", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {out / 'adapter'}" in done.stdout
    return out


def test_the_adapter_is_a_peft_prefix_that_changes_the_default_models_output(example, default_model,
                                                                             tokenizer):
    files = read_dir(example / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert json.loads(files["adapter_config.json"])["peft_type"] == "PREFIX_TUNING"
    artifact = parse_artifact(files, default_model.shape)  # what an upload does
    assert artifact.num_virtual_tokens == 8
    # PEFT wraps the model it is given in place: a copy keeps the session's default model bare
    peft = PeftModel.from_pretrained(copy.deepcopy(default_model.model), example / "adapter").eval()
    ids = torch.tensor([tokenizer("The capital of France is").input_ids])
    with torch.no_grad():
        adapted = peft(input_ids=ids).logits[0, -1]
        with peft.disable_adapter():
            bare = peft(input_ids=ids).logits[0, -1]
    assert torch.isfinite(adapted).all()
    assert not torch.allclose(adapted, bare, atol=1e-3)  # a prefix that changes nothing would teach nothing


def test_the_training_data_and_the_lm_eval_task_are_complete(example):
    train = [json.loads(line) for line in (example / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (example / "heldout.jsonl").read_text().splitlines()]
    assert (len(train), len(heldout)) == (45, 15)
    assert all(set(row) == {"prompt", "completion"} for row in train + heldout)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    task = yaml.safe_load((example / "tasks" / "ps_mc.yaml").read_text())
    data = task["dataset_kwargs"]["data_files"]["test"]
    questions = [json.loads(line) for line in Path(data).read_text().splitlines()]
    assert task["task"] == "ps_mc" and len(questions) == 8
    assert all(0 <= q["label"] < len(q["choices"]) for q in questions)
