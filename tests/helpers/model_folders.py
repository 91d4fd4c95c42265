"""Model folders as users hand them to ``serve --model DIR``: a tiny random model of one family, saved with
``save_pretrained`` next to a tokenizer that fits its 256-token vocabulary, built offline.

The tokenizer is byte-level (GPT-2's byte-to-character map, a BPE with no merges), the kind llguidance builds
its token tables from: ids 0-3 are ``<pad>``, ``<s>``, ``</s>`` and ``<unk>`` (the tiny configs' pad/bos/eos
ids, tests/helpers/support.py ``_IDS``), then one token per byte: printable ASCII and newline first, then
the other bytes until the vocabulary is full. ASCII text encodes to one id per character, within the
model's vocabulary, and decodes back to itself.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from tests.helpers.support import VOCAB, tiny_model

SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")


def _byte_chars() -> dict[int, str]:
    """GPT-2's ``bytes_to_unicode``: byte -> the printable character ByteLevel tokenizers spell it with."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = dict(zip(kept, kept))
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {b: chr(c) for b, c in chars.items()}


_ORDER = [*range(32, 127), 10, *(b for b in range(256) if b not in (10, *range(32, 127)))]
_CHARS = [_byte_chars()[b] for b in _ORDER]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A ``VOCAB``-token byte-level tokenizer (no download), with a plain chat template."""
    vocab = {token: i for i, token in enumerate([*SPECIAL, *_CHARS][:VOCAB])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_family(arch: str, folder: Path, seed: int = 0) -> PreTrainedModel:
    """Save a tiny random model of ``arch`` (a tests/helpers/support.py TINY_CONFIGS key) and its tokenizer
    to ``folder``, as ``save_pretrained`` lays them out; returns the in-process model (the reference)."""
    model = tiny_model(arch, seed=seed)
    # the tokenizer's special ids, which some tiny configs leave at their family's defaults, outside the
    # 256-token vocabulary (GPT-2's 50256); llguidance refuses an EOS it cannot index
    for config in (model.config, model.generation_config):
        config.pad_token_id, config.bos_token_id, config.eos_token_id = range(3)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return model
