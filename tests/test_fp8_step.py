"""The LISA step with frozen layers in fp8 (``lisa_jax.fp8_step``): through its bf16 path it is
the plain LISA step; with fp8 (emulated on the CPU) its loss and sampled-layer gradients stay
within the fp8 bound of the dense ones; the host masters and the copies follow the samples.

fp8 bound: each frozen layer's own contribution is off by the ≈ 5-8% of ``tests/test_fp8.py``,
but the residual stream carries most of each layer's output unchanged, so the loss moves by
well under 1% (0.08% here) and the sampled layers' gradients keep a cosine above 0.98 (0.995
here) and a relative error under 15%. The op-level bounds, two-copy layout included, are
``tests/test_fp8.py``'s.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lisa_jax
from lisa_jax import fp8_step as F
from lisa_jax import layout
from lisa_jax import step as S
from lisa_jax.fp8 import Fp8Weight, quantize_layer


_compiles: list[str] = []  # the functions compiled, as jax reports them
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _, **kw: _compiles.append(kw.get("fun_name"))
    if event == "/jax/core/compile/backend_compile_duration" else None)


def _lisa(interval=2, n_active=2):
    return lisa_jax.lisa(optax.adamw(1e-2), n_active=n_active, interval=interval, key=1)


def test_fp8_is_refused_on_a_cpu_with_the_fix_in_one_line():
    with pytest.raises(ValueError, match="use --frozen-precision bf16") as e:
        F.check_fp8()
    assert "\n" not in str(e.value)
    F.check_fp8(allow_cpu=True)  # the emulation tests use
    assert F.fp8_unsupported() is not None

    class Gpu:  # what jax reports for CUDA devices
        platform = "gpu"

        def __init__(self, kind, cc):
            self.device_kind, self.compute_capability = kind, cc
    with pytest.raises(ValueError, match=r"A100.*8\.0.*use --frozen-precision bf16"):
        F.check_fp8(Gpu("NVIDIA A100-SXM4-80GB", "8.0"))
    for kind, cc in [("NVIDIA H200", "9.0"), ("NVIDIA L4", "8.9"), ("NVIDIA B200", "10.0")]:
        F.check_fp8(Gpu(kind, cc))


# 4: every layer sampled, none frozen (with fp8 residuals: none are quantized, the sampled
# layers' own are kept exact)
@pytest.mark.parametrize("n_active,residuals", [
    (2, "bf16"), pytest.param(4, "bf16", marks=pytest.mark.slow), (4, "fp8")])
def test_bf16_path_trains_exactly_as_the_plain_lisa_step(n_active, residuals, tiny_cfg,
                                                         perturbed_params, batch_for):
    cfg = tiny_cfg(num_layers=4)
    p0 = perturbed_params(cfg)
    tx = _lisa(n_active=n_active)
    plain = S.make_lisa_step(cfg, tx)
    p, s = layout.convert(jax.tree.map(jnp.copy, p0), "per_layer"), tx.init(p0)
    step = F.make_frozen_lisa_step(cfg, tx, frozen_precision="bf16", residuals=residuals)
    split, s8 = step.place(jax.tree.map(jnp.copy, p0), tx.init(p0)), tx.init(p0)
    samples = []
    for i in range(5):  # two resamples
        p, s, m = plain(p, s, batch_for(cfg, seed=i))
        split, s8, m8 = step(split, s8, batch_for(cfg, seed=i))
        samples.append(split.active)
        assert split.active == tuple(np.asarray(s.active).tolist())
        np.testing.assert_array_equal(m8["loss"], m["loss"])
    assert (len(set(samples)) > 1) == (n_active < cfg.num_layers)
    got = step.full_params(split)
    for i, lp in enumerate(p["layers"]):
        for k, v in lp.items():
            np.testing.assert_array_equal(got["layers"][i][k], np.asarray(v), err_msg=(i, k))
    for k in ("embed", "final_norm", "lm_head"):
        np.testing.assert_array_equal(got[k], p[k])
    assert step.jitted._cache_size() == 1  # one executable for every sample of its size


def _grads(cfg, params, active, frozen_of, batch, residuals="bf16", remat="none"):
    """Loss and sampled-layer gradients of ``mixed_loss`` with the frozen copies
    ``frozen_of(layer params)``."""
    per = layout.convert(params, "per_layer")["layers"]
    active = jnp.asarray(active)
    view = {k: v for k, v in params.items() if k != "layers"}
    view["layers"] = jax.tree.map(lambda x: x[active], params["layers"])
    frozen = tuple(frozen_of(lp) for lp in per)
    slot_L = layout.slot_of_layer(active, cfg.num_layers)
    fn = jax.jit(jax.value_and_grad(
        lambda v, fz: F.mixed_loss(cfg, v, fz, slot_L, batch, remat, residuals=residuals)[0]))
    return fn(view, frozen)


def _cos(a, b):
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_fp8_loss_and_sampled_gradients_follow_the_dense_step(tiny_cfg, perturbed_params,
                                                              batch_for):
    cfg = tiny_cfg(num_layers=4)
    params = perturbed_params(cfg, seed=4)
    batch = batch_for(cfg, B=2, S_=16)
    names = tuple(p.name for p in lisa_jax.block.layer_params(cfg) if p.rank == 2)
    loss, g = _grads(cfg, params, [1, 3], lambda lp: lp, batch)
    loss8, g8 = _grads(cfg, params, [1, 3], lambda lp: quantize_layer(lp, names, False), batch)
    assert abs(float(loss8) - float(loss)) < 0.01 * abs(float(loss))
    for k in names:
        assert _cos(g8["layers"][k], g["layers"][k]) > 0.98, k
        rel = np.linalg.norm(np.asarray(g8["layers"][k] - g["layers"][k])) / \
            np.linalg.norm(np.asarray(g["layers"][k]))
        assert rel < 0.15, k
    assert _cos(g8["embed"], g["embed"]) > 0.98
    # fp8 does change the frozen layers' arithmetic: the result is not the dense one
    assert float(loss8) != float(loss)


# none and full: the MLP's kept activations read, and recomputed (qkv keeps them as none does,
# mlp recomputes them as full does)
@pytest.mark.parametrize("remat", ["none", pytest.param("qkv", marks=pytest.mark.slow),
                                   pytest.param("mlp", marks=pytest.mark.slow), "full"])
def test_the_fused_fp8_mlp_trains_as_the_stage_by_stage_one(remat, tiny_cfg, perturbed_params,
                                                            batch_for, monkeypatch):
    """Frozen fp8 layers with their MLP as ``fp8_mlp.FrozenMlp`` (the default) against stage
    by stage: the same fp8 GEMMs, fewer roundings between them, so the loss and the sampled
    layers' gradients agree far inside the fp8 bound (and every remat recomputes what the
    fused MLP keeps)."""
    cfg = tiny_cfg(num_layers=4)
    params = perturbed_params(cfg, seed=5)
    batch = batch_for(cfg, B=2, S_=16)
    names = tuple(p.name for p in lisa_jax.block.layer_params(cfg) if p.rank == 2)
    copy = lambda lp: quantize_layer(lp, names, False)  # noqa: E731
    assert F._frozen_mlp(cfg, copy(layout.convert(params, "per_layer")["layers"][0]), "bf16")
    loss, g = _grads(cfg, params, [0, 2], copy, batch, remat=remat)
    monkeypatch.setattr(F, "FUSED_MLP", False)
    loss_s, g_s = _grads(cfg, params, [0, 2], copy, batch, remat=remat)
    assert abs(float(loss) - float(loss_s)) < 2e-3 * abs(float(loss_s))
    for k in names:
        assert _cos(g["layers"][k], g_s["layers"][k]) > 0.995, k
    # the lowest sampled layer's gradient passes through two frozen layers' fused backward
    assert float(jnp.abs(g["layers"]["w_gate"][0] - g_s["layers"]["w_gate"][0]).max()) > 0


def _assert_rounded_below_only(loss, g, loss8, g8, names, cos_min, rel_max):
    """With layers 1 and 3 sampled, fp8 residuals against exact ones: the forward is the same
    computation (the loss bit for bit); layer 3's gradient passes through no frozen layer (its
    own saved activations are exact), layer 1's within ``cos_min`` and ``rel_max``."""
    np.testing.assert_array_equal(loss8, loss)
    for k in names:
        np.testing.assert_array_equal(g8["layers"][k][1], g["layers"][k][1], err_msg=k)
        low, low8 = np.asarray(g["layers"][k][0]), np.asarray(g8["layers"][k][0])
        assert _cos(low8, low) > cos_min, k
        assert np.linalg.norm(low8 - low) < rel_max * np.linalg.norm(low), k


def test_fp8_residuals_are_saved_in_fp8_and_touch_only_the_gradients_below_them(
        tiny_cfg, perturbed_params, batch_for):
    cfg = tiny_cfg(num_layers=4)
    params = perturbed_params(cfg, seed=4)
    B, S_, L, F_ = 2, 16, cfg.num_layers, cfg.intermediate_size
    batch = batch_for(cfg, B=B, S_=S_)
    names = tuple(p.name for p in lisa_jax.block.layer_params(cfg) if p.rank == 2)
    active = [1, 3]  # the top layer sampled: no frozen layer lies above it
    for frozen_of in (lambda lp: lp, lambda lp: quantize_layer(lp, names, False)):
        loss, g = _grads(cfg, params, active, frozen_of, batch)
        loss8, g8 = _grads(cfg, params, active, frozen_of, batch, residuals="fp8")
        # layer 1's gradient comes through frozen layer 2's rounded gate and up
        _assert_rounded_below_only(loss, g, loss8, g8, names, cos_min=0.995, rel_max=0.06)
        assert not np.array_equal(g8["layers"]["w_gate"][0], g["layers"]["w_gate"][0])
        assert _cos(g8["embed"], g["embed"]) > 0.995

    # what the forward keeps: every layer's gate and up as e4m3 (a sampled layer's unread),
    # and the sampled layers' exact ones, [G, B, S, F] in bf16, beside them; with dense
    # copies (packed after the forward) and fp8 ones (the fused MLP's kernel quantizes them)
    dense = layout.convert(params, "per_layer")["layers"]
    ids = jnp.asarray(active)
    act = jax.tree.map(lambda x: x[ids], params["layers"])
    slot_L = layout.slot_of_layer(ids, L)
    h = jnp.zeros((B, S_, cfg.hidden_size), jnp.bfloat16)
    cos, sin = lisa_jax.ops.rope_tables(cfg, jnp.arange(S_)[None])
    for per in (dense, [quantize_layer(lp, names, False) for lp in dense]):
        for residuals, fp8_wide, exact in (("bf16", 0, 0), ("fp8", 2 * L, 2)):
            _, vjp = jax.vjp(lambda a, h: F.mixed_layers(
                cfg, "none", residuals, a, tuple(per), slot_L, h, cos, sin), act, h)
            wide = [x for x in jax.tree.leaves(vjp) if x.shape[-1:] == (F_,)]
            assert sum(x.dtype == jnp.float8_e4m3fn and x.shape == (B, S_, F_)
                       for x in wide) == fp8_wide
            assert sum(x.shape == (2, B, S_, F_) for x in wide) == exact
            bf16_per_layer = sum(x.shape == (B, S_, F_) and x.dtype != jnp.float8_e4m3fn
                                 for x in wide)
            assert bf16_per_layer == (2 * L if residuals == "bf16" else 0)


@pytest.mark.parametrize("residuals,remat,scales", [
    pytest.param("fp8_qkv", "none", "head", marks=pytest.mark.slow),  # fp8_all packs them too
    ("fp8_all", "none", "head"), ("fp8_qkv", "mlp", "head"), ("fp8_all", "full", "head"),
    pytest.param("fp8_qkv", "mlp", "token", marks=pytest.mark.slow)])
def test_wider_fp8_residuals_keep_more_in_e4m3_and_touch_only_the_gradients_below_them(
        residuals, remat, scales, tiny_cfg, perturbed_params, batch_for, monkeypatch):
    """``fp8_qkv`` and ``fp8_all`` keep q, k, v (per token and head) and the layer inputs and
    mid-residuals (per token) of the frozen layers in e4m3 too: the forward is the same (the
    loss bit for bit), the top sampled layer's gradient is exact, the lower one's within the
    e4m3 rounding of what it passes through, and every activation the remat mode keeps per
    frozen layer that the setting names is e4m3 (the sampled layers' exact, [G, ...]).
    ``scales="token"``: q, k and v scaled per token over all heads, one scale a token each."""
    monkeypatch.setattr(F, "QKV_SCALES", scales)
    cfg = tiny_cfg(num_layers=4)
    params = perturbed_params(cfg, seed=4)
    B, S_, L = 2, 16, cfg.num_layers
    batch = batch_for(cfg, B=B, S_=S_)
    names = tuple(p.name for p in lisa_jax.block.layer_params(cfg) if p.rank == 2)
    copy = lambda lp: quantize_layer(lp, names, False)  # noqa: E731
    active = [1, 3]
    loss, g = _grads(cfg, params, active, copy, batch, remat=remat)
    loss8, g8 = _grads(cfg, params, active, copy, batch, residuals=residuals, remat=remat)
    _assert_rounded_below_only(loss, g, loss8, g8, names, cos_min=0.99, rel_max=0.1)
    assert not np.array_equal(g8["layers"]["wq"][0], g["layers"]["wq"][0])

    per = [copy(lp) for lp in layout.convert(params, "per_layer")["layers"]]
    ids = jnp.asarray(active)
    act = jax.tree.map(lambda x: x[ids], params["layers"])
    h = jnp.zeros((B, S_, cfg.hidden_size), params["embed"].dtype)
    cos, sin = lisa_jax.ops.rope_tables(cfg, jnp.arange(S_)[None])
    _, vjp = jax.vjp(lambda a, h: F.mixed_layers(
        cfg, remat, residuals, a, tuple(per), layout.slot_of_layer(ids, L), h, cos, sin),
        act, h)
    leaves = jax.tree.leaves(vjp)
    shapes = {"h": (B, S_, cfg.hidden_size), "hm": (B, S_, cfg.hidden_size),
              "q": (B, S_, cfg.num_heads, cfg.head_dim),
              "k": (B, S_, cfg.num_kv_heads, cfg.head_dim),
              "v": (B, S_, cfg.num_kv_heads, cfg.head_dim),
              "a": (B, S_, cfg.intermediate_size), "b": (B, S_, cfg.intermediate_size)}
    kept = lisa_jax.block.fp8_saved(remat, residuals)
    assert kept and set(kept) >= ({"q", "k", "v"} & set(lisa_jax.block.SAVED[remat]))
    for shape in {shapes[n] for n in lisa_jax.block.SAVED[remat]}:
        n_fp8 = sum(n in kept and shapes[n] == shape for n in shapes)
        n_all = sum(n in lisa_jax.block.SAVED[remat] and shapes[n] == shape for n in shapes)
        e4m3 = sum(x.shape == shape and x.dtype == jnp.float8_e4m3fn for x in leaves)
        assert e4m3 == L * n_fp8, shape
        # no frozen layer keeps a full-precision copy of what it keeps in e4m3
        assert sum(x.shape == shape and x.dtype == h.dtype for x in leaves) <= \
            L * (n_all - n_fp8) + (shape == shapes["h"]), shape  # (+ the stack's input)
    per_token = sum(x.shape == (B, S_, 1, 1) for x in leaves)
    assert per_token == (3 * L if scales == "token" and "q" in kept else 0)
    # the sampled layers' exact activations: one [G, ...] array per name kept in e4m3
    assert sum(x.shape[:1] == (2,) and x.shape[1:] in {shapes[n] for n in kept}
               and x.dtype == h.dtype for x in leaves) == len(kept)


def test_remat_qkv_with_fp8_residuals_keeps_no_qkv_and_trains_as_remat_none(
        tiny_cfg, perturbed_params, batch_for):
    """The leanest fast combination: the backward recomputes q, k and v, the gate and up
    products are kept in e4m3. The forward is unchanged (the same loss, bit for bit), the
    gradients are remat none's (the recomputed projections are the same fp8 GEMMs), and what
    the forward keeps has no q, k or v."""
    cfg = tiny_cfg(num_layers=4)
    params = perturbed_params(cfg, seed=6)
    B, S_ = 2, 16
    batch = batch_for(cfg, B=B, S_=S_)
    names = tuple(p.name for p in lisa_jax.block.layer_params(cfg) if p.rank == 2)
    copy = lambda lp: quantize_layer(lp, names, False)  # noqa: E731
    loss, g = _grads(cfg, params, [0, 2], copy, batch, residuals="fp8")
    loss_q, g_q = _grads(cfg, params, [0, 2], copy, batch, residuals="fp8", remat="qkv")
    np.testing.assert_array_equal(loss_q, loss)
    for k in names:
        np.testing.assert_allclose(g_q["layers"][k], g["layers"][k], rtol=2e-2, atol=1e-6,
                                   err_msg=k)
        assert _cos(g_q["layers"][k], g["layers"][k]) > 0.9999, k

    per = [copy(lp) for lp in layout.convert(params, "per_layer")["layers"]]
    ids = jnp.asarray([0, 2])
    act = jax.tree.map(lambda x: x[ids], params["layers"])
    h = jnp.zeros((B, S_, cfg.hidden_size), jnp.bfloat16)
    cos, sin = lisa_jax.ops.rope_tables(cfg, jnp.arange(S_)[None])
    q_shape = (B, S_, cfg.num_heads, cfg.head_dim)
    for remat, n_q in (("none", cfg.num_layers), ("qkv", 0)):
        _, vjp = jax.vjp(lambda a, h: F.mixed_layers(
            cfg, remat, "fp8", a, tuple(per), layout.slot_of_layer(ids, cfg.num_layers), h,
            cos, sin), act, h)
        assert sum(x.shape == q_shape for x in jax.tree.leaves(vjp)) == n_q, remat


def test_fp8_residuals_without_saved_gate_and_up_are_refused_in_one_line(tiny_cfg):
    cfg = tiny_cfg(num_layers=4)
    for remat in ("mlp", "full"):
        with pytest.raises(ValueError, match=f"--remat {remat}.*use --remat none") as e:
            F.make_frozen_lisa_step(cfg, _lisa(), remat=remat, frozen_precision="bf16",
                                    residuals="fp8")
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown residual precision 'fp4'"):
        F.make_frozen_lisa_step(cfg, _lisa(), frozen_precision="bf16", residuals="fp4")


def test_copies_are_made_exactly_when_a_layer_leaves_the_trained_set(tiny_cfg,
                                                                     perturbed_params,
                                                                     batch_for):
    cfg = tiny_cfg(num_layers=5)
    L = cfg.num_layers
    p0 = perturbed_params(cfg)
    tx = _lisa(interval=2)
    step = F.make_frozen_lisa_step(cfg, tx, frozen_precision="fp8", allow_cpu=True)
    s = tx.init(p0)
    split = step.place(jax.tree.map(jnp.copy, p0), s)
    # a copy of every frozen layer and of no sampled one (it would go stale)
    assert split.cache.last_quantized == set(range(L)) - set(split.active)
    assert set(split.cache.copies) == set(range(L)) - set(split.active)
    # (the masters as numpy: with pinned host memory they are jax arrays there)
    initial = [{k: np.array(v) for k, v in lp.items()} for lp in split.masters]
    trained = set()
    for i in range(7):
        before, copies = split.active, dict(split.cache.copies)
        masters_before = list(split.masters)
        split, s, _ = step(split, s, batch_for(cfg, seed=i))
        if split.active != before:
            left = set(before) - set(split.active)
            assert split.cache.last_quantized == left
            assert set(split.cache.copies) == set(range(L)) - set(split.active)
            for layer in set(range(L)) - set(split.active):
                fresh = split.cache.copies[layer] is not copies.get(layer)
                assert fresh == (layer in left), layer
                if layer in before:  # the period's trained weights came back to the host
                    assert masters_before[layer] is not split.masters[layer]
                else:
                    assert masters_before[layer] is split.masters[layer]
            for layer in left:  # the new copy is of the trained weights, not the old ones
                w, q = np.asarray(split.masters[layer]["wq"]), split.cache.copies[layer]["wq"]
                assert isinstance(q, Fp8Weight)
                assert not np.array_equal(w, initial[layer]["wq"])
                err = np.linalg.norm(np.asarray(q.dequantize()) - w) / np.linalg.norm(w)
                assert err < 0.05
        trained |= set(split.active)
    for layer in range(L):  # never trained: the master is the initial weights, bit for bit
        if layer not in trained:
            for k, v in split.masters[layer].items():
                np.testing.assert_array_equal(v, initial[layer][k])
    assert step.jitted._cache_size() == 1
    full = step.full_params(split)
    assert len(full["layers"]) == L
    assert all(not isinstance(v, Fp8Weight) for lp in full["layers"] for v in lp.values())


def test_a_split_made_a_tree_and_placed_again_continues_the_same_run(tiny_cfg,
                                                                     perturbed_params,
                                                                     batch_for):
    # what a checkpoint does mid-period: the bf16 tree out, then the step places it again
    cfg = tiny_cfg(num_layers=4)
    p0 = perturbed_params(cfg)
    tx = _lisa(interval=3)
    step = F.make_frozen_lisa_step(cfg, tx, frozen_precision="bf16")
    runs = []
    for cut in (None, 2):
        s = tx.init(p0)
        params = jax.tree.map(jnp.copy, p0)
        for i in range(5):
            if i == cut:
                params = step.full_params(params)
            params, s, _ = step.step_fn(params, s, batch_for(cfg, seed=i))
        runs.append(step.full_params(params))
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
        np.testing.assert_array_equal(a, b)
    assert step.jitted._cache_size() == 1


@pytest.mark.slow
def test_the_trainer_with_fp8_frozen_layers_resumes_bit_identically_and_saves_dense_layers(
        model_dir, data_file, tmp_path, small, final_params, logged_layers, monkeypatch):
    from lisa_jax.config import TrainError
    from lisa_jax.train import train
    with pytest.raises(TrainError, match="use --frozen-precision bf16"):  # no fp8 on a CPU
        train(small(model_dir, data_file, tmp_path / "cpu", frozen_precision="fp8"))
    check = F.check_fp8
    monkeypatch.setattr(F, "check_fp8", lambda device=None, allow_cpu=False: check(
        device, allow_cpu=True))  # fp8 emulated on the CPU
    kw = dict(frozen_precision="fp8", lisa_interval=3)
    straight = train(small(model_dir, data_file, tmp_path / "a", **kw))
    assert straight["status"] == "finished"
    halted = train(small(model_dir, data_file, tmp_path / "b", **kw), halt_at=5)
    assert halted["status"] == "interrupted"
    assert train(small(model_dir, data_file, tmp_path / "b", resume=True, **kw))[
        "status"] == "finished"
    (sa, pa, _), (sb, pb, _) = final_params(tmp_path / "a"), final_params(tmp_path / "b")
    assert sa == sb == 8
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        assert np.asarray(a).dtype.kind == "f"  # the checkpoint holds dense weights
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len({tuple(v) for v in logged_layers(tmp_path / "a").values()}) > 1
    plain = train(small(model_dir, data_file, tmp_path / "c", lisa_interval=3))
    assert plain["status"] == "finished"  # fp8 moves the trained weights a little off bf16's
    _, pc, _ = final_params(tmp_path / "c")
    differ = [not np.array_equal(np.asarray(a), np.asarray(c))
              for a, c in zip(jax.tree.leaves(pa["layers"]), jax.tree.leaves(pc["layers"]))]
    assert any(differ)  # the fp8 run did run its frozen layers in fp8


def _left_and_came_back(samples) -> bool:
    """Whether some layer is in one period's sample, not in the next, and in a later one."""
    periods = [a for i, a in enumerate(samples) if i == 0 or a != samples[i - 1]]
    return any(layer in periods[p] and layer not in periods[p + 1] and
               any(layer in q for q in periods[p + 2:])
               for p in range(len(periods) - 2) for layer in periods[p])


@pytest.mark.parametrize("interval,steps", [(1, 8), pytest.param(3, 16, marks=pytest.mark.slow)])
def test_overlapped_transfers_train_bit_identically_to_the_synchronous_path(
        interval, steps, tiny_cfg, perturbed_params, batch_for):
    # overlap: the next period's layers sent one call ahead, the finished period's written to
    # the host one call late; "read": the same, with full_params read while host copies are
    # under way (what a checkpoint does); "ahead": sent two calls ahead (with interval 1, in
    # the resample's own call, while the layers leaving are still pending); sync: both at the
    # resample; "thread": as "ahead", the transfers made by a thread of their own; "pinned":
    # as "ahead", the masters in pinned host memory (DMA copies, written when started)
    cfg = tiny_cfg(num_layers=4)
    p0 = perturbed_params(cfg)
    tx = _lisa(interval=interval)
    runs = {}
    # "sync_pinned": both at the resample, the masters in pinned host memory
    variants = ("overlap", "read", "ahead", "thread", "pinned", "sync_pinned")
    for name in ("sync",) + variants:
        step = F.make_frozen_lisa_step(cfg, tx, frozen_precision="fp8", allow_cpu=True,
                                       overlap=not name.startswith("sync"),
                                       prefetch_steps=2 if name in ("ahead", "thread",
                                                                    "pinned") else 1,
                                       background_transfers=name == "thread",
                                       host_memory="pinned" if "pinned" in name
                                       else "pageable")
        s = tx.init(p0)
        compiled_before = _compiles.count("jit(_step)")
        split = step.place(jax.tree.map(jnp.copy, p0), s)
        losses, samples, reads = [], [], {}
        for i in range(steps):
            split, s, m = step(split, s, batch_for(cfg, seed=i))
            losses.append(np.asarray(m["loss"]))
            samples.append(split.active)
            assert split.active == tuple(np.asarray(s.active).tolist())
            if name == "sync" or (name == "read" and split.pending):
                reads[i] = jax.tree.map(np.asarray, step.full_params(split))
            if "pinned" in name:  # every master, the finished periods' too, is a pinned array
                kinds = {x.sharding.memory_kind for lp in split.host_masters
                         for x in jax.tree.leaves(lp)}
                assert kinds == {"pinned_host"}, kinds
        runs[name] = dict(losses=losses, samples=samples, reads=reads, stats=dict(step.stats),
                          full=step.full_params(split),
                          copies={i: jax.tree.leaves(c) for i, c in split.cache.copies.items()},
                          jitted=step.jitted._cache_size(),
                          compiled=_compiles.count("jit(_step)") - compiled_before)
    ref = runs["sync"]
    assert _left_and_came_back(ref["samples"])
    assert ref["stats"]["prefetched"] == 0 and ref["stats"]["fetched"] > 2
    for name in variants:  # ahead: two calls before the resample
        run = runs[name]
        assert run["samples"] == ref["samples"]
        for a, b in zip(run["losses"], ref["losses"]):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(jax.tree.leaves(run["full"]), jax.tree.leaves(ref["full"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert run["copies"].keys() == ref["copies"].keys()
        for layer in ref["copies"]:
            qa, qb = run["copies"][layer], ref["copies"][layer]
            assert len(qa) == len(qb)
            for a, b in zip(qa, qb):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=layer)
        if name == "sync_pinned":  # nothing sent ahead: every resample fetched its layers
            assert run["stats"] == ref["stats"]
        else:  # every resample found its incoming layers on the device already
            assert run["stats"]["fetched"] == 0
            assert run["stats"]["prefetched"] == ref["stats"]["fetched"]
        # one executable, reached through one dispatch entry (pinned: every argument is
        # committed to the device, a state from tx.init too)
        assert run["compiled"] == 1
        assert run["jitted"] == 1
    if interval == 1:  # a layer back one period after it left: from its device copy
        assert runs["overlap"]["stats"]["from_device"] > 0
    assert runs["read"]["reads"]  # read while a host copy was under way: the current weights
    for i, full in runs["read"]["reads"].items():
        for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(ref["reads"][i])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_host_memory_is_checked_in_one_line_and_auto_pins_where_it_can(tiny_cfg, monkeypatch):
    cfg, tx = tiny_cfg(num_layers=2), _lisa()
    with pytest.raises(ValueError, match="use one of auto, pageable, pinned"):
        F.make_frozen_lisa_step(cfg, tx, frozen_precision="bf16", host_memory="cuda")
    pinned = "pinned_host" in {m.kind for m in jax.devices()[0].addressable_memories()}
    assert F.make_frozen_lisa_step(cfg, tx, frozen_precision="bf16").host_memory == \
        ("pinned" if pinned else "pageable")

    class NoPinned:  # a backend whose only memory is the device's
        platform = "tpu"

        def addressable_memories(self):
            return [type("Memory", (), {"kind": "device"})()]

    monkeypatch.setattr(F.jax, "devices", lambda: [NoPinned()])
    with pytest.raises(ValueError, match="tpu has no pinned host memory; use "
                                         "host_memory='pageable'") as e:
        F.make_frozen_lisa_step(cfg, tx, frozen_precision="bf16", host_memory="pinned")
    assert "\n" not in str(e.value)
    monkeypatch.setattr(F.jax.sharding, "SingleDeviceSharding", lambda *a, **k: None)
    assert F.make_frozen_lisa_step(cfg, tx, frozen_precision="bf16").host_memory == "pageable"


def test_a_sample_drawn_ahead_that_is_not_the_transforms_is_caught(tiny_cfg, perturbed_params,
                                                                   batch_for):
    cfg = tiny_cfg(num_layers=4)
    p0 = perturbed_params(cfg)
    tx = _lisa(interval=1)
    step = F.make_frozen_lisa_step(cfg, tx, frozen_precision="bf16")
    draw = step._predict_fn
    step._predict_fn = lambda key, period: jnp.sort((draw(key, period) + 1) % 4)
    s = tx.init(p0)
    split = step.place(jax.tree.map(jnp.copy, p0), s)
    with pytest.raises(RuntimeError, match="drawn ahead differs"):
        for i in range(4):
            split, s, _ = step(split, s, batch_for(cfg, seed=i))


def test_a_host_that_will_not_page_lock_falls_back_to_pageable_or_says_so_in_one_line(
        tiny_cfg, perturbed_params, batch_for, monkeypatch):
    """``auto`` keeps training with numpy masters when the host refuses page-locked memory
    part way through the layers (a warning, the same losses as pageable); ``pinned``, asked
    for, fails in one line naming the fix."""
    cfg, tx = tiny_cfg(num_layers=3), _lisa(interval=2, n_active=1)
    if F.make_frozen_lisa_step(cfg, tx, frozen_precision="bf16").host_memory != "pinned":
        pytest.skip("this backend has no pinned host memory")
    p0 = perturbed_params(cfg)

    def run(host_memory):
        step = F.make_frozen_lisa_step(cfg, tx, frozen_precision="bf16", host_memory=host_memory)
        s = tx.init(p0)
        split = step.place(jax.tree.map(jnp.copy, p0), s)
        losses = []
        for i in range(4):
            split, s, m = step(split, s, batch_for(cfg, seed=i))
            losses.append(float(m["loss"]))
        return step, split, losses

    _, _, want = run("pageable")
    put, calls = F.jax.device_put, []

    def refusing_put(x, device=None, *a, **k):
        if getattr(device, "memory_kind", None) == "pinned_host":
            calls.append(1)
            if len(calls) > 1:  # the first layer pinned, the second refused
                raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating pinned host memory")
        return put(x, device, *a, **k)
    monkeypatch.setattr(F.jax, "device_put", refusing_put)
    with pytest.warns(UserWarning, match="did not page-lock"):
        step, split, got = run("auto")
    assert step.host_memory == "pageable"
    assert all(isinstance(v, np.ndarray) for lp in split.masters for v in lp.values())
    assert got == want
    calls.clear()
    with pytest.raises(ValueError, match="did not page-lock.*use host_memory='pageable'") as e:
        run("pinned")
    assert "\n" not in str(e.value)
