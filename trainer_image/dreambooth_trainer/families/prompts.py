"""Frozen text encoders' outputs kept by prompt, each prompt encoded alone (SDXL, Flux).

diffusers' SDXL and Flux LoRA scripts encode a run's fixed prompts once and free both text encoders; with
per-image captions they encode every batch. Here every prompt — one row of token ids — is encoded on its own and
kept: a batch's outputs are its rows' outputs stacked in batch order, the same numbers whatever batch, rank or
attempt a prompt comes in (exact resume), and once the run's fixed prompts are in, the encoders can be freed
(`ModelFamily.encode_fixed_prompts`): a sealed cache never evicts and never encodes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

# One batch of prompt ids (rows first, on the host) -> the encoders' outputs, each with the rows first.
RowEncoder = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]

# Captioned runs keep the encoders and the latest prompts (Flux: T5's 512 x 4096 states, 4 MB a prompt in bf16).
DEFAULT_LIMIT = 64


class PromptNotEncoded(RuntimeError):
    """A prompt outside the run's fixed prompts after the text encoders were freed: a bug, never bad input."""


class PromptRows:
    """The outputs of frozen text encoders by prompt ids, in least-recently-used order."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self.sealed = False
        self._rows: OrderedDict[bytes, tuple[torch.Tensor, ...]] = OrderedDict()
        self.encoded = 0  # encoder calls so far, one per new prompt

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, ids: torch.Tensor, encode: RowEncoder | None) -> tuple[torch.Tensor, ...]:
        """The outputs for a batch of ids: kept rows as they are, new rows encoded one at a time by `encode`.
        Give the batch's ids on the host: finding a kept prompt then never waits for the device."""
        found = []
        for i, row in enumerate(ids.cpu()):
            key = row.numpy().tobytes() + str(tuple(row.shape)).encode()
            out = self._rows.get(key)
            if out is None:
                if self.sealed or encode is None:
                    raise PromptNotEncoded(
                        f"prompt ids {row.flatten()[:8].tolist()}... were not among the run's fixed prompts, and the "
                        "text encoders that would encode them were freed"
                    )
                with torch.no_grad():
                    out = encode(ids[i : i + 1])
                self.encoded += 1
                self._rows[key] = out
                if len(self._rows) > self.limit:
                    self._rows.popitem(last=False)
            else:
                self._rows.move_to_end(key)
            found.append(out)
        return tuple(torch.cat(column, dim=0) for column in zip(*found, strict=True))

    def seal(self) -> None:
        """Nothing new from now on: every prompt the run will see is kept (its encoders are about to be freed)."""
        self.sealed = True
