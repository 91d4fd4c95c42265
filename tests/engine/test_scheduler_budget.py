"""How one step's token budget is split: one token per decoding row, then the rest of each unfinished
prefill in row order; what is left is what the scheduler may admit. Plain Sequences, no model."""

from __future__ import annotations

import pytest

from server.engine.runner import num_decoding, prefill_budget
from server.engine.sequence import SamplingParams, Sequence


def decoding() -> Sequence:
    seq = Sequence([1, 2, 3], SamplingParams(max_new_tokens=4))
    seq.num_computed = seq.input_len
    seq.output_ids.append(7)
    return seq


def prefilling(prompt: int, computed: int = 0) -> Sequence:
    """A row ``computed`` tokens into a ``prompt``-token prefill."""
    seq = Sequence(list(range(1, prompt + 1)), SamplingParams(max_new_tokens=4))
    seq.num_computed = computed
    return seq


@pytest.mark.parametrize(("rows", "step_tokens", "expected"), [
    ([], 16, 16),  # an idle batch: the whole step is for joining prompts
    ([decoding()] * 3, 16, 13),  # a token per decoding row
    ([decoding()] * 16, 16, 0),  # exactly spent on decoding
    ([decoding()] * 20, 16, 0),  # more decoding rows than the step holds: nothing, never negative
    ([decoding(), decoding(), prefilling(12)], 16, 2),  # 2 + 12
    ([decoding(), decoding(), prefilling(12, computed=10)], 16, 12),  # only the prompt's rest counts: 2 + 2
    ([decoding(), decoding(), prefilling(14)], 16, 0),  # the prefill takes exactly what is left
    ([decoding(), prefilling(40, computed=5)], 16, 0),  # a long prefill takes the whole rest of the step
    ([decoding(), prefilling(5), prefilling(6)], 16, 4),  # 1 + 5 + 6, in row order
    ([decoding(), prefilling(5), prefilling(20)], 16, 0),  # the second prefill is cut at the step's end
    ([prefilling(3), prefilling(4)], 16, 9),  # no row decodes yet
], ids=["idle", "decode", "decode-exact", "decode-over", "prefill", "prefill-rest", "prefill-exact",
        "prefill-long", "two-prefills", "two-prefills-cut", "prefill-only"])
def test_prefill_budget(rows, step_tokens, expected):
    assert prefill_budget(rows, step_tokens) == expected


def test_decoding_rows_are_the_prefilled_ones_before_the_first_unfinished():
    assert num_decoding([]) == 0
    assert num_decoding([decoding(), decoding()]) == 2
    assert num_decoding([decoding(), decoding(), prefilling(4, computed=2)]) == 2
    assert num_decoding([prefilling(4, computed=4)]) == 1  # a prefill just completed: it samples this step
    assert num_decoding([prefilling(4, computed=1), prefilling(3)]) == 0
