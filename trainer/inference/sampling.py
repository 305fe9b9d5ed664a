"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from trainer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; the defaults are greedy."""

    temperature: float = 0.0  # 0: the most likely token; otherwise logits / temperature are sampled
    top_k: int = 0  # sample among the k most likely tokens only; 0 = all
    top_p: float = 1.0  # sample among the fewest most likely tokens whose probabilities add up to p; 1 = all

    def check(self) -> None:
        """Values out of range are a one-line error."""
        if self.temperature < 0:
            raise ConfigError(f'--temperature={self.temperature} must be 0 (greedy) or positive.')
        if self.top_k < 0:
            raise ConfigError(f'--top_k={self.top_k} must be 0 (off) or positive.')
        if not 0 < self.top_p <= 1:
            raise ConfigError(f'--top_p={self.top_p} must be in (0, 1].')


GREEDY = Sampling()


def keep_top_k(logits_BV: jax.Array, k: int) -> jax.Array:
    """Logits with all but the k largest of each row set to -inf (ties at the k-th all kept)."""
    if k <= 0 or k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
    return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def keep_top_p(logits_BV: jax.Array, p: float | jax.Array) -> jax.Array:
    """Logits outside the smallest set of most likely tokens whose probabilities reach p set to -inf; p is one
    number, or one per row, shape (B, 1)."""
    if isinstance(p, float) and p >= 1.0:
        return logits_BV
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probabilities_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probabilities_BV, axis=-1) - probabilities_BV  # mass of the more likely tokens
    kept_BV = (before_BV < p) | (p >= 1.0)  # the most likely token always stays; p = 1 keeps all
    threshold_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)


def next_tokens(logits_BV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """One token id per row (int32)."""
    if sampling.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = keep_top_p(keep_top_k(logits_BV / sampling.temperature, sampling.top_k), sampling.top_p)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def keep_top_k_per_row(logits_BV: jax.Array, k_B: jax.Array) -> jax.Array:
    """keep_top_k with each row's own k (0 = all), for rows of different requests in one batch."""
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    kth_B1 = jnp.take_along_axis(sorted_BV, jnp.clip(k_B - 1, 0, logits_BV.shape[-1] - 1)[:, None], axis=-1)
    kth_B1 = jnp.where(k_B[:, None] > 0, kth_B1, -jnp.inf)
    return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def next_tokens_per_row(
    logits_BV: jax.Array, keys_B: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array
) -> jax.Array:
    """next_tokens with each row's own key and Sampling (given as arrays); a row with temperature 0 is greedy.

    The full-vocabulary sorts of top-k and top-p run only when some row asks for them (lax.cond runs one branch):
    a batch of greedy rows costs an argmax, as next_tokens' greedy path does. Skipping a filter no row uses
    changes nothing: k = 0 and p = 1 keep every token.
    """
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def unchanged(logits_BV: jax.Array, _) -> jax.Array:
        return logits_BV

    def sample(logits_BV: jax.Array) -> jax.Array:
        scaled_BV = logits_BV / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
        scaled_BV = jax.lax.cond(jnp.any(top_k_B > 0), keep_top_k_per_row, unchanged, scaled_BV, top_k_B)
        scaled_BV = jax.lax.cond(jnp.any(top_p_B < 1), keep_top_p, unchanged, scaled_BV, top_p_B[:, None])
        sampled_B = jax.vmap(lambda key, logits_V: jax.random.categorical(key, logits_V))(keys_B, scaled_BV)
        return jnp.where(temperature_B > 0, sampled_B.astype(jnp.int32), greedy_B)

    return jax.lax.cond(jnp.any(temperature_B > 0), sample, lambda _: greedy_B, logits_BV)
