"""Hugging Face checkpoints: load an HF model directory into a :class:`~lisa_jax.model.Model`,
and write a :class:`Model` back as a directory ``transformers`` loads.

The name of each tensor is its row's in ``lisa_jax.block``'s parameter table: a layer leaf
``layers/wq[i]`` is ``model.layers.{i}.self_attn.q_proj.weight``, ``embed`` is
``model.embed_tokens.weight``. Linear weights are stored ``[out, in]`` by HF and ``[in, out]``
here (the table's ``transposed``), so they are transposed on the way in and out. A family's
fused tensors (Phi-3's ``qkv_proj`` and ``gate_up_proj``) are split into their rows on the way
in and joined on the way out.

Loading never holds two full copies of the weights on the host: the headers are checked
first (names and shapes, before any data is read), then tensors are read one at a time, with
plain reads rather than a memory map, straight into a preallocated stacked ``[L, ...]`` array
of the target dtype (through a one-tensor temporary when it must be transposed or cast), and
each leaf is moved to its device as soon as its last layer is filled, dropping the host copy.
Peak host memory is about the weights plus the largest leaf (``experiments/load_memory.py``).

>>> import tempfile, jax, jax.numpy as jnp
>>> from lisa_jax.model import LlamaConfig, Model, init_params
>>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
...                   num_heads=2, num_kv_heads=1, head_dim=8)
>>> model = Model(cfg, init_params(cfg, jax.random.key(0)))
>>> with tempfile.TemporaryDirectory() as d:
...     _ = save_hf(model, d + "/ckpt")
...     again = load_hf(d + "/ckpt")
>>> bool(jnp.all(again.params["layers"]["wq"] == model.params["layers"]["wq"]))
True
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for safetensors' numpy backend)
import numpy as np

from lisa_jax import block
from lisa_jax.atomic_dir import fresh_dir, replace_dir
from lisa_jax.model import SUPPORTED_MODEL_TYPES, LlamaConfig, Model

CONFIG_NAME = "config.json"
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)

# Buffers some older checkpoints carry; they hold nothing we need.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "half": "float16",
                  "float": "float32"}

Sharding = Any
ShardingFn = Callable[[tuple[str, ...], tuple[int, ...], Any], "Sharding | None"]


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        dtype = _DTYPE_ALIASES.get(dtype.lower(), dtype)
    try:
        name = jnp.dtype(dtype).name
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from e
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unsupported dtype {name!r}; use float32, bfloat16 or float16")
    return name


def _leaf_shapes(cfg: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our shape of every leaf, keyed by its path in the parameter tree."""
    shapes = {(p.name,): p.shape(cfg) for p in block.global_params(cfg)}
    for p in block.layer_params(cfg):
        shapes[("layers", p.name)] = (cfg.num_layers,) + p.shape(cfg)
    return shapes


def _hf_names(cfg: LlamaConfig) -> dict[str, tuple[tuple, ...]]:
    """HF tensor name -> its parts, each ``(our leaf path, layer index or None, transposed?,
    rows)``: ``rows`` is the ``(start, stop)`` of HF's first (output) dimension the leaf fills,
    None for the whole tensor. A fused tensor (the family's ``fused``: Phi-3's ``qkv_proj``)
    has one part per row it joins."""
    out = {p.hf: (((p.name,), None, p.transposed, None),) for p in block.global_params(cfg)}
    rows = {p.name: p for p in block.layer_params(cfg)}
    fused = block.FAMILIES[cfg.model_type].fused
    joined = {name for _, names in fused for name in names}
    for i in range(cfg.num_layers):
        for p in rows.values():
            if p.name not in joined:
                out[f"model.layers.{i}.{p.hf}"] = ((("layers", p.name), i, p.transposed, None),)
        for hf_name, names in fused:
            parts, start = [], 0
            for name in names:
                size = rows[name].shape(cfg)[-1 if rows[name].transposed else 0]
                parts.append((("layers", name), i, rows[name].transposed, (start, start + size)))
                start += size
            out[f"model.layers.{i}.{hf_name}"] = tuple(parts)
    return out


def _hf_shape(parts, shapes) -> tuple[int, ...]:
    """The HF shape of a tensor made of ``parts`` (``_hf_names``), from our leaf shapes."""
    pieces = []
    for leaf, layer, transposed, _ in parts:
        shape = shapes[leaf][1:] if layer is not None else shapes[leaf]
        pieces.append(tuple(shape[::-1]) if transposed else tuple(shape))
    return (sum(p[0] for p in pieces),) + pieces[0][1:] if len(pieces) > 1 else pieces[0]


def _name_list(names, limit: int = 4) -> str:
    names = sorted(names, key=_natural_key)
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _shapes_in(fn: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file (reads the header only)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(fn, framework="numpy") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{fn} is not a readable safetensors file ({e}); re-download or "
                         "re-save the checkpoint") from None


def _weight_files(path: str) -> dict[str, str]:
    """HF tensor name -> the safetensors file holding it."""
    index = os.path.join(path, WEIGHTS_INDEX)
    single = os.path.join(path, SINGLE_WEIGHTS)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map'; re-save the checkpoint with "
                             "save_pretrained or save_hf")
        files = {name: os.path.join(path, fn) for name, fn in weight_map.items()}
        absent = sorted({fn for fn in files.values() if not os.path.isfile(fn)})
        if absent:
            raise FileNotFoundError(
                f"{WEIGHTS_INDEX} in {path} names shard files that are not there: "
                f"{_name_list([os.path.basename(a) for a in absent])}; copy the whole checkpoint")
        return files
    if os.path.isfile(single):
        return {name: single for name in _shapes_in(single)}
    others = [fn for fn in ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")
              if os.path.exists(os.path.join(path, fn))]
    hint = (f" (found {', '.join(others)}: convert it to safetensors, e.g. load it with "
            "transformers and call save_pretrained(..., safe_serialization=True))" if others
            else "; pass the directory save_pretrained or save_hf wrote")
    raise FileNotFoundError(f"no {SINGLE_WEIGHTS} or {WEIGHTS_INDEX} in {path}{hint}")


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class _SafetensorsFile:
    """Reads tensors of one safetensors file with plain reads into numpy buffers.

    safetensors' own readers memory-map the file; the pages they touch count as resident
    memory until the file is closed, i.e. up to a whole shard on top of the weights being
    assembled. Reading with ``readinto`` keeps the host footprint to the destination arrays.
    (The format: 8-byte little-endian header length, a JSON header mapping each name to its
    dtype, shape and byte range, then the data.)
    """

    def __init__(self, fn: str):
        self.fn = fn
        self.f = open(fn, "rb")
        n = int.from_bytes(self.f.read(8), "little")
        header = json.loads(self.f.read(n))
        header.pop("__metadata__", None)
        self.header = header
        self.base = 8 + n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def offset(self, name: str) -> int:
        return self.header[name]["data_offsets"][0]

    def dtype(self, name: str):
        kind = self.header[name]["dtype"]
        if kind not in _ST_DTYPES:
            raise ValueError(f"tensor {name} in {self.fn} has unsupported dtype {kind}")
        return np.dtype(_ST_DTYPES[kind])

    def read_into(self, name: str, out: np.ndarray) -> None:
        info = self.header[name]
        start, end = info["data_offsets"]
        if (tuple(out.shape) != tuple(info["shape"]) or out.dtype != self.dtype(name)
                or not out.flags.c_contiguous or out.nbytes != end - start):
            raise ValueError(f"tensor {name} in {self.fn}: header says {info}, buffer is "
                             f"{out.dtype}{list(out.shape)}")
        self.f.seek(self.base + start)
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = 0
        while got < len(view):
            k = self.f.readinto(view[got:])
            if not k:
                raise ValueError(f"{self.fn} is truncated (tensor {name}); re-download or "
                                 "re-save the checkpoint")
            got += k

    def read(self, name: str) -> np.ndarray:
        out = np.empty(self.header[name]["shape"], self.dtype(name))
        self.read_into(name, out)
        return out

    def block(self, name: str, index: tuple) -> np.ndarray:
        """``tensor[index]`` read from the file through a memory map: only the pages holding
        the block are read (rows, or row pieces, of the row-major tensor)."""
        info = self.header[name]
        start = info["data_offsets"][0]
        mm = np.memmap(self.fn, dtype=self.dtype(name), mode="r", offset=self.base + start,
                       shape=tuple(info["shape"]))
        return np.array(mm[index])


def read_hf_config(path: str) -> dict:
    """``config.json`` of an HF model directory, with one-line errors for the usual mistakes."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory; pass a local HF model directory "
                                "(the one save_pretrained or save_hf writes)")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}; pass an HF model directory "
                                "(the one save_pretrained or save_hf writes)")
    with open(cfg_path) as f:
        hf = json.load(f)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} in {cfg_path}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if hf.get("mlp_bias"):
        raise ValueError(f"mlp_bias=true in {cfg_path} is not supported (Llama MLPs without "
                         "biases only)")
    gemma = block.FAMILIES[model_type].norm_plus_one  # its activation is checked by from_hf
    if not gemma and hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"hidden_act {hf['hidden_act']!r} in {cfg_path} is not supported; "
                         "only silu")
    return hf


def load_hf(path, dtype=jnp.float32, shardings: ShardingFn | None = None) -> Model:
    """Load an HF model directory of a supported family (safetensors) as a :class:`Model`.

    ``dtype``: the parameter (and activation) dtype, a jnp dtype or its name ("float32",
    "bfloat16", "float16"). ``shardings``: optional ``(leaf_path, shape, dtype) -> Sharding or
    None``, called once per leaf (``leaf_path`` e.g. ``("layers", "wq")`` or ``("embed",)``,
    ``shape`` our stacked shape); each device's block of the leaf is then read straight from
    the files (``jax.make_array_from_callback``), so on several hosts every process reads only
    the slices its devices hold (``None``: the whole leaf on the default device).
    """
    path = os.fspath(path)
    hf = read_hf_config(path)
    dtype_name = _dtype_name(dtype)
    cfg = LlamaConfig.from_hf(hf, dtype=dtype_name)

    files = _weight_files(path)
    expected = _hf_names(cfg)
    present = {n for n in files if not _IGNORED.fullmatch(n)}
    if cfg.tie_embeddings:
        present.discard("lm_head.weight")  # some exporters write the tied copy too
    missing = sorted(set(expected) - present, key=_natural_key)
    unexpected = sorted(present - set(expected), key=_natural_key)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {_name_list(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {_name_list(unexpected)}")
        raise ValueError(f"checkpoint {path} does not match its {CONFIG_NAME} "
                         f"({cfg.model_type}, {cfg.num_layers} layers, "
                         f"attention_bias={cfg.attention_bias}, "
                         f"tie_word_embeddings={cfg.tie_embeddings}): {'; '.join(parts)}")

    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)

    # Check every shape from the headers before reading any data.
    shapes = _leaf_shapes(cfg)
    for fn, names in by_file.items():
        in_file = _shapes_in(fn)
        for name in names:
            want = _hf_shape(expected[name], shapes)
            if name not in in_file:
                raise ValueError(f"{WEIGHTS_INDEX} places {name} in {os.path.basename(fn)}, "
                                 "which does not hold it; the index and the shards disagree")
            got = in_file[name]
            if got != tuple(want):
                raise ValueError(f"tensor {name} in {os.path.basename(fn)} has shape "
                                 f"{list(got)}, but {CONFIG_NAME} implies {list(want)}; "
                                 "the config and the weights disagree")

    np_dtype = np.dtype(jnp.dtype(dtype_name))
    if shardings is not None:
        return Model(cfg, _load_sharded(cfg, expected, files, shapes, np_dtype, shardings))
    host: dict[tuple[str, ...], np.ndarray] = {}
    remaining = {leaf: (shape[0] if leaf[0] == "layers" else 1) for leaf, shape in shapes.items()}
    placed: dict[tuple[str, ...], jax.Array] = {}

    def place(leaf):
        arr = host.pop(leaf)
        sharding = shardings(leaf, arr.shape, jnp.dtype(dtype_name)) if shardings else None
        placed[leaf] = jax.device_put(arr, sharding) if sharding is not None \
            else jax.device_put(arr)
        # Wait for the copy, so the host buffer is freed now and not with all the others.
        placed[leaf].block_until_ready()

    for fn in sorted(by_file, key=_natural_key):
        with _SafetensorsFile(fn) as f:
            for name in sorted(by_file[fn], key=lambda n: f.offset(n)):
                parts = expected[name]
                for leaf, *_ in parts:
                    if leaf not in host:
                        host[leaf] = np.empty(shapes[leaf], np_dtype)
                leaf, layer, transposed, _ = parts[0]
                if len(parts) == 1 and not transposed and f.dtype(name) == np_dtype:
                    dst = host[leaf] if layer is None else host[leaf][layer]
                    f.read_into(name, dst)  # straight into place, no temporary
                else:
                    src = f.read(name)
                    for leaf, layer, transposed, rows in parts:
                        dst = host[leaf] if layer is None else host[leaf][layer]
                        piece = src if rows is None else src[rows[0]:rows[1]]
                        dst[...] = piece.T if transposed else piece
                    del src
                for leaf, *_ in parts:
                    remaining[leaf] -= 1
                    if remaining[leaf] == 0:
                        place(leaf)

    return Model(cfg, _params_tree(placed))


def _params_tree(leaves: dict[tuple[str, ...], Any]) -> dict:
    """The parameter dict from ``{leaf path: array}`` (``("embed",)``, ``("layers", "wq")``)."""
    params: dict[str, Any] = {"layers": {}}
    for leaf, arr in leaves.items():
        if leaf[0] == "layers":
            params["layers"][leaf[1]] = arr
        else:
            params[leaf[0]] = arr
    return params


def _load_sharded(cfg, expected, files, shapes, np_dtype, shardings) -> dict:
    """Every leaf built with ``jax.make_array_from_callback``: each addressable device's block
    is read straight from the safetensors files, so a process reads only the slices its own
    devices hold (several hosts: each host its part; one host: never a whole leaf in memory)."""
    sources: dict[tuple[str, ...], Any] = {}
    for name, parts in expected.items():
        for leaf, layer, transposed, rows in parts:
            src = (files[name], name, transposed, rows)
            if layer is None:
                sources[leaf] = src
            else:
                sources.setdefault(leaf, [None] * shapes[leaf][0])[layer] = src
    opened: dict[str, _SafetensorsFile] = {}

    def read(src, index):
        fn, name, transposed, rows = src
        if fn not in opened:
            opened[fn] = _SafetensorsFile(fn)
        f = opened[fn]
        hf_index = list(index)[::-1] if transposed else list(index)
        if rows is not None:  # a fused tensor: this leaf's rows of HF's output dimension
            start, stop, step = hf_index[0].indices(rows[1] - rows[0])
            hf_index[0] = slice(rows[0] + start, rows[0] + stop, step)
        if transposed:  # HF keeps Linear weights as [out, in]; ours are [in, out]
            return f.block(name, tuple(hf_index)).T.astype(np_dtype)
        return f.block(name, tuple(hf_index)).astype(np_dtype, copy=False)

    def callback_for(leaf):
        src = sources[leaf]
        if leaf[0] != "layers":
            return lambda index: read(src, index)

        def layer_blocks(index):
            layers = range(shapes[leaf][0])[index[0]]
            return np.stack([read(src[i], index[1:]) for i in layers])
        return layer_blocks

    placed: dict[tuple[str, ...], jax.Array] = {}
    try:
        for leaf, shape in shapes.items():
            sharding = shardings(leaf, shape, jnp.dtype(np_dtype))
            if sharding is None:  # the default device
                sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            placed[leaf] = jax.make_array_from_callback(shape, sharding, callback_for(leaf))
    finally:
        for f in opened.values():
            f.f.close()
    return _params_tree(placed)


# ----------------------------------------------------------------------------- saving


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r} not understood; use e.g. '2GB', '500MB' or "
                         "a number of bytes")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def _hf_tensors(cfg: LlamaConfig, params) -> Iterator[tuple[str, tuple, Any, Callable]]:
    """(HF name, HF shape, dtype, fetch) per tensor; ``fetch()`` gives the host array."""
    def fetch(leaf, layer, transposed):
        def go():
            x = leaf[layer] if layer is not None else leaf
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                # Spread over several processes: every process takes part in the gather.
                from jax.experimental import multihost_utils
                a = np.asarray(multihost_utils.process_allgather(x, tiled=True))
            else:
                a = np.asarray(jax.device_get(x))
            return np.ascontiguousarray(a.T if transposed else a)
        return go

    def joined(fetches):
        return lambda: np.concatenate([f() for f in fetches], axis=0)

    for hf_name, parts in _hf_names(cfg).items():
        fetches, shapes = [], []
        for path, layer, transposed, _ in parts:
            leaf = params[path[0]] if len(path) == 1 else params[path[0]][path[1]]
            shape = tuple(leaf.shape[1:] if layer is not None else leaf.shape)
            shapes.append(shape[::-1] if transposed else shape)
            fetches.append(fetch(leaf, layer, transposed))
        shape = (sum(s[0] for s in shapes),) + shapes[0][1:] if len(parts) > 1 else shapes[0]
        yield hf_name, shape, leaf.dtype, fetches[0] if len(parts) == 1 else joined(fetches)


def _check_layout(cfg: LlamaConfig, params) -> None:
    shapes = _leaf_shapes(cfg)
    have = {}
    for k, v in params.items():
        if k == "layers":
            have.update({("layers", n): a for n, a in v.items()})
        else:
            have[(k,)] = v
    missing = sorted("/".join(p) for p in set(shapes) - set(have))
    extra = sorted("/".join(p) for p in set(have) - set(shapes))
    if missing or extra:
        raise ValueError(f"params do not match the config (tie_embeddings={cfg.tie_embeddings}, "
                         f"attention_bias={cfg.attention_bias}): missing {missing or 'none'}, "
                         f"unexpected {extra or 'none'}")
    for p, want in shapes.items():
        if tuple(have[p].shape) != want:
            raise ValueError(f"param {'/'.join(p)} has shape {list(have[p].shape)}, the config "
                             f"implies {list(want)}")


def save_hf(model: Model, out_dir, tokenizer_from=None, max_shard_size="2GB") -> str:
    """Write ``model`` as an HF model directory that ``transformers`` loads.

    Writes ``config.json``, the weights as safetensors (one shard at a time, each at most
    ``max_shard_size``, e.g. "2GB" = 2e9 bytes or "2GiB"; a ``model.safetensors.index.json``
    when there is more than one), ``generation_config.json`` and the tokenizer files of the
    directory ``tokenizer_from`` (if given). The directory is built beside ``out_dir`` and
    renamed into place at the end, so a crash never leaves a half-written checkpoint; an
    existing ``out_dir`` is replaced. Tensors are written exactly (no dtype conversion).
    Returns ``out_dir``.

    Parameters spread over several processes (hosts): call it on every process; each tensor is
    gathered with all of them taking part, and process 0 writes the directory.
    """
    from safetensors.numpy import save_file

    cfg, params = model.cfg, model.params
    _check_layout(cfg, params)
    limit = _parse_size(max_shard_size)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if tokenizer_from is not None and not os.path.isdir(tokenizer_from):
        raise FileNotFoundError(f"tokenizer_from={tokenizer_from!r} is not a directory; pass the "
                                "HF directory holding tokenizer.json / tokenizer_config.json")

    tensors = list(_hf_tensors(cfg, params))
    shards: list[list] = [[]]
    size = 0
    total = 0
    for t in tensors:
        nbytes = int(np.prod(t[1], dtype=np.int64)) * jnp.dtype(t[2]).itemsize
        total += nbytes
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes

    if jax.process_index() != 0:
        for shard in shards:  # the gathers need every process; only process 0 writes
            for *_, fetch in shard:
                fetch()
        return out_dir

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = fresh_dir(parent, f".{os.path.basename(out_dir)}.tmp-")
    # The mode open() gives a new file under the umask (the directory's, less execute):
    # safetensors writes its files owner-only.
    file_mode = os.stat(tmp).st_mode & 0o666
    try:
        weight_map = {}
        for s, shard in enumerate(shards):
            fn = SINGLE_WEIGHTS if len(shards) == 1 else \
                f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
            arrays = {name: fetch() for name, _, _, fetch in shard}
            save_file(arrays, os.path.join(tmp, fn), metadata={"format": "pt"})
            os.chmod(os.path.join(tmp, fn), file_mode)
            del arrays
            weight_map.update({name: fn for name, *_ in shard})
        if len(shards) > 1:
            with open(os.path.join(tmp, WEIGHTS_INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                          indent=2, sort_keys=True)

        hf = _hf_config(cfg, params)
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(hf, f, indent=2, sort_keys=True)

        gen = {}
        if tokenizer_from is not None:
            src = os.path.join(tokenizer_from, GENERATION_CONFIG)
            if os.path.isfile(src):  # keep the sampling defaults of the original model
                with open(src) as f:
                    gen = json.load(f)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if hf.get(key) is None:
                continue
            gen[key] = (_joined_eos(gen.get(key), hf[key]) if key == "eos_token_id"
                        else hf[key])
        gen["transformers_version"] = hf["transformers_version"]
        with open(os.path.join(tmp, GENERATION_CONFIG), "w") as f:
            json.dump(gen, f, indent=2, sort_keys=True)

        if tokenizer_from is not None:
            for fn in TOKENIZER_FILES:
                src = os.path.join(tokenizer_from, fn)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(tmp, fn))

        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _joined_eos(source, model_eos):
    """The generation config's eos ids: a list the source model had is kept (instruct
    checkpoints stop at several ids while their config.json names one), with any id of the
    model config it lacks appended; otherwise the model config's value."""
    if not isinstance(source, list):
        return model_eos
    joined = list(source)
    for e in model_eos if isinstance(model_eos, list) else [model_eos]:
        if e not in joined:
            joined.append(e)
    return joined


def _hf_config(cfg: LlamaConfig, params) -> dict:
    try:
        import transformers
        version = transformers.__version__
    except ImportError:  # pragma: no cover
        version = "4.45.0"
    hf = cfg.to_hf()
    dt = jnp.dtype(params["embed"].dtype).name
    hf["torch_dtype"] = dt
    hf["dtype"] = dt
    hf["transformers_version"] = version
    return hf
