"""NEFTune's noise: each token gets its own sample's magnitude, packed or padded."""

from __future__ import annotations

import math

import pytest
import torch

from sala_train.data.collators import PadToLongestCollator
from sala_train.errors import ModelLoadError
from sala_train.neftune import NoisyEmbeddings
from sala_train.packing import PackedCollator

ALPHA, WIDTH, PAD = 5.0, 64, 0
LENGTHS = (5, 17, 40)


class Embedder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, WIDTH)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed


def features() -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in LENGTHS:
        ids = torch.randint(1, 100, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


# Each layout's tokens by the length of the sample they belong to (0: padding or filler), written
# out from how the collators lay the three samples down, not computed by the code under test.
PADDED = [[5] * 5 + [0] * 35, [17] * 17 + [0] * 23, [40] * 40]
ONE_ROW = [[5] * 5 + [17] * 17 + [40] * 40]
ROWS_OF_45 = [[5] * 5 + [17] * 17 + [0] * 18, [40] * 40]  # (first fit: 40 does not fit after 22)


@pytest.mark.parametrize(
    ("collator", "expected"),
    [
        (PadToLongestCollator(PAD), PADDED),
        (PackedCollator(PAD), ONE_ROW),
        (PackedCollator(PAD, row_tokens=45), ROWS_OF_45),
    ],
    ids=["padded", "packed-one-row", "packed-rows-with-filler"],
)
def test_each_token_gets_noise_of_its_own_samples_length(collator, expected):
    """|noise| <= alpha / sqrt(L * d) with L the token's own sample's length, and reaches it (the
    largest of L * d uniform draws): transformers' hook took L as the row's width, which gives a
    5-token sample in a 62-token packed row 0.28 of its magnitude, and padding noise too."""
    torch.manual_seed(1)
    model = Embedder().train()
    batch = collator(features())
    lengths = torch.tensor(expected, dtype=torch.float32)
    assert batch["input_ids"].shape == lengths.shape
    noisy = NoisyEmbeddings(model, ALPHA, PAD)
    clean = model.embed(batch["input_ids"])
    with noisy.during(batch):
        noise = model.embed(batch["input_ids"]) - clean
    bound = torch.where(lengths > 0, ALPHA / torch.sqrt(lengths.clamp(min=1) * WIDTH), 0.0)
    assert torch.all(noise.abs().amax(dim=-1) <= bound * (1 + 1e-5) + 1e-7)
    assert torch.all(noise[lengths == 0] == 0)
    for n in LENGTHS:
        # Uniform over (-bound, bound): its largest draw near the bound, its mean near 0, half of
        # the draws on each side of 0 and half within bound / 2 (a shift or a one-sided draw fails).
        scaled = noise[lengths == n].flatten() / (ALPHA / math.sqrt(n * WIDTH))
        assert scaled.abs().max() >= 0.95, n
        assert abs(scaled.mean()) < 0.1, n
        assert 0.4 < (scaled > 0).float().mean() < 0.6, n
        assert 0.4 < (scaled.abs() < 0.5).float().mean() < 0.6, n


def test_no_noise_outside_a_training_step_and_none_missed_inside_one():
    """Evaluation (eval mode) and a forward outside ``during`` (the packing guard's) get the
    embeddings as they are; a training step whose embeddings see the batch otherwise (split, as
    DataParallel would) or not at all stops the run rather than train on without the noise."""
    model = Embedder()
    batch = PadToLongestCollator(PAD)(features())
    noisy = NoisyEmbeddings(model, ALPHA, PAD)
    ids = batch["input_ids"]
    clean = model.embed.weight[ids]
    model.train()
    assert model.embed(ids).equal(clean)
    with noisy.during(batch):
        assert not model.embed(ids).equal(clean)
        model.eval()
        assert model.embed(ids).equal(clean)
    model.train()
    split = r"ran on \(3, 20\) tokens where the training batch has \(3, 40\)"
    with pytest.raises(ModelLoadError, match=split), noisy.during(batch):
        model.embed(ids[:, :20])
    with pytest.raises(ModelLoadError, match="did not run on the training batch"), noisy.during(batch):
        pass
    noisy.handle.remove()


def test_each_rank_and_micro_batch_draws_its_own_noise_the_same_on_every_run():
    """The noise comes from a generator seeded by seed, rank, step and micro-batch: ranks with
    batches of one shape drew the same noise from the global generator, which they seed alike; a
    resumed run draws what the uninterrupted one drew at that step."""
    model = Embedder().train()
    batch = PadToLongestCollator(PAD)(features())
    ids = batch["input_ids"]

    def noise(seed: int, rank: int, step: int, micro: int) -> torch.Tensor:
        noisy = NoisyEmbeddings(model, ALPHA, PAD, seed)
        try:
            with noisy.during(batch, rank, step, micro):
                return model.embed(ids) - model.embed.weight[ids]
        finally:
            noisy.handle.remove()

    first = noise(42, 0, 7, 0)
    torch.manual_seed(123)  # (the global generator has no say)
    assert noise(42, 0, 7, 0).equal(first)
    for other in ((42, 1, 7, 0), (42, 0, 8, 0), (42, 0, 7, 1), (43, 0, 7, 0)):
        assert not noise(*other).equal(first), other
