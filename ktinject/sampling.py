"""Token sampling on the logits' device: greedy, temperature, top-k, top-p, seeded.

Sampling stays on the GPU so the decode loop never copies a vocabulary-sized tensor to the host;
only the chosen token id is read back (for streaming and stop checks).
"""

from __future__ import annotations

import torch

from ktinject.settings import SamplingParams

TOP_P_CANDIDATES = 256  # entries a CPU orders before falling back to a full sort (top_p_filter)
# the least temperature the scores are divided by: a smaller one rounds to 0 in float32, which
# makes the best entry 0 / 0 (NaN); this one already gives probability 0 to every entry more
# than ~1e-36 below the best
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A seeded generator for reproducible sampling, or None (global RNG / greedy)."""
    if params.greedy or params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick one token per row of `logits` [B, V]; returns int64 [B] on the same device. Each row
    is scaled relative to its best entry (which becomes 0): a tiny temperature then sends the
    others to -inf rather than every entry to +-inf, whose softmax is NaN."""
    if params.greedy:
        return logits.argmax(dim=-1)
    scores = logits.float()
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / max(params.temperature, MIN_TEMPERATURE)
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        scores = top_p_filter(scores, params.top_p)
    return draw(scores.softmax(dim=-1), generator)


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """`scores` [B, V] with -inf outside the smallest set of best entries whose probability
    reaches `top_p` (the best entry always stays). That set needs the entries in order. A full
    sort of SmolLM2's 49,152 entries takes ~2.5 ms per row on the 2-core EPYC (2026-11-28), so
    on a CPU the order comes from a partial sort of the best `TOP_P_CANDIDATES` whenever those
    already hold `top_p` of every row's mass (entries past them are cut either way): ~0.15 ms
    per row. Checking that reads a value on the host, which a GPU step must not do; a GPU sorts
    in microseconds."""
    probs = scores.softmax(dim=-1)
    if scores.device.type == "cpu" and scores.shape[-1] > TOP_P_CANDIDATES:
        best, order = probs.topk(TOP_P_CANDIDATES, dim=-1)  # in descending order
        if bool((best.sum(dim=-1) >= top_p).all()):
            return _keep_leading_mass(scores, best, order, top_p)
    best, order = probs.sort(dim=-1, descending=True)
    return _keep_leading_mass(scores, best, order, top_p)


def _keep_leading_mass(
    scores: torch.Tensor, best: torch.Tensor, order: torch.Tensor, top_p: float
) -> torch.Tensor:
    """Keep the entries `order` lists (probabilities `best`, descending) until the mass before
    one reaches `top_p`; every other entry of `scores` becomes -inf. The first entry always
    stays: a `top_p` below float32's smallest number compares as 0, which its mass before (0)
    reaches."""
    drop = (best.cumsum(dim=-1) - best) >= top_p
    drop[..., 0] = False
    kept = scores.gather(-1, order).masked_fill(drop, float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter(-1, order, kept)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of `probs` [B, V], each with its probability: one uniform number per
    row, looked up in the cumulative distribution (in float64, so a 150k-entry vocabulary's
    sum stays exact to ~1e-12). `torch.multinomial` draws a random number per vocabulary entry
    on CPUs: 1.05 ms per row of 49,152 on the 2-core EPYC (2026-11-28), against ~0.03 ms here.
    An entry of probability 0 (cut by top-k / top-p) is never chosen: the lookup takes the first
    cumulative sum strictly above the draw, and the draw stays below the total."""
    cumulative = probs.double().cumsum(dim=-1)
    shape = (probs.shape[0], 1)
    uniform = torch.rand(shape, generator=generator, device=probs.device, dtype=torch.float64)
    return torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True).squeeze(-1)
