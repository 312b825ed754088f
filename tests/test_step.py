"""lisa_jax.step: the fast LISA step against the plain path (full gradient tree -> LISA
transform), the LoRA step, the chunked loss, accumulation and clipping."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lisa_jax
from lisa_jax import layout as layout_lib
from lisa_jax import lora as lora_lib
from lisa_jax import model as M
from lisa_jax import ops
from lisa_jax import step as S
from lisa_jax.layout import slot_of_layer
from lisa_jax.block import REMAT_MODES

LAYOUTS = ["stacked", "per_layer"]


def in_layout(params, layout):
    return layout_lib.convert(params, layout)

L = 6  # the tiny config's layer count


@pytest.mark.parametrize("remat", REMAT_MODES)
def test_stack_with_no_sampled_layer_gives_embedding_and_head_gradients_of_autodiff(
        remat, tiny_cfg, perturbed_params, batch_for, rel_err):
    """The paper's E+H (every layer frozen; ``bench_step.py --one eh``): the stack with no slot
    propagates activation gradients only, and the embedding, norm and head gradients equal
    plain autodiff's with the layers held constant."""
    cfg = tiny_cfg()
    p = perturbed_params(cfg)
    batch = batch_for(cfg)
    rest = {k: v for k, v in p.items() if k != "layers"}
    empty = jax.tree.map(lambda x: jnp.zeros((0,) + x.shape[1:], x.dtype), p["layers"])
    no_slot = slot_of_layer(jnp.zeros((0,), jnp.int32), L)
    g_fast = jax.jit(jax.grad(lambda r: S.lisa_loss(cfg, {**r, "layers": empty}, p["layers"],
                                                    no_slot, batch, remat)[0]))(rest)
    g_ref = jax.jit(jax.grad(lambda r: S.plain_loss(cfg, {**r, "layers": p["layers"]},
                                                    batch)[0]))(rest)
    for name in rest:
        assert rel_err(g_fast[name], g_ref[name]) < 1e-5, name


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("inner", ["sgd_momentum", "adamw"])
def test_fast_step_updates_equal_plain_path_over_several_periods(
        inner, layout, tiny_cfg, perturbed_params, batch_for, rel_err):
    cfg = tiny_cfg(tie_embeddings=True)
    p0 = perturbed_params(cfg)
    # A larger eps keeps Adam's g / sqrt(v) from amplifying rounding in near-zero gradients.
    opt = optax.sgd(0.05, momentum=0.9) if inner == "sgd_momentum" else \
        optax.adamw(1e-2, eps=1e-3, weight_decay=0.1)
    tx = lisa_jax.lisa(opt, n_active=2, interval=3, key=7)
    fast = S.make_lisa_step(cfg, tx, donate=False)
    plain = S.make_plain_step(cfg, tx, donate=False)
    pa, sa = in_layout(p0, layout), tx.init(p0)
    pb, sb = p0, tx.init(p0)
    seen = set()
    for i in range(10):  # 4 periods, resamples at steps 3, 6, 9
        batch = batch_for(cfg, seed=i)
        pa, sa, ma = fast(pa, sa, batch)
        pb, sb, mb = plain(pb, sb, batch)
        seen.add(tuple(np.asarray(lisa_jax.active_layers(sa))))
        np.testing.assert_array_equal(lisa_jax.active_layers(sa), lisa_jax.active_layers(sb))
        assert abs(float(ma["loss"]) - float(mb["loss"])) < 1e-5
        assert layout_lib.of(pa["layers"]).name == layout
        for a, b in zip(jax.tree.leaves(layout_lib.convert(pa, "stacked")), jax.tree.leaves(pb)):
            assert rel_err(a, b) < 1e-5
    assert len(seen) > 1, "the test should cross resamples with different samples"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_frozen_layers_are_bit_identical_after_training(
        layout, tiny_cfg, perturbed_params, batch_for):
    cfg = tiny_cfg()
    p0 = perturbed_params(cfg)
    tx = lisa_jax.lisa(optax.adamw(1e-2), n_active=2, interval=100, key=1)
    step = S.make_lisa_step(cfg, tx)
    p, s = in_layout(jax.tree.map(jnp.copy, p0), layout), tx.init(p0)
    for i in range(3):
        p, s, _ = step(p, s, batch_for(cfg, seed=i))
    p = layout_lib.convert(p, "stacked")
    active = set(np.asarray(lisa_jax.active_layers(s)).tolist())
    for name, w in p["layers"].items():
        for layer in range(L):
            same = np.array_equal(np.asarray(w[layer]), np.asarray(p0["layers"][name][layer]))
            assert same == (layer not in active), (name, layer)
    for name in ("embed", "final_norm", "lm_head"):
        assert not np.array_equal(np.asarray(p[name]), np.asarray(p0[name])), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_compile_per_active_count(layout, tiny_cfg, perturbed_params, batch_for):
    cfg = tiny_cfg()
    p0 = perturbed_params(cfg)
    tx = lisa_jax.lisa(optax.adamw(1e-3), n_active=2, interval=2, key=0)
    step = S.make_lisa_step(cfg, tx)
    p, s = in_layout(p0, layout), tx.init(p0)
    samples = set()
    for i in range(12):  # 6 periods, 6 resamples
        p, s, _ = step(p, s, batch_for(cfg, seed=i))
        samples.add(tuple(np.asarray(lisa_jax.active_layers(s))))
    assert len(samples) > 2
    assert step._cache_size() == 1

    # Bernoulli sampling: one executable per distinct count, not per period.
    # Layer 0 always, layer 1 half the time, the rest never: counts 1 and 2 only.
    tx = lisa_jax.lisa(optax.adamw(1e-3), probs=[1.0, 0.5] + [0.0] * (L - 2), interval=1, key=3)
    step = S.make_lisa_step(cfg, tx)
    p = perturbed_params(cfg)
    s = tx.init(p)
    p = in_layout(p, layout)
    counts = []
    for i in range(10):
        s = tx.maybe_resample(s, layout_lib.stacked_template(p))
        counts.append(int(lisa_jax.active_layers(s).shape[0]))
        p, s, _ = step(p, s, batch_for(cfg, seed=i))
    assert step._cache_size() == len(set(counts)) < len(counts)


def test_lora_step_trains_only_adapters_and_starts_at_base_model(
        tiny_cfg, perturbed_params, batch_for, rel_err):
    cfg = tiny_cfg()
    p0 = perturbed_params(cfg)
    lora = lora_lib.init_lora(p0["layers"], jax.random.key(0), rank=4)
    scale = lora_lib.lora_scale(4, None)
    batch = batch_for(cfg)
    base_loss = S.plain_loss(cfg, p0, batch)[0]
    adapted = {**p0, "layers": lora_lib.apply_lora(p0["layers"], lora, scale)}
    assert abs(float(S.plain_loss(cfg, adapted, batch)[0]) - float(base_loss)) < 1e-6
    tx = optax.adamw(1e-2)
    step = S.make_lora_step(cfg, tx, scale, donate=False)
    p, st = p0, (lora, tx.init(lora))
    losses = []
    for _ in range(5):
        p, st, m = step(p, st, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p0)):
        np.testing.assert_array_equal(a, b)
    merged = lora_lib.merge_lora(p, st[0], scale)
    with_adapters = {**p, "layers": lora_lib.apply_lora(p["layers"], st[0], scale)}
    assert rel_err(M.forward(cfg, merged, batch["input_ids"]),
                   M.forward(cfg, with_adapters, batch["input_ids"])) < 1e-5


def test_chunked_loss_equals_unchunked(tiny_cfg, perturbed_params, batch_for, rel_err):
    cfg = tiny_cfg()
    p = perturbed_params(cfg)
    batch = batch_for(cfg, B=3, S_=17)
    loss = jax.jit(S.plain_loss, static_argnums=(0, 3, 4))
    whole, n = loss(cfg, p, batch, "none", None)
    chunked, n2 = loss(cfg, p, batch, "none", 5)
    ref = ops.causal_lm_loss(M.Model(cfg, p)(batch["input_ids"]), batch["input_ids"],
                           batch["loss_mask"])
    assert abs(float(whole) - float(ref)) < 1e-6 and abs(float(chunked) - float(ref)) < 1e-6
    assert float(n) == float(n2) == float(jnp.sum(batch["loss_mask"][:, 1:]))
    g1 = jax.jit(jax.grad(lambda q: S.plain_loss(cfg, q, batch, loss_chunk=None)[0]))(p)
    g2 = jax.jit(jax.grad(lambda q: S.plain_loss(cfg, q, batch, loss_chunk=5)[0]))(p)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert rel_err(a, b) < 1e-5


def test_bad_remat_is_a_one_line_error(tiny_cfg):
    cfg = tiny_cfg()
    tx = lisa_jax.lisa(optax.adamw(1e-3), n_active=1)
    with pytest.raises(ValueError, match="unknown remat 'dots'.*none, qkv, mlp, full"):
        S.make_lisa_step(cfg, tx, remat="dots")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradient_accumulation_equals_the_whole_batch(
        layout, tiny_cfg, perturbed_params, batch_for, rel_err):
    cfg = tiny_cfg()
    p0 = perturbed_params(cfg)
    whole = batch_for(cfg, B=4)
    # Unequal target counts per micro-batch: the combination must weight by tokens.
    whole["loss_mask"] = whole["loss_mask"].at[0, :8].set(1)
    micro = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[1:]), whole)
    tx = lisa_jax.lisa(optax.sgd(0.1), n_active=2, interval=5, key=0)
    step = S.make_lisa_step(cfg, tx, donate=False)
    pa, _, ma = step(in_layout(p0, layout), tx.init(p0), whole)
    pb, _, mb = step(in_layout(p0, layout), tx.init(p0), micro)
    assert abs(float(ma["loss"]) - float(mb["loss"])) < 1e-6
    assert float(ma["tokens"]) == float(mb["tokens"])
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        assert rel_err(a, b) < 1e-5


def test_clipping_in_the_fast_step_uses_the_norm_of_the_trainable_gradients(
        tiny_cfg, perturbed_params, batch_for, rel_err):
    """Clipping sees the gradients of what trains (as in PyTorch, where frozen layers have no
    .grad), not those of frozen layers, which the fast step never computes."""
    cfg = tiny_cfg()
    p0 = perturbed_params(cfg)
    tx = lisa_jax.lisa(optax.sgd(1.0), n_active=2, interval=5, key=0, clip_norm=1e-3)
    fast = S.make_lisa_step(cfg, tx, donate=False)
    batch = batch_for(cfg)
    state = tx.init(p0)
    active = lisa_jax.active_layers(state)
    pa, _, ma = fast(p0, state, batch)
    grads = jax.jit(jax.grad(lambda p: S.plain_loss(cfg, p, batch)[0]))(p0)
    frozen = jnp.ones(L, bool).at[active].set(False)
    grads["layers"] = jax.tree.map(
        lambda g: jnp.where(frozen.reshape((L,) + (1,) * (g.ndim - 1)), 0.0, g), grads["layers"])
    assert abs(float(ma["grad_norm"]) - float(optax.global_norm(grads))) < 1e-5
    assert float(ma["grad_norm"]) > 1e-3  # the clip is active
    clipped = optax.clip_by_global_norm(1e-3).update(grads, optax.EmptyState())[0]
    expected = jax.tree.map(lambda p, g: p - g, p0, clipped)
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(expected)):
        assert rel_err(a, b) < 1e-5


def test_lisa_clip_norm_gives_the_fast_steps_result_from_a_full_gradient_tree(
        tiny_cfg, perturbed_params, batch_for, rel_err):
    """``lisa(..., clip_norm=c)`` fed the whole plain-autodiff gradient tree (frozen layers'
    gradients included) clips by the trained gradients' norm, exactly as the fast step does;
    ``optax.chain(clip_by_global_norm(c), lisa(...))`` clips by the whole tree's norm."""
    cfg = tiny_cfg()
    p0 = perturbed_params(cfg)
    batch = batch_for(cfg)
    tx = lisa_jax.lisa(optax.sgd(1.0), n_active=2, interval=5, key=0, clip_norm=1e-3)
    fast = S.make_lisa_step(cfg, tx, donate=False)
    plain = S.make_plain_step(cfg, tx, donate=False)
    pa, _, ma = fast(p0, tx.init(p0), batch)
    pb, _, mb = plain(p0, tx.init(p0), batch)
    assert float(mb["grad_norm"]) > float(ma["grad_norm"]) > 1e-3  # frozen grads, and clipping
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        assert rel_err(a, b) < 1e-5
    chained = optax.chain(optax.clip_by_global_norm(1e-3),
                          lisa_jax.lisa(optax.sgd(1.0), n_active=2, interval=5, key=0))
    pc, _, _ = S.make_plain_step(cfg, chained, donate=False)(p0, chained.init(p0), batch)

    def step_norm(p):
        return float(optax.global_norm(jax.tree.map(lambda a, b: a - b, p, p0)))
    # The whole-tree norm clips harder: the trained leaves move less by the ratio of norms.
    ratio = float(ma["grad_norm"]) / float(mb["grad_norm"])
    assert abs(step_norm(pc) / step_norm(pa) - ratio) < 1e-3 * ratio


# ----------------------------------------------------------------------------- frozen leaves


def _zeroed(frozen):
    """AdamW whose updates of the ``frozen`` top-level leaves are set to zero: those leaves
    train "with no step", their moments kept, the rest of the model untouched by them."""
    return optax.chain(optax.adamw(1e-2, eps=1e-3), optax.masked(
        optax.set_to_zero(), lambda p: {k: k in frozen for k in p}))


def test_frozen_embedding_and_head_stay_bit_identical_and_the_rest_trains_as_with_zero_steps(
        tiny_cfg, perturbed_params, batch_for):
    cfg = tiny_cfg(num_layers=3)  # (fewer layers to compile twice)
    p0 = perturbed_params(cfg)
    frozen = ("embed", "lm_head")
    tx = lisa_jax.lisa(optax.adamw(1e-2, eps=1e-3), n_active=1, interval=2, key=2,
                       frozen=frozen)
    ref_tx = lisa_jax.lisa(_zeroed(frozen), n_active=1, interval=2, key=2)
    step = S.make_lisa_step(cfg, tx, donate=False)
    ref = S.make_lisa_step(cfg, ref_tx, donate=False)
    pa, sa = in_layout(p0, "per_layer"), tx.init(p0)
    pb, sb = in_layout(p0, "per_layer"), ref_tx.init(p0)
    assert sa.rest_state[0].mu["embed"] is None and sa.rest_state[0].mu["lm_head"] is None
    for i in range(3):  # a resample at step 2
        batch = batch_for(cfg, seed=i)
        pa, sa, ma = step(pa, sa, batch)
        pb, sb, mb = ref(pb, sb, batch)
        assert float(ma["loss"]) == float(mb["loss"])
    pa, pb = layout_lib.convert(pa, "stacked"), layout_lib.convert(pb, "stacked")
    for name in frozen:
        np.testing.assert_array_equal(pa[name], p0[name])
    assert not np.array_equal(pa["final_norm"], p0["final_norm"])
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(a, b)


def test_a_frozen_embedding_takes_no_scatter_add_gradient(tiny_cfg, perturbed_params,
                                                          batch_for):
    """The embedding's gradient is a scatter-add of the token rows' cotangents; frozen, the
    step computes none (and no gradient for the head)."""
    cfg = tiny_cfg()
    p0 = perturbed_params(cfg)
    batch = batch_for(cfg)

    def embed_scatters(frozen):
        """Scatters indexed by the [B, S] token ids (index_vector_dim 2): the lookup's
        gradient; the step's other scatters (slots, write-backs) take 1-D indices."""
        tx = lisa_jax.lisa(optax.adamw(1e-2), n_active=2, interval=2, key=0, frozen=frozen)
        step = S.make_lisa_step(cfg, tx, donate=False)
        state = step.prepare(tx.init(p0), p0)
        text = step.lower(p0, state, batch).as_text()
        return [line for line in text.splitlines()
                if "stablehlo.scatter" in line and "index_vector_dim = 2" in line]

    assert len(embed_scatters(None)) == 1
    assert embed_scatters(("embed",)) == []


# ----------------------------------------------------------------------------- --lisa-always


def test_lisa_always_freezes_what_it_omits_in_the_trainer_method(
        tiny_cfg, perturbed_params, batch_for):
    from lisa_jax import methods
    from lisa_jax.config import TrainConfig, TrainError, check_config
    cfg = tiny_cfg()
    p0 = perturbed_params(cfg)
    size = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
    run = TrainConfig(lisa_layers=2, lisa_always="norm,head", lr=1e-2)
    m = methods.method_for(run, cfg, jax.tree.map(jnp.copy, p0), methods.make_schedule(run, 4))
    adam = m.state.rest_state[0]
    assert adam.mu["embed"] is None and adam.mu["lm_head"] is not None
    n, what = m.trainable(p0)
    assert n == size(p0["final_norm"]) + size(p0["lm_head"]) + 2 * size(p0["layers"]) // L
    assert what == "head, final norm and 2 of 6 layers at a time (their weights and norms)"
    p, _ = m.step(jax.tree.map(jnp.copy, p0), batch_for(cfg))
    np.testing.assert_array_equal(p["embed"], p0["embed"])
    assert not np.array_equal(p["lm_head"], p0["lm_head"])
    none = TrainConfig(lisa_always="none")
    assert methods.lisa_frozen(none, cfg) == ("embed", "final_norm", "lm_head")
    assert methods.method_for(none, cfg).trainable(p0) == (
        2 * size(p0["layers"]) // L, "2 of 6 layers at a time (their weights and norms)")
    # Tied embeddings: one matrix is embedding and head, so both train or neither does.
    tied = tiny_cfg(tie_embeddings=True)
    assert methods.lisa_frozen(TrainConfig(lisa_always="norm"), tied) == ("embed",)
    assert methods.lisa_frozen(TrainConfig(), tied) == ()
    with pytest.raises(TrainError, match="ties its embedding and head.*name both embed and "
                                         "head, or neither") as err:
        methods.lisa_frozen(TrainConfig(lisa_always="embed,norm"), tied)
    assert "\n" not in str(err.value)
    with pytest.raises(TrainError, match="unknown part 'lm_head'; name some of embed, norm, "
                                         "head"):
        check_config(TrainConfig(lisa_always="lm_head", model="m", data="d"), paths=False)
