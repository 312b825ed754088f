"""Several devices (SPMD over a ("dp", "fsdp", "tp") mesh) against one device.

JAX fixes its device count when it starts, and this pytest process has started it already, so
the multi-device checks run in a subprocess with 8 simulated CPU devices: this file run as a
script (``python tests/test_sharding.py CHECK [ARGS]``) is that subprocess.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
DEVICES = 8


def cpu_env(devices: int, several_processes: bool = False) -> dict:
    """The environment of a subprocess with ``devices`` simulated CPU devices (and gloo for the
    collectives between processes when there are several)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                          + f" --xla_force_host_platform_device_count={devices}").strip())
    if several_processes:
        env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    return env


def run_worker(*args, timeout=300) -> dict:
    proc = subprocess.run([sys.executable, HERE, *args], env=cpu_env(DEVICES),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_two_processes(command) -> list[str]:
    """``command(port, process_id)`` started as two processes of 4 CPU devices that join
    through ``jax.distributed`` at ``localhost:port``; their stdouts."""
    import socket
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, *command(port, i)],
                              env=cpu_env(4, several_processes=True), cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    return [out for out, _ in outs]


# ----------------------------------------------------------------------------- expected specs

# The tiny model of the workers: V=64, D=32, F=64, N=4, K=2, H=8, L=6.
# Written out by hand (not from the rule function) so the rules themselves are under test.
EXPECTED = {
    "fsdp=4,tp=2": {
        "embed": "('tp', 'fsdp')", "lm_head": "('fsdp', 'tp')", "final_norm": "('fsdp',)",
        "layers/attn_norm": "(None, 'fsdp')", "layers/mlp_norm": "(None, 'fsdp')",
        "layers/wq": "(None, 'fsdp', 'tp')", "layers/wk": "(None, 'fsdp', 'tp')",
        "layers/wv": "(None, 'fsdp', 'tp')", "layers/w_gate": "(None, 'fsdp', 'tp')",
        "layers/w_up": "(None, 'fsdp', 'tp')",
        "layers/wo": "(None, 'tp', 'fsdp')", "layers/w_down": "(None, 'tp', 'fsdp')",
    },
    "fsdp=8": {
        "embed": "('fsdp', None)", "lm_head": "(None, 'fsdp')", "final_norm": "('fsdp',)",
        "layers/attn_norm": "(None, 'fsdp')", "layers/mlp_norm": "(None, 'fsdp')",
        "layers/wq": "(None, 'fsdp', None)", "layers/wk": "(None, 'fsdp', None)",
        "layers/wv": "(None, 'fsdp', None)", "layers/w_gate": "(None, None, 'fsdp')",
        "layers/w_up": "(None, None, 'fsdp')",
        "layers/wo": "(None, 'fsdp', None)", "layers/w_down": "(None, 'fsdp', None)",
    },
}


def _spec_str(spec) -> str:
    return str(tuple(spec))


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("method", ["lisa", pytest.param("full", marks=pytest.mark.slow)])
def test_sharded_training_equals_one_device_and_leaves_carry_their_shardings(method):
    out = run_worker("train", method)
    if method == "lisa":
        prefetch = out.pop("prefetch")
        assert prefetch["max_abs_diff"] < 1e-5 and prefetch["active"] == out["fsdp=8"]["active"]
    for mesh, res in out.items():
        assert res["max_abs_diff"] < 1e-5, (mesh, res["max_abs_diff"])
        assert res["params_spec"] == EXPECTED[mesh], mesh
        if method == "lisa":
            assert res["resamples"] >= 3, res["active"]
            assert res["active"] == res["active_ref"]
        # Optimizer state: moments like their parameter; everything else replicated.
        for path, spec in res["state_spec"].items():
            param = next((p for p in EXPECTED[mesh] if path.endswith("/" + p)), None)
            if param is not None and ("/mu/" in path or "/nu/" in path):
                assert spec == EXPECTED[mesh][param], (mesh, path, spec)
            else:
                assert spec in ("()", "(None,)", "(None, None)"), (mesh, path, spec)
        assert res["n_moment_leaves"] == 2 * len(EXPECTED[mesh])


def test_load_hf_places_each_leaf_in_its_sharding(make_tiny_hf):
    path = make_tiny_hf("gqa")  # 3 layers, D=64, F=96, N=8, K=2, vocab 160
    out = run_worker("load", path)
    assert out["max_abs_diff"] == 0.0
    spec = out["spec"]
    assert spec["embed"] == "('tp', 'fsdp')" and spec["lm_head"] == "('fsdp', 'tp')"
    assert spec["layers/wq"] == "(None, 'fsdp', 'tp')"
    assert spec["layers/wk"] == "(None, 'fsdp', 'tp')"  # K=2 heads divide tp=2
    assert spec["layers/wo"] == "(None, 'tp', 'fsdp')"
    assert spec["layers/w_down"] == "(None, 'tp', 'fsdp')"
    assert spec["layers/attn_norm"] == "(None, 'fsdp')"
    assert out["devices_per_leaf"] == 8
    # Each device's block is read on its own, never the whole tensor: 1/8 of every matrix
    # (fsdp x tp), 1/4 of every norm (fsdp; its 2 tp replicas read it twice).
    for name, largest in out["largest_block"].items():
        matrix = not name.endswith("norm.weight")
        assert largest == pytest.approx(1 / 8 if matrix else 1 / 4), name
        assert out["total_read"][name] == pytest.approx(1.0 if matrix else 2.0), name
    assert len(out["largest_block"]) == 3 + 3 * 9  # embed, norm, head; 9 tensors per layer


@pytest.mark.slow  # two processes; test_trainer_with_mesh_runs_sharded is the quick check
def test_two_processes_load_their_halves_train_and_export_like_one(make_tiny_hf, tmp_path):
    """Several hosts, simulated by two processes of 4 CPU devices joined by
    ``jax.distributed``: each reads only the blocks of its own devices, the sharded LISA steps
    run across both, and the export gathers from both and equals a one-process run."""
    import numpy as np
    from safetensors.numpy import load_file

    path = make_tiny_hf("gqa")
    outs = run_two_processes(lambda port, i: [HERE, "steps", path, str(tmp_path / "two"),
                                              str(port), str(i)])
    two = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    one = run_worker("steps", path, str(tmp_path / "one"))

    assert two[0]["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two[0]["losses"] == two[1]["losses"]
    for res in two:  # each process read exactly its half of every matrix, never more
        for name, total in res["total_read"].items():
            if not name.endswith("norm.weight"):
                assert total == pytest.approx(0.5), name
    got = load_file(str(tmp_path / "two" / "model.safetensors"))
    ref = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert sorted(got) == sorted(ref)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
    before = load_file(os.path.join(path, "model.safetensors"))
    assert any(not np.array_equal(ref[name], before[name]) for name in ref)  # the steps did train


@pytest.mark.slow
def test_trainer_on_two_processes_matches_one_process(tmp_path):
    """``lisa-jax train --distributed`` as two processes of 4 CPU devices against the same run
    on one process of 8: same losses and layers, one set of files (process 0's), an export that
    matches."""
    import jax
    import numpy as np

    from lisa_jax.config import DEMO_DIR
    from lisa_jax.hf import load_hf

    args = ["-m", "lisa_jax.cli", "train", "--model", str(DEMO_DIR / "model"),
            "--data", str(DEMO_DIR / "instructions.jsonl"), "--method", "lisa",
            "--lisa-layers", "2", "--lisa-interval", "2", "--steps", "4", "--batch-size", "8",
            "--max-seq-len", "48", "--eval-fraction", "0", "--no-progress",
            "--mesh", "fsdp=4,tp=2", "--lr", "3e-3"]

    run_two_processes(lambda port, i: [
        *args, "--out", str(tmp_path / "two"), "--distributed",
        "--coordinator-address", f"localhost:{port}", "--num-processes", "2",
        "--process-id", str(i)])
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")],
                         env=cpu_env(8), cwd=ROOT, text=True, capture_output=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    def rows(run):
        return [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    got, ref = rows("two"), rows("one")
    assert [r["step"] for r in got] == [1, 2, 3, 4]  # written once, by process 0
    assert [r["active_layers"] for r in got] == [r["active_layers"] for r in ref]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-5)
    a, b = load_hf(tmp_path / "two" / "hf").params, load_hf(tmp_path / "one" / "hf").params
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4)  # AdamW, reordered sums


def test_trainer_with_mesh_runs_sharded(tmp_path):
    out = run_worker("trainer", str(tmp_path / "run"))
    assert out["steps"] == 4 and out["finite"]
    assert out["spec"]["layers/wq"] == "(None, 'fsdp', 'tp')"
    assert out["spec"]["lm_head"] == "('fsdp', 'tp')"
    assert out["state_spec"]["slot_state/0/mu/layers/w_down"] == "(None, 'tp', 'fsdp')"
    assert out["state_spec"]["key"] == "()" and out["state_spec"]["active"] == "()"
    assert out["batch_spec"]["input_ids"] == "('fsdp', None)"
    assert out["bad_batch_error"].startswith("batch size 6 does not divide")
    assert "\n" not in out["bad_batch_error"]
    assert out["per_layer_spec"]["layers/0/wq"] == "('fsdp', 'tp')"
    assert out["per_layer_spec"]["layers/3/w_down"] == "('tp', 'fsdp')"
    assert out["per_layer_loss_diff"] < 1e-5
    assert out["per_layer_checkpoints"]
    # The trainer on a mesh keeps XLA:CPU's collectives in one order (cpu_env does not).
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in out["xla_flags"]


def test_order_cpu_collectives_adds_its_flag_once_on_cpu_and_keeps_a_users_choice(monkeypatch):
    from lisa_jax import sharding as SH
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    SH.order_cpu_collectives()
    SH.order_cpu_collectives()
    assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                                       "--xla_cpu_enable_concurrency_optimized_scheduler=false")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=true")
    SH.order_cpu_collectives()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true"
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    SH.order_cpu_collectives()
    assert os.environ["XLA_FLAGS"] == SH.CPU_COLLECTIVES_IN_ORDER
    # Not on an accelerator host: nothing is added there.
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.delenv("JAX_PLATFORMS")
    SH.order_cpu_collectives()
    assert "XLA_FLAGS" not in os.environ


@pytest.mark.parametrize("spec, expect", [
    ("fsdp=3", "mesh fsdp=3 has 1*3*1 = 3 devices but there are 1"),
    ("fsdp=two", "size of 'fsdp' must be an integer"),
    ("pp=2", "'pp=2' is not AXIS=SIZE"),
    ("fsdp=2,fsdp=2", "axis 'fsdp' given twice"),
    ("", "give at least one AXIS=SIZE"),
])
def test_bad_mesh_spec_is_one_line_error(spec, expect):
    import jax

    from lisa_jax import sharding as SH

    with pytest.raises(SH.ShardingError) as e:
        SH.make_mesh(spec, devices=jax.devices()[:1])
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_mesh_config_parses_and_rules_skip_what_does_not_divide():
    import jax

    from lisa_jax import model as M
    from lisa_jax import sharding as SH

    assert SH.MeshConfig.parse("dp=2, fsdp=4,tp=1").shape == (2, 4, 1)
    mesh = SH.make_mesh("fsdp=1")
    assert mesh.axis_names == ("dp", "fsdp", "tp")

    class FakeMesh:  # only the sizes matter to the rules
        axis_names = ("dp", "fsdp", "tp")

        class devices:
            shape = (1, 4, 2)
    cfg = M.LlamaConfig(vocab_size=30, hidden_size=12, intermediate_size=20, num_layers=3,
                        num_heads=3, num_kv_heads=1, head_dim=4)
    # N=3 heads do not divide tp=2: wq stays whole on tp; the layer axis is never sharded.
    assert SH.leaf_spec(cfg, ("layers", "wq"), (3, 12, 12), FakeMesh) == \
        jax.sharding.PartitionSpec(None, "fsdp", None)
    assert SH.leaf_spec(cfg, ("layers", "w_gate"), (3, 12, 20), FakeMesh) == \
        jax.sharding.PartitionSpec(None, "fsdp", "tp")
    assert SH.leaf_spec(cfg, ("embed",), (30, 12), FakeMesh) == \
        jax.sharding.PartitionSpec("tp", "fsdp")
    assert SH.leaf_spec(cfg, ("layers", "attn_norm"), (4, 12), FakeMesh)[0] is None


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_dims_come_from_the_block_table(tp, tiny_cfg):
    """Every row of ``block``'s table is split on "tp" at its ``tp_dim`` (after the layer axis
    for a layer leaf) when heads and sizes divide, and nowhere else; a LoRA adapter of a
    column-parallel weight splits its ``b``'s output dim, of a row-parallel one its ``a``'s
    input dim."""
    import jax

    from lisa_jax import block
    from lisa_jax import sharding as SH

    class FakeMesh:  # only the sizes matter to the rules
        axis_names = ("dp", "fsdp", "tp")

        class devices:
            shape = (1, 1, tp)
    cfg = tiny_cfg(num_heads=8, num_kv_heads=4, attention_bias=True)
    for row in block.LAYER_PARAMS + block.GLOBAL_PARAMS:
        layer = row in block.LAYER_PARAMS
        shape = ((cfg.num_layers,) if layer else ()) + row.shape(cfg)
        spec = SH.leaf_spec(cfg, ("layers", row.name) if layer else (row.name,), shape,
                            FakeMesh)
        want = [None] * len(shape)
        if row.tp_dim is not None:
            want[row.tp_dim + layer] = "tp"
        assert spec == jax.sharding.PartitionSpec(*want), row.name
        if row.lora:
            a = SH.leaf_spec(cfg, (row.name, "a"), (cfg.num_layers, shape[1], 4), FakeMesh)
            b = SH.leaf_spec(cfg, (row.name, "b"), (cfg.num_layers, 4, shape[2]), FakeMesh)
            column = row.tp_dim == 1
            assert a == jax.sharding.PartitionSpec(None, None if column else "tp", None)
            assert b == jax.sharding.PartitionSpec(None, None, "tp" if column else None)
    # Heads that do not divide tp: the kv projections stay whole, the query ones split.
    few_kv = tiny_cfg(num_heads=8, num_kv_heads=1)
    kv = block.PARAMS_BY_NAME["wk"]
    assert SH.leaf_spec(few_kv, ("layers", "wk"), (6,) + kv.shape(few_kv), FakeMesh) == \
        jax.sharding.PartitionSpec(None, None, None)
    assert SH.leaf_spec(few_kv, ("layers", "wq"), (6, 32, 64), FakeMesh)[2] == "tp"


# ----------------------------------------------------------------------------- the subprocess


def _batches(cfg, n, B=8, S=16):
    import numpy as np
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(0, cfg.vocab_size, (B, S)).astype(np.int32),
             "loss_mask": (np.arange(S)[None] >= 3).repeat(B, 0).astype(np.int32)}
            for _ in range(n)]


def _worker_train(method: str) -> dict:
    import dataclasses

    import jax
    import numpy as np
    import optax

    import lisa_jax
    from lisa_jax import sharding as SH
    from lisa_jax import step as S

    # The shared tiny model of conftest.py (this file, run as a script, has tests/ on its
    # path), with the MLP width the expected specs were written for.
    from conftest import perturbed_params, tiny_config
    cfg = tiny_config(intermediate_size=64)
    # LISA interval 2: samples at steps 0, 2, 4, 6 (3 resamples); full fine-tuning: 3 steps
    # on the mixed mesh only (its rules are the same as LISA's).
    steps = 7 if method == "lisa" else 3
    meshes = ("fsdp=4,tp=2", "fsdp=8") if method == "lisa" else ("fsdp=4,tp=2",)
    batches = _batches(cfg, steps)

    # Adam's first steps divide by |g|: an entry whose gradient is ~1e-9 (reduction-order noise
    # decides its sign) would move by +-lr either way. eps=1e-3 keeps the comparison about the
    # sharding, not about that amplification.
    def adam():
        return optax.adamw(1e-2, eps=1e-3, weight_decay=0.01)

    def make():
        if method == "lisa":
            tx = lisa_jax.lisa(adam(), n_active=2, interval=2, key=3, clip_norm=1.0)
            return tx, lambda sh: S.make_lisa_step(cfg, tx, "none", shardings=sh)
        tx = optax.chain(optax.clip_by_global_norm(1.0), adam())
        return tx, lambda sh: S.make_plain_step(cfg, tx, "none", shardings=sh)

    def run(mesh, prefetch=False):
        tx, mk = make()
        params = perturbed_params(cfg)
        if mesh is None:
            state, sh = tx.init(params), None
        else:
            params = jax.device_put(params, SH.param_shardings(cfg, params, mesh))
            state, sh = SH.init_sharded(tx.init, params, cfg, mesh)
            sh = dataclasses.replace(sh, prefetch=prefetch)
        step = mk(sh)
        actives = []
        for b in batches:
            params, state, _ = step(params, state, b)
            if method == "lisa":
                actives.append([int(i) for i in np.asarray(state.active)])
        return params, state, actives

    ref_params, _, ref_active = run(None)
    out = {}
    for spec in meshes:
        mesh = SH.make_mesh(spec)
        params, state, active = run(mesh)
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
        state_spec = {k: v for k, v in SH.describe(state).items()}
        out[spec] = dict(
            max_abs_diff=diff,
            params_spec={k: v for k, v in SH.describe(params).items()},
            state_spec=state_spec,
            n_moment_leaves=sum(1 for k in state_spec if "/mu/" in k or "/nu/" in k),
            active=active, active_ref=ref_active,
            resamples=len({tuple(a) for a in active}) - 1 if active else 0)
    if method == "lisa":  # each layer's all-gather a layer ahead (--fsdp-prefetch)
        params, _, active = run(SH.make_mesh("fsdp=4,tp=2"), prefetch=True)
        out["prefetch"] = dict(active=active, max_abs_diff=max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params))))
    return out


@contextlib.contextmanager
def recording_reads():
    """``{tensor name: [size of each block read, as a fraction of the tensor]}`` of the
    safetensors reads made inside the block.

    ``load_hf`` with shardings reads each device's block through a ``numpy.memmap`` of the
    tensor; the tensor is named from the file's header (8-byte length, then JSON with each
    tensor's byte range), which the memmap's offset points into.
    """
    import numpy as np

    fractions: dict[str, list[float]] = {}
    names: dict[tuple[str, int], tuple[str, int]] = {}

    def tensor_at(fn, offset):
        if (fn, offset) not in names:
            with open(fn, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            for name, info in header.items():
                if name != "__metadata__":
                    names[(fn, 8 + n + info["data_offsets"][0])] = (name,
                                                                    int(np.prod(info["shape"])))
        return names[(fn, offset)]

    memmap = np.memmap

    class RecordingMemmap(memmap):
        def __new__(cls, filename, *args, offset=0, **kwargs):
            out = memmap.__new__(cls, filename, *args, offset=offset, **kwargs)
            out.tensor = tensor_at(os.fspath(filename), offset)
            return out

        def __getitem__(self, index):
            out = super().__getitem__(index)
            name, size = getattr(self, "tensor", (None, 0))
            if name is not None:
                fractions.setdefault(name, []).append(np.size(out) / size)
            return np.asarray(out)

    np.memmap = RecordingMemmap
    try:
        yield fractions
    finally:
        np.memmap = memmap


def _worker_load(path: str) -> dict:
    import jax
    import numpy as np

    from lisa_jax import sharding as SH
    from lisa_jax.hf import load_hf

    mesh = SH.make_mesh("fsdp=4,tp=2")
    ref = load_hf(path)
    with recording_reads() as fractions:
        got = load_hf(path, shardings=SH.hf_shardings(path, mesh))
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(ref.params)))
    spec = {k: v for k, v in SH.describe(got.params).items()}
    return dict(max_abs_diff=diff, spec=spec,
                devices_per_leaf=min(len(x.sharding.device_set)
                                     for x in jax.tree.leaves(got.params)),
                largest_block={k: max(v) for k, v in fractions.items()},
                total_read={k: sum(v) for k, v in fractions.items()})


def _worker_trainer(out_dir: str) -> dict:
    import math

    from lisa_jax import config as C
    from lisa_jax import methods as MT
    from lisa_jax import sharding as SH
    from lisa_jax import train as T

    seen = {}

    class Recording(MT.Lisa):  # keeps what the trainer's step returned
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            inner = self.step_fn

            def step(p, s, b):
                out = inner(p, s, b)
                seen["params"], seen["state"], seen["batch"] = out[0], out[1], b
                return out
            self.step_fn = step

    MT.METHODS["lisa"] = Recording
    base = dict(model=str(C.DEMO_DIR / "model"), data=str(C.DEMO_DIR / "instructions.jsonl"),
                method="lisa", lisa_layers=2, lisa_interval=2, steps=4, batch_size=8,
                max_seq_len=48, eval_fraction=0.0, save_every=100,
                progress=False, export=False, mesh="fsdp=4,tp=2")
    summary = T.train(C.TrainConfig(out=out_dir, **base))
    try:
        T.train(C.TrainConfig(out=out_dir + "-bad", **{**base, "batch_size": 6}))
        bad = ""
    except C.TrainError as e:
        bad = str(e)
    def losses(out):
        rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
        return [r["loss"] for r in rows if "loss" in r]
    result = dict(steps=summary["steps"], finite=all(math.isfinite(x) for x in losses(out_dir)),
                  spec=SH.describe(seen["params"]), state_spec=SH.describe(seen["state"]),
                  batch_spec=SH.describe(seen["batch"]), bad_batch_error=bad,
                  xla_flags=os.environ.get("XLA_FLAGS", ""))
    # The per-layer layout on the same mesh: each layer's arrays sharded as its slice of the
    # stack, the same losses, and a checkpoint stacked again (what --resume reads)
    per_layer = out_dir + "-per-layer"
    T.train(C.TrainConfig(out=per_layer, **{**base, "layer_layout": "per_layer"}))
    result.update(per_layer_spec=SH.describe(seen["params"]),
                  per_layer_loss_diff=max(abs(a - b) for a, b in zip(losses(out_dir),
                                                                     losses(per_layer))),
                  per_layer_checkpoints=sorted(os.listdir(os.path.join(per_layer,
                                                                       "checkpoints"))))
    return result


def _worker_steps(path: str, out_dir: str, port: str | None = None,
                  process_id: str | None = None) -> dict:
    """Sharded load (fsdp=4,tp=2), three LISA steps, export; with ``port`` as one of two
    processes joined by ``jax.distributed`` (4 devices each)."""
    import jax
    if port is not None:
        jax.distributed.initialize(f"localhost:{port}", num_processes=2,
                                   process_id=int(process_id))
    import numpy as np
    import optax

    import lisa_jax
    from lisa_jax import hf as hf_lib
    from lisa_jax import sharding as SH
    from lisa_jax import step as S
    from lisa_jax.model import Model

    mesh = SH.make_mesh("fsdp=4,tp=2")
    with recording_reads() as fractions:
        model = hf_lib.load_hf(path, shardings=SH.hf_shardings(path, mesh))
    # SGD with momentum: an update proportional to the gradient, so a different summation
    # order across processes shows as rounding, where Adam's normalized steps would amplify it.
    tx = lisa_jax.lisa(optax.sgd(0.5, momentum=0.9), n_active=1, interval=2, key=0)
    state, sh = SH.init_sharded(tx.init, model.params, model.cfg, mesh)
    step = S.make_lisa_step(model.cfg, tx, shardings=sh)
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (8, 16))
    params, losses = model.params, []
    for _ in range(3):
        params, state, metrics = step(params, state, {"input_ids": ids})
        losses.append(float(metrics["loss"]))
    hf_lib.save_hf(Model(model.cfg, params), out_dir)
    return dict(losses=losses, total_read={k: sum(v) for k, v in fractions.items()})


if __name__ == "__main__":
    check, *rest = sys.argv[1:]
    result = {"train": _worker_train, "load": _worker_load,
              "trainer": _worker_trainer, "steps": _worker_steps}[check](*rest)
    print(json.dumps(result))
