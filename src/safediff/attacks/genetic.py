"""A genetic search over fixed-length token-id sequences (the search method of Ring-A-Bell, Tsai et al., ICLR 2024).

A plain function over tensors: it knows nothing about models. ``fitness`` maps a population ``[P, K]`` of token ids
to losses ``[P]`` (lower is better) and is called once per generation with the whole population, so the caller
can encode it in batched forward passes.

One generation, as in Ring-A-Bell's ``InversePrompt`` notebook:

1. *selection*: evaluate the population and keep the best ``population // 2`` (truncation selection);
2. *crossover*: every survivor is kept; with probability ``crossover_rate`` it also mates with a uniformly drawn
   survivor at a uniform cut point s ∈ {0..K-1}, adding both children ``a[:s] ‖ b[s:]`` and ``b[:s] ‖ a[s:]``;
3. *mutation*: each individual, with probability ``mutation_rate``, has one uniformly drawn position replaced by a
   uniformly drawn allowed token (in place).

The population therefore fluctuates around ``population`` (the best half plus ≈ two children per mating survivor);
the search returns the best sequence ever evaluated, so its loss never increases (the notebook returns the best of the
last population, which is the same unless a mutation hit the elite).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class GeneticState:
    population: torch.Tensor  # [P, K] token ids, the next population to evaluate
    best: torch.Tensor  # [K] the best sequence evaluated so far
    best_loss: float = float("inf")
    generation: int = 0
    history: list[float] = field(default_factory=list)  # best-so-far loss after each generation


def random_population(allowed: torch.Tensor, size: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``size`` sequences of ``length`` tokens drawn uniformly from ``allowed`` (a 1-D tensor of ids)."""
    return allowed[torch.randint(len(allowed), (size, length), generator=gen)]


def crossover(parents: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Survivors plus, for each that mates (prob. ``rate``), two single-point children with a random partner."""
    m, k = parents.shape
    mates = torch.rand(m, generator=gen) < rate
    partner = torch.randint(m, (m,), generator=gen)
    cut = torch.randint(k, (m,), generator=gen)
    a, b = parents[mates], parents[partner[mates]]
    left = torch.arange(k).unsqueeze(0) < cut[mates].unsqueeze(1)  # [n, K]: True left of the cut
    child1 = torch.where(left, a, b)
    child2 = torch.where(left, b, a)
    return torch.cat([parents, child1, child2])


def mutate(population: torch.Tensor, rate: float, allowed: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each row, with probability ``rate``, gets one random position set to a random allowed token."""
    p, k = population.shape
    out = population.clone()
    hit = torch.rand(p, generator=gen) < rate
    pos = torch.randint(k, (p,), generator=gen)
    tok = allowed[torch.randint(len(allowed), (p,), generator=gen)]
    rows = hit.nonzero().squeeze(1)
    out[rows, pos[rows]] = tok[rows]
    return out


def start(allowed: torch.Tensor, population: int, length: int, gen: torch.Generator) -> GeneticState:
    if population < 2 or length < 1:
        raise ValueError("population must be >= 2 and length >= 1")
    first = random_population(allowed, population, length, gen)
    return GeneticState(population=first, best=first[0].clone())


def step(state: GeneticState, fitness: Callable[[torch.Tensor], torch.Tensor], *, population: int,
         mutation_rate: float, crossover_rate: float, allowed: torch.Tensor, gen: torch.Generator) -> GeneticState:
    """Evaluate ``state.population`` once, select, then breed the next population (returned state)."""
    losses = fitness(state.population).detach().float().cpu()
    order = torch.argsort(losses, stable=True)
    if losses[order[0]].item() < state.best_loss:
        state.best_loss = float(losses[order[0]])
        state.best = state.population[order[0]].clone()
    survivors = state.population[order[: max(1, population // 2)]]
    children = crossover(survivors, crossover_rate, gen)
    state.population = mutate(children, mutation_rate, allowed, gen)
    state.generation += 1
    state.history.append(state.best_loss)
    return state
