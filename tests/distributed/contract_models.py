"""Small models and data for the ports of PyTorch's own clipping tests (CPU, gloo).

* :class:`TiedLM`: an embedding whose weight is also the output projection (the
  shared parameters of torch's ``TransformerWithSharedParams``), an encoder and a
  decoder :class:`Block`; FSDP1 wraps each block as its own unit.
* :class:`TwoBlocks`: two :class:`Block` s whose layers tensor parallelism splits
  evenly over 2 ranks (torch's FSDP2 tests use a Transformer; every parameter here
  lives on the 2-D mesh, as there).

Every rank draws its own batch from a seed derived from its data-parallel rank, so
data-parallel ranks see different data and DDP averages their gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

VOCAB = 11
WIDTH = 8
SEQ = 6


class Block(nn.Module):
    """``x + fc2(tanh(fc1(x)))`` with ``fc1: WIDTH -> 2 WIDTH``, ``fc2`` back."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, 2 * WIDTH)
        self.fc2 = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(torch.tanh(self.fc1(x)))


class TiedLM(nn.Module):
    """Tokens -> embedding -> encoder -> decoder -> logits by the tied embedding weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.encoder = Block()
        self.decoder = Block()
        self.head = nn.Linear(WIDTH, VOCAB)
        self.head.weight = self.embed.weight  # shared, as torch's TransformerWithSharedParams

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.decoder(self.encoder(self.embed(tokens))))


class TwoBlocks(nn.Module):
    """Two :class:`Block` s on ``(batch, WIDTH)`` inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def make(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    """A fresh ``cls()`` initialised from ``seed`` (the global RNG is left alone)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls()


def tokens(dp_rank: int, step: int) -> Tensor:
    """This data-parallel rank's batch of token ids for ``step`` (4 x SEQ)."""
    gen = torch.Generator().manual_seed(1000 * step + dp_rank)
    return torch.randint(0, VOCAB, (4, SEQ), generator=gen)


def features(dp_rank: int, step: int) -> Tensor:
    """This data-parallel rank's batch of inputs for ``step`` (4 x WIDTH)."""
    gen = torch.Generator().manual_seed(1000 * step + dp_rank)
    return torch.randn(4, WIDTH, generator=gen)
