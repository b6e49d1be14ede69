"""``TokenHistory``: the token state the logits processors read for a batch (prompt + generated ids, the "seen"
and count tables), updated once per step with tensor ops only."""
from __future__ import annotations

from typing import Any, Sequence

import torch

PAD = -1                  # filler of TokenHistory.ids left of a row's first token; never equal to a token id


class TokenHistory:
    """The token state processors read, for a batch of sequences; updated once per step with tensor ops.

    Attributes:
        vocab_size, device.
        ids: (B, W) long, each row's prompt + generated ids, right-aligned; left of a row's first token: ``PAD``
            (-1). Prompt ids outside the vocabulary are kept here but ignored by ``seen``.
        num_generated: (B,) long, generated tokens per row (those given at construction plus those appended).
        seen: (B, V) bool, the ids in prompt + generated (built on first use, then kept up to date).
        counts: (B, V) int32, occurrences in the generated ids only (built on first use, then kept up to date).
    """

    def __init__(self, prompts: Sequence[Sequence[int]], vocab_size: int, device: Any = None,
                 generated: Sequence[int] | None = None):
        """Args:
            prompts: each row's ids so far.
            vocab_size, device: as the attributes.
            generated: how many of each row's last ids were generated (the rest is its prompt); default none.
                Rows joining a running batch (``prosa.engine``) have generated different amounts.
        """
        self.vocab_size = int(vocab_size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        prompts = [[int(t) for t in p] for p in prompts]
        lens = [len(p) for p in prompts]
        gen = [0] * len(prompts) if generated is None else [int(g) for g in generated]
        if len(gen) != len(prompts) or any(not 0 <= g <= n for g, n in zip(gen, lens)):
            raise ValueError("generated: one count per row, each between 0 and the row's length")
        width = max(lens, default=0)
        rows = [[PAD] * (width - len(p)) + p + [PAD] * 16 for p in prompts]
        self._buf = torch.tensor(rows, dtype=torch.long).reshape(len(prompts), width + 16).to(self.device)
        self._width = width
        self.num_generated = torch.tensor(gen, dtype=torch.long, device=self.device)
        self._seen: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self._buf.shape[0]

    @property
    def ids(self) -> torch.Tensor:
        return self._buf[:, :self._width]

    def _table(self, ids: torch.Tensor) -> torch.Tensor:
        """Scatter indices for a (B, V + 1) table: PAD and out-of-vocabulary ids go to the spare last column."""
        v = self.vocab_size
        return torch.where((ids >= 0) & (ids < v), ids, v)

    @property
    def seen(self) -> torch.Tensor:
        if self._seen is None:
            table = torch.zeros((self.batch_size, self.vocab_size + 1), dtype=torch.bool, device=self.device)
            table.scatter_(1, self._table(self.ids), True)
            self._seen = table[:, :self.vocab_size].contiguous()
        return self._seen

    @property
    def counts(self) -> torch.Tensor:
        if self._counts is None:
            # Each row's generated ids are its last num_generated columns; other columns count into the spare one.
            col = torch.arange(self._width, device=self.device)
            mine = col[None, :] >= self._width - self.num_generated[:, None]
            gen = torch.where(mine, self._table(self.ids), self.vocab_size)
            table = torch.zeros((self.batch_size, self.vocab_size + 1), dtype=torch.int32, device=self.device)
            table.scatter_add_(1, gen, torch.ones_like(gen, dtype=torch.int32))
            self._counts = table[:, :self.vocab_size].contiguous()
        return self._counts

    def append(self, tokens: torch.Tensor) -> None:
        """Add one new token per row: ``tokens`` (B,) of ids in [0, vocab_size)."""
        tokens = torch.as_tensor(tokens).to(device=self.device, dtype=torch.long).reshape(-1)
        if tokens.shape[0] != self.batch_size:
            raise ValueError(f"append needs one token per sequence ({self.batch_size}), got {tokens.shape[0]}")
        if self._width == self._buf.shape[1]:   # grow by doubling: amortised O(B) per step
            more = torch.full((self.batch_size, max(16, self._width)), PAD, dtype=torch.long, device=self.device)
            self._buf = torch.cat([self._buf, more], dim=1)
        self._buf[:, self._width] = tokens
        self._width += 1
        self.num_generated += 1
        col = tokens[:, None]
        if self._seen is not None:
            self._seen.scatter_(1, col, True)
        if self._counts is not None:
            self._counts.scatter_add_(1, col, torch.ones_like(col, dtype=torch.int32))
