"""PromptRows: frozen text encoders' outputs by prompt, each prompt encoded alone, freed encoders never called."""

from __future__ import annotations

import pytest
import torch

from dreambooth_trainer.families.prompts import PromptNotEncoded, PromptRows


class Encoder:
    """A text encoder stand-in that records the batches it was given: outputs (states, pooled) from the ids."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append([int(row[0]) for row in ids])
        states = ids.float().unsqueeze(-1).repeat(1, 1, 2)
        return states, ids.float().sum(dim=1, keepdim=True)


def ids(*prompts: int) -> torch.Tensor:
    """A batch of token-id rows: prompt p is the row [p, p+1, p+2]."""
    return torch.tensor([[p, p + 1, p + 2] for p in prompts])


@pytest.mark.parametrize(
    ("batches", "encoded"),
    [
        ([(1, 1, 2, 2)], [[1], [2]]),  # an instance/class batch: each prompt once, alone
        ([(1, 2), (1, 2), (2, 1)], [[1], [2]]),  # the same prompts in other batches: nothing new
        ([(1,), (3, 1), (4,)], [[1], [3], [4]]),  # captions: each new prompt on its own
    ],
)
def test_each_prompt_is_encoded_once_and_alone(batches: list[tuple[int, ...]], encoded: list[list[int]]) -> None:
    rows, encoder = PromptRows(), Encoder()
    for batch in batches:
        rows.get(ids(*batch), encoder)
    assert encoder.calls == encoded and rows.encoded == len(encoded)


def test_a_batch_is_its_rows_outputs_in_batch_order() -> None:
    rows, encoder = PromptRows(), Encoder()
    rows.get(ids(2), encoder)
    states, pooled = rows.get(ids(1, 2, 1), encoder)
    want_states, want_pooled = encoder(ids(1, 2, 1))
    assert torch.equal(states, want_states) and torch.equal(pooled, want_pooled)


def test_least_recently_used_prompts_go_beyond_the_limit() -> None:
    rows, encoder = PromptRows(limit=2), Encoder()
    for p in (1, 2, 1, 3):  # 2 is the least recently used when 3 comes
        rows.get(ids(p), encoder)
    assert len(rows) == 2
    rows.get(ids(1, 3), encoder)
    rows.get(ids(2), encoder)
    assert encoder.calls == [[1], [2], [3], [2]]


def test_sealed_rows_serve_the_fixed_prompts_and_refuse_any_other() -> None:
    rows, encoder = PromptRows(limit=1), Encoder()
    rows.get(ids(1), encoder)
    rows.seal()
    assert torch.equal(rows.get(ids(1, 1), None)[1], encoder(ids(1, 1))[1])
    with pytest.raises(PromptNotEncoded, match="fixed prompts"):
        rows.get(ids(5), Encoder())
    with pytest.raises(PromptNotEncoded):
        PromptRows().get(ids(1), None)  # no encoder and nothing kept
