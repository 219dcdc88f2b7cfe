"""The score network: a permutation-equivariant transformer over padded sets.

Given noisy elements ``z_t[batch, n, d]``, a mask ``[batch, n]`` (True for real elements) and the
diffusion time, it predicts the noise ``eps`` that was added to every element. There are no positional
encodings, so permuting the elements permutes the output the same way; masked attention means no real
element ever attends to padding, so padded values cannot change a real element's output.

Blocks are pre-LayerNorm (Xiong et al. 2020, arXiv:2002.04745). Conditioning (time, the set's
size, optional class, optional continuous context) is summed into one vector that is added to every
element at the start of every block, or, with ``conditioning="adaln"``, sets the scale, shift and
gate of every block's LayerNorms and branches (DiT's adaLN-Zero). The size must be given explicitly: softmax
attention averages, so without it a set and the same set with every element duplicated would get
the same output, while the scale of a feature such as a particle's momentum fraction depends
strongly on how many particles share the jet. The output layer starts at zero, so the untrained model predicts
``eps = 0``. Options: induced set attention (ISAB, Lee et al. 2019, arXiv:1810.00825) for long sets,
and element-wise residual MLPs used as encoder/decoder for latent diffusion.

Speed: every per-element layer (projections, MLPs, LayerNorms) acts on the elements as one
``[batch * n, width]`` matrix (:func:`rowwise`): XLA's CPU backend computes the weight gradient of
a dense layer on a 3-D ``[batch, n, width]`` input about 3x slower than on the same rows as a
matrix. Keys and values come from one projection of twice the width. Together these took the
training step of the 128-wide, 4-layer model from 580 to 620-720 jets/s on a 2-core CPU
(benchmarks/README.md).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

CONDITIONINGS = ("additive", "adaln")
COND_DROPS = ("class_and_context", "context")


def sinusoidal_embedding(position, dim: int, max_period: float = 10_000.0):
    """Sinusoidal embedding of a position ``[batch]`` (Vaswani et al. 2017, sec. 3.5): sines and
    cosines of ``position`` at ``dim / 2`` frequencies from 1 down to ``1 / max_period``."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = position.astype(jnp.float32)[:, None] * freqs[None, :]
    embedding = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if dim % 2:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


def timestep_embedding(t, dim: int):
    """Sinusoidal embedding of diffusion times ``t`` in [0, 1], as positions ``1000 t`` (DDPM's)."""
    return sinusoidal_embedding(1000.0 * t, dim)


def rowwise(layer, h):
    """Apply a per-element ``layer`` to ``h[..., width]`` as one ``[rows, width]`` matrix."""
    out = layer(h.reshape(-1, h.shape[-1]))
    return out.reshape(*h.shape[:-1], out.shape[-1])


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, sec. 3.2) of ``queries[batch,
    m, width]`` over ``keys_values[batch, n, width]``; ``mask[batch, n]`` (True = real) hides
    padded keys, so padding never reaches a real element. Softmax in float32 (``jax.nn``)."""

    n_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, keys_values, mask=None, bias=None):
        """``bias[batch, n_heads, m, n]``, if given, is added to the attention logits."""
        (batch, m, width), n = queries.shape, keys_values.shape[1]
        if width % self.n_heads:
            raise ValueError(f"the width {width} does not divide into n_heads={self.n_heads} heads")
        heads = (self.n_heads, width // self.n_heads)
        query = rowwise(nn.Dense(width, dtype=self.dtype, name="query"), queries).reshape(batch, m, *heads)
        key_value = rowwise(nn.Dense(2 * width, dtype=self.dtype, name="key_value"), keys_values)
        key, value = (part.reshape(batch, n, *heads) for part in jnp.split(key_value, 2, axis=-1))
        key_mask = None if mask is None else mask[:, None, None, :]
        if bias is not None:
            bias = bias.astype(query.dtype)
        attended = jax.nn.dot_product_attention(query, key, value, bias=bias, mask=key_mask).reshape(batch, m, width)
        return rowwise(nn.Dense(width, dtype=self.dtype, name="out"), attended)


class FeedForward(nn.Module):
    """Position-wise MLP of a transformer block: Dense -> GELU -> Dense."""

    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        width = h.shape[-1]
        h = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype)(h))
        return nn.Dense(width, dtype=self.dtype)(h)


class SetAttentionBlock(nn.Module):
    """Pre-LN transformer block: ``h += Attn(LN(h)); h += MLP(LN(h))``, conditioned on ``cond[batch, c]``.

    ``conditioning="additive"`` adds ``Dense(cond)`` to every element before the block.
    ``conditioning="adaln"`` is DiT's adaLN-Zero (Peebles & Xie 2023, arXiv:2212.09748, sec. 3.2):
    ``cond`` sets a shift and a scale of each LayerNorm's output and a gate of each residual branch,
    ``h += gate * Attn(LN(h) * (1 + scale) + shift)``; the gates start at zero, so every block starts
    as the identity and the conditioning (time, size, class) acts on every feature of every element
    multiplicatively, not only as one added vector.

    With ``n_inducing > 0`` the self-attention is replaced by induced set attention (ISAB):
    ``m`` learned inducing points attend to the real elements, then the elements attend to those
    ``m`` summaries, costing O(n m) instead of O(n^2).
    """

    n_heads: int
    mlp_hidden: int
    conditioning: str
    n_inducing: int = 0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, mask, cond, pair_bias=None):
        width = h.shape[-1]
        adaptive = self.conditioning == "adaln"
        if adaptive:
            modulation = nn.Dense(6 * width, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="adaln")(cond)
            shift_1, scale_1, gate_1, shift_2, scale_2, gate_2 = (part[:, None, :] for part in jnp.split(modulation, 6, axis=-1))
            modulate = lambda x, shift, scale: x * (1 + scale) + shift  # noqa: E731
        else:
            h = h + nn.Dense(width, dtype=self.dtype, name="cond")(cond)[:, None, :]
        x = rowwise(nn.LayerNorm(dtype=self.dtype, use_scale=not adaptive, use_bias=not adaptive), h)
        if adaptive:
            x = modulate(x, shift_1, scale_1)
        if self.n_inducing:
            inducing = self.param("inducing", nn.initializers.normal(1.0), (self.n_inducing, width))
            inducing = jnp.broadcast_to(inducing, (h.shape[0],) + inducing.shape).astype(x.dtype)
            summary = MultiHeadAttention(self.n_heads, dtype=self.dtype, name="induce")(inducing, x, mask)
            attended = MultiHeadAttention(self.n_heads, dtype=self.dtype, name="attend")(x, summary)
        else:
            attended = MultiHeadAttention(self.n_heads, dtype=self.dtype, name="self_attention")(x, x, mask, pair_bias)
        if not adaptive:
            h = h + attended
            feed_forward = nn.Sequential([nn.LayerNorm(dtype=self.dtype), FeedForward(self.mlp_hidden, dtype=self.dtype)])
            return h + rowwise(feed_forward, h)
        h = h + gate_1 * attended
        x = modulate(rowwise(nn.LayerNorm(dtype=self.dtype, use_scale=False, use_bias=False), h), shift_2, scale_2)
        return h + gate_2 * rowwise(FeedForward(self.mlp_hidden, dtype=self.dtype), x)


class PairwiseAttentionBias(nn.Module):
    """An attention bias for every pair of elements, every layer and every head, learned from the
    pair's features: Particle Transformer's interaction matrix (Qu et al. 2022, arXiv:2202.03772,
    sec. 3.2), with the pair's features learned instead of chosen.

    For elements ``z_i``, ``z_j`` the MLP sees ``z_i - z_j``, ``(z_i - z_j)^2``, ``z_i z_j`` and
    ``z_i + z_j``: a pair's squared angular distance and its product of momentum fractions are sums
    of these (in the standardised features, up to shifts and scales), and a pair's invariant mass,
    ``m_ij^2 ~ pt_i pt_j dR_ij^2`` for small angles, is their product, which the MLP's hidden layers
    can form; plain dot-product attention sees a pair only through a bilinear form of the projections.
    The conditioning vector ``cond[batch, c]`` (time, size, class) is added to its hidden layer, so
    the bias can fade where the noise hides the pairs. The last layer starts at zero: the untrained
    bias is 0 and the attention is the plain one. Cost: ``n^2`` rows of a ``width``-wide MLP.
    """

    width: int
    n_layers: int
    n_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z, cond):
        """``[n_layers, batch, n_heads, n, n]`` biases for the noisy elements ``z[batch, n, d]``."""
        batch, n, _ = z.shape
        z_i, z_j = z[:, :, None, :], z[:, None, :, :]
        difference = z_i - z_j
        pair = jnp.concatenate([difference, difference**2, z_i * z_j, z_i + z_j], axis=-1).astype(self.dtype)
        h = rowwise(nn.Dense(self.width, dtype=self.dtype, name="pair"), pair)
        h = nn.gelu(h + nn.Dense(self.width, dtype=self.dtype, name="cond")(cond)[:, None, None, :])
        h = nn.gelu(rowwise(nn.Dense(self.width, dtype=self.dtype, name="hidden"), h))
        bias = rowwise(nn.Dense(self.n_layers * self.n_heads, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="bias"), h)
        return bias.reshape(batch, n, n, self.n_layers, self.n_heads).transpose(3, 0, 4, 1, 2)


class ElementwiseResidualMLP(nn.Module):
    """Residual MLP applied to each set element independently (last axis only).

    ``Dense(width) -> n_blocks x [h += MLP(LN(h))] -> LN -> Dense(out_dim)``. Used as the encoder and
    decoder of latent diffusion: it never mixes elements, so it keeps permutation equivariance.
    """

    out_dim: int
    width: int = 64
    n_blocks: int = 2

    @nn.compact
    def __call__(self, x):
        h = rowwise(nn.Dense(self.width), x)
        for _ in range(self.n_blocks):
            h = h + rowwise(nn.Sequential([nn.LayerNorm(), FeedForward(2 * self.width)]), h)
        return rowwise(nn.Sequential([nn.LayerNorm(), nn.Dense(self.out_dim)]), h)


class ScoreNet(nn.Module):
    """Transformer noise predictor ``eps_hat(z_t, t, mask, labels, context)``.

    The architecture has no defaults here: its user chooses it (the pipeline's choices are
    ``pipeline.config.ModelConfig``).

    Attributes:
      d_model: width of the residual stream.
      n_layers, n_heads, mlp_ratio: transformer depth, heads and MLP width (``mlp_ratio * d_model``).
      n_classes: number of classes for an integer class label; 0 means unconditional. Index
        ``n_classes`` is the learned "no class" embedding used by classifier-free guidance.
      n_inducing: 0 for full self-attention, else the number of ISAB inducing points.
      pair_bias_width: 0 for plain attention, else the width of the MLP that adds a learned bias
        for every pair of elements to the attention (``PairwiseAttentionBias``; full attention only).
      cond_drop: what ``cond_keep=False`` drops (classifier-free guidance): ``"class_and_context"``
        both, so that guidance sharpens the class and the context together, or ``"context"`` the
        context alone, so that guidance sharpens only how a set follows its context (the class is
        always seen).
      context_mlp: False adds a linear map of the context to the conditioning vector; True feeds
        the context into the hidden layer of the MLP that embeds time and size, so that the
        conditioning is a nonlinear function of the context, the time and the size together.
      class_mlp: False adds the class embedding to the conditioning vector after that MLP; True
        feeds it into the MLP's hidden layer too, so that how the conditioning depends on the
        time, size and context can differ from class to class.
      conditioning: how the blocks take the conditioning vector, ``"additive"`` or ``"adaln"``
        (see ``SetAttentionBlock``).
      self_condition: also take an estimate of the clean elements, ``x_self[batch, n, d]``, beside
        ``z`` (self-conditioning, Chen, Zhang & Hinton 2022, arXiv:2208.04202, sec. 3.2); zeros when
        none is given.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    """

    d_model: int
    n_layers: int
    n_heads: int
    mlp_ratio: int
    conditioning: str
    n_classes: int = 0
    n_inducing: int = 0
    pair_bias_width: int = 0
    context_mlp: bool = False
    class_mlp: bool = False
    cond_drop: str = "class_and_context"
    self_condition: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z, t, mask, labels=None, context=None, cond_keep=None, x_self=None):
        """Predict the noise of every element.

        Args:
          z: noisy elements ``[batch, n, d]``.
          t: diffusion times ``[batch]`` in [0, 1].
          mask: ``[batch, n]`` bool, True for real elements.
          labels: optional int ``[batch]`` class indices (requires ``n_classes > 0``).
          context: optional float ``[batch, c]`` continuous conditioning.
          cond_keep: optional bool ``[batch]``; where False what ``cond_drop`` names is dropped
            (the class replaced by the "no class" embedding, the context by a zero context
            embedding), as in classifier-free guidance.
          x_self: optional ``[batch, n, d]`` estimate of the clean elements, read only with
            ``self_condition`` (zeros when ``None``).

        Returns:
          ``[batch, n, d]`` predicted noise, exactly zero on padded elements.
        """
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {self.conditioning!r}: choose one of {CONDITIONINGS}")
        if self.cond_drop not in COND_DROPS:
            raise ValueError(f"unknown cond_drop {self.cond_drop!r}: choose one of {COND_DROPS}")
        if self.pair_bias_width and self.n_inducing:
            raise ValueError("a pairwise attention bias needs full self-attention: set n_inducing=0 or pair_bias_width=0")
        batch = z.shape[0]
        if cond_keep is None:
            cond_keep = jnp.ones((batch,), bool)
        cond = timestep_embedding(t, self.d_model)
        cond = nn.Dense(4 * self.d_model)(cond)
        n_elements = jnp.sum(mask, axis=1)  # the set's size, as an integer position
        cond = cond + nn.Dense(4 * self.d_model, name="size_embedding")(sinusoidal_embedding(n_elements, self.d_model))
        if context is not None and self.context_mlp:
            cond = cond + cond_keep[:, None] * nn.Dense(4 * self.d_model, name="context_embedding")(context)
        class_embedding = 0.0
        if labels is not None:
            if not self.n_classes:
                raise ValueError("labels were given but the score network was built with n_classes=0")
            label_or_null = labels if self.cond_drop == "context" else jnp.where(cond_keep, labels, self.n_classes)
            width = 4 * self.d_model if self.class_mlp else self.d_model
            class_embedding = nn.Embed(self.n_classes + 1, width, name="class_embedding")(label_or_null)
        if self.class_mlp:
            cond = cond + class_embedding
        cond = nn.Dense(self.d_model)(nn.swish(cond))
        if not self.class_mlp:
            cond = cond + class_embedding
        if context is not None and not self.context_mlp:
            cond = cond + cond_keep[:, None] * nn.Dense(self.d_model, name="context_embedding")(context)
        cond = nn.swish(cond).astype(self.dtype)

        pair_biases = [None] * self.n_layers
        if self.pair_bias_width:
            pair_biases = PairwiseAttentionBias(
                self.pair_bias_width, self.n_layers, self.n_heads, dtype=self.dtype, name="pair_bias"
            )(z, cond)
        inputs = z
        if self.self_condition:
            inputs = jnp.concatenate([z, jnp.zeros_like(z) if x_self is None else x_self * mask[..., None]], axis=-1)
        h = rowwise(nn.Dense(self.d_model, dtype=self.dtype, name="embed"), inputs.astype(self.dtype))
        for i in range(self.n_layers):
            h = SetAttentionBlock(
                n_heads=self.n_heads, mlp_hidden=self.mlp_ratio * self.d_model, conditioning=self.conditioning,
                n_inducing=self.n_inducing, dtype=self.dtype, name=f"block_{i}",
            )(h, mask, cond, pair_biases[i])
        h = rowwise(nn.LayerNorm(dtype=self.dtype), h)
        eps_hat = rowwise(nn.Dense(z.shape[-1], kernel_init=nn.initializers.zeros, name="output"), h)
        return eps_hat.astype(jnp.float32) * mask[..., None]
