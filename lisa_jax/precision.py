"""Float32-precision updates for parameters stored in bfloat16.

A bfloat16 weight keeps 8 significant bits. An Adam step moves a weight by about the learning
rate, and at ``lr = 1e-5`` that is less than half a bfloat16 spacing of every weight with
``|w| >= 2**-8`` (and of every norm scale near 1): added in bfloat16, such an update rounds
back to the old value, and the weight never moves.

:func:`master_weights` wraps any optax transformation so that it runs on a float32 *master*
copy of the parameters and hands back updates that set each bfloat16 parameter to its master
rounded to nearest. The master is not stored whole: a float32 number is its bfloat16 rounding
(the high 16 bits, with the rounding carried in) plus a signed 16-bit remainder, so the state
keeps only the remainder (``int16``, 2 bytes a parameter instead of 4 for a separate copy) and
rebuilds the exact float32 master from the parameter itself at every update. Parameters that
are float32 already pass through unchanged (no remainder is stored for them).

Because the parameter *is* the high half of its master, the two can never drift apart, and a
fresh state needs no parameter values: its remainders start at zero, which is exact for any
bfloat16 parameter. Under :func:`lisa_jax.lisa`, put it inside, ``lisa(master_weights(adamw))``:
the remainders then exist for the always-trained leaves and the γ slots only, a newly sampled
layer starts from its bfloat16 value (an exact upcast), a layer that stays sampled keeps its
remainder, and frozen layers stay plain bfloat16 constants.

The inner transformation sees float32 gradients and float32 parameters, so its state (e.g.
Adam's moments) is float32 unless it is told otherwise (``optax.adamw(..., mu_dtype=...)``).

Adam's second moment cannot be told so: with ``b2 = 0.999`` it moves by a thousandth a step,
under half a bfloat16 spacing, so a bfloat16 ``nu`` rounded to nearest stops following the
gradients (it can neither decay nor grow slowly). :func:`stochastic_bf16_nu` keeps it in
bfloat16 all the same, rounded *stochastically*: up with the probability of the discarded
fraction, so that every step's rounding is zero on average and the small steps add up.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["MasterWeightsState", "master_weights", "split_master", "join_master",
           "stochastic_round_bf16", "stochastic_bf16_nu"]


class MasterWeightsState(NamedTuple):
    """State of :func:`master_weights`.

    ``remainder``: per bfloat16 parameter, the ``int16`` remainder of its float32 master
    (``optax.MaskedNode()`` for float32 parameters); ``inner_state``: the wrapped
    transformation's state, built on float32 masters."""

    remainder: Any
    inner_state: Any

    # Tells lisa() that this field holds weights, not moments: carried with a layer that stays
    # sampled and never reset.
    WEIGHTS_FIELD = "remainder"


def split_master(master):
    """``(bfloat16 rounding to nearest, int16 remainder)`` of a float32 array, exactly.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([1.0 + 2.0**-10, -3.14159, 1e-30], jnp.float32)
    >>> hi, rem = split_master(x)
    >>> bool((join_master(hi, rem) == x).all()), hi.dtype.name, rem.dtype.name
    (True, 'bfloat16', 'int16')
    """
    bits = jax.lax.bitcast_convert_type(master.astype(jnp.float32), jnp.uint32)
    # Adding half of the low half's range rounds the high half to nearest (ties away from
    # zero; a carry into the exponent is the correct rounding). The low half, read as a signed
    # number, is then exactly what the rounded high half lacks.
    high = ((bits + jnp.uint32(0x8000)) >> 16).astype(jnp.uint16)
    low = jax.lax.bitcast_convert_type((bits & jnp.uint32(0xFFFF)).astype(jnp.uint16), jnp.int16)
    return jax.lax.bitcast_convert_type(high, jnp.bfloat16), low


def join_master(param, remainder):
    """The float32 master of a bfloat16 ``param`` and its ``int16`` ``remainder``."""
    high = jax.lax.bitcast_convert_type(param, jnp.uint16).astype(jnp.uint32) << 16
    low = remainder.astype(jnp.int32).astype(jnp.uint32)  # two's complement: wraps as wanted
    return jax.lax.bitcast_convert_type(high + low, jnp.float32)


def _is_bf16(x) -> bool:
    return jnp.dtype(x.dtype) == jnp.bfloat16


def _check_dtype(x):
    if jnp.dtype(x.dtype) not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"master_weights takes bfloat16 or float32 parameters, got "
                         f"{jnp.dtype(x.dtype).name}")


def master_weights(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run ``inner`` on float32 masters of bfloat16 parameters (see the module docstring).

    ``update`` needs ``params``. Its updates are float32 and bring each bfloat16 parameter
    exactly to its new master rounded to nearest under ``optax.apply_updates`` (which adds in
    float32 and casts back); for float32 parameters they are ``inner``'s own.

    Example: at ``lr = 1e-5`` plain bfloat16 AdamW leaves a weight of 1.0 where it was; with
    master weights it moves, by the float32 amount once the steps add up to a bfloat16 spacing.

      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones((3,), jnp.bfloat16)}
      >>> grads = {"w": jnp.ones((3,), jnp.bfloat16)}
      >>> def run(tx, steps=400):
      ...     p, s = params, tx.init(params)
      ...     for _ in range(steps):
      ...         u, s = tx.update(grads, s, p)
      ...         p = optax.apply_updates(p, u)
      ...     return p, s
      >>> plain, _ = run(optax.adam(1e-5))
      >>> float(plain["w"][0])
      1.0
      >>> mixed, state = run(master_weights(optax.adam(1e-5)))
      >>> mixed["w"].dtype.name, float(mixed["w"][0])
      ('bfloat16', 0.99609375)
      >>> master = join_master(mixed["w"], state.remainder["w"])
      >>> abs(float(master[0]) - (1 - 400 * 1e-5)) < 1e-5
      True

    Under LISA the remainders exist for the always-trained leaves and the sampled slots only:

      >>> import lisa_jax
      >>> params = {"embed": jnp.ones((5, 2), jnp.bfloat16),
      ...           "layers": {"w": jnp.ones((6, 2, 2), jnp.bfloat16)}}
      >>> tx = lisa_jax.lisa(master_weights(optax.adamw(1e-5)), n_active=2, interval=10)
      >>> state = tx.init(params)
      >>> rem = state.slot_state.remainder
      >>> rem["layers"]["w"].shape, rem["layers"]["w"].dtype.name   # γ = 2 slots of [2, 2]
      ((2, 2, 2), 'int16')
    """

    def init(params):
        jax.tree.map(_check_dtype, params)
        remainder = jax.tree.map(
            lambda p: jnp.zeros(p.shape, jnp.int16) if _is_bf16(p) else optax.MaskedNode(),
            params)
        masters = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32) if _is_bf16(p) else p,
                               params)
        return MasterWeightsState(remainder, inner.init(masters))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("master_weights needs params in update(grads, state, params): "
                             "the float32 masters are rebuilt from them")
        # The masters exist only from here on: without the barrier XLA may rebuild them as
        # soon as the step starts and keep them alive through the backward pass.
        grads, params, remainder = jax.lax.optimization_barrier(
            (grads, params, state.remainder))
        masters = jax.tree.map(lambda p, r: join_master(p, r) if _is_bf16(p) else p,
                               params, remainder)
        grads32 = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        inner_updates, inner_state = inner.update(grads32, state.inner_state, masters)

        treedef = jax.tree.structure(params)
        updates, remainders = [], []
        for p, m, u in zip(treedef.flatten_up_to(params), treedef.flatten_up_to(masters),
                           treedef.flatten_up_to(inner_updates)):
            if _is_bf16(p):
                new_param, r = split_master(m + u)
                # Exact in float32 (both are bfloat16 values): p + update == new_param.
                updates.append(new_param.astype(jnp.float32) - p.astype(jnp.float32))
                remainders.append(r)
            else:
                updates.append(u)
                remainders.append(optax.MaskedNode())
        updates, remainder = treedef.unflatten(updates), treedef.unflatten(remainders)
        return updates, MasterWeightsState(remainder, inner_state)

    return optax.GradientTransformation(init, update)


def _mix32(x):
    """A bijection of uint32 in which every input bit flips each output bit with probability
    about 1/2 (C. Wellons' "lowbias32" integer hash)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _uniform_bits16(key, shape):
    """16 uniform random bits an element (as uint32), a hash of the element's index and
    ``key``. Elementwise, so XLA fuses it into its consumer: ``jax.random.bits`` over a whole
    leaf is a threefry computation that XLA's CPU backend materialized (4 bytes an element of
    a full fine-tuning step's scratch). For one key the hash is a bijection of the index, so
    over 2^32 consecutive elements every value comes out once; keys differ by the update count
    and the leaf."""
    seed = jnp.uint32(0)
    for word in jax.random.key_data(key).astype(jnp.uint32).ravel():
        seed = _mix32(seed ^ word)
    index = jnp.uint32(0)
    for d, n in enumerate(shape):  # the flat index, modulo 2^32
        index = index * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, shape, d)
    return _mix32(_mix32(index) ^ seed) >> 16


def stochastic_round_bf16(x, key):
    """``x`` (float32) rounded to bfloat16 at random: up (away from zero) with probability the
    fraction of a bfloat16 spacing that rounding down would drop, so the result's mean is ``x``.

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.full((20000,), 1.0 + 2.0**-10, jnp.float32)   # a quarter of a spacing above 1
    >>> y = stochastic_round_bf16(x, jax.random.key(0))
    >>> sorted(set(y.tolist())), abs(float(y.astype(jnp.float32).mean()) - float(x[0])) < 1e-4
    ([1.0, 1.0078125], True)
    """
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    # Adding uniform noise below the kept 16 bits and truncating carries into them with the
    # dropped fraction's probability; the sign is apart, so negatives round symmetrically.
    noise = _uniform_bits16(key, x.shape)
    high = ((bits + noise) >> 16).astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(high, jnp.bfloat16)


def _map_adam_states(fn, state):
    """``state`` with every ``optax.ScaleByAdamState`` node ``s`` replaced by ``fn(s)``."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return jax.tree.map(lambda x: fn(x) if is_adam(x) else x, state, is_leaf=is_adam)


def stochastic_bf16_nu(inner: optax.GradientTransformation,
                       seed: int = 0) -> optax.GradientTransformation:
    """``inner`` (an optax transformation holding ``optax.ScaleByAdamState``, e.g.
    ``optax.adamw``) with Adam's second moment stored in bfloat16: 2 bytes a parameter instead
    of 4. Each update computes it in float32 from the stored one, uses that exact value, and
    stores it :func:`stochastically rounded <stochastic_round_bf16>` (the noise drawn from
    ``seed``, the update count and the leaf), so it follows the float32 moment on average.

    Rounded to nearest instead, a bfloat16 ``nu`` would stay where the first gradients put it.
    Here ``|g|`` falls from 1 to 0.5 after ten steps:

      >>> import jax, jax.numpy as jnp, optax
      >>> def final_nu(tx, steps=1000):
      ...     g_T = jnp.where(jnp.arange(steps) < 10, 1.0, 0.5)
      ...     step = lambda s, g: (tx.update({"w": jnp.full(256, g)}, s)[1], None)
      ...     return jax.lax.scan(step, tx.init({"w": jnp.zeros(256)}), g_T)[0][0].nu["w"]
      >>> exact = final_nu(optax.adam(1e-3))
      >>> rounded = final_nu(stochastic_bf16_nu(optax.adam(1e-3)))
      >>> rounded.dtype.name, round(float(exact.mean()), 3)
      ('bfloat16', 0.161)
      >>> abs(float(rounded.astype(jnp.float32).mean()) - float(exact.mean())) < 0.005
      True
    """
    base = jax.random.key(seed)

    def to_f32(s):
        return s._replace(nu=jax.tree.map(lambda v: v.astype(jnp.float32), s.nu))

    def to_bf16(s):
        key = jax.random.fold_in(base, s.count)
        leaves, treedef = jax.tree.flatten(s.nu)
        return s._replace(nu=treedef.unflatten(
            [stochastic_round_bf16(v, jax.random.fold_in(key, i)) for i, v in enumerate(leaves)]))

    # Compiled as a whole, so that the float32 moments ``inner.init`` makes are never held: run
    # op by op, every leaf's would live at once before the cast (4 bytes a parameter, 25 GiB
    # at 7B full fine-tuning).
    @jax.jit
    def init(params):
        return _map_adam_states(lambda s: s._replace(nu=jax.tree.map(
            lambda v: v.astype(jnp.bfloat16), s.nu)), inner.init(params))

    def update(updates, state, params=None):
        updates, new_state = inner.update(updates, _map_adam_states(to_f32, state), params)
        return updates, _map_adam_states(to_bf16, new_state)

    return optax.GradientTransformation(init, update)
