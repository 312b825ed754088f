"""Instruction data: loading, rendering with loss masks, eval split and fixed-shape batches.

Pipeline::

    tok = load_tokenizer(model_dir)
    records = load_records("data.jsonl")                  # Alpaca or chat records
    train_recs, eval_recs = train_eval_split(records, eval_fraction=0.05, seed=0)
    train, stats = build_examples(train_recs, tok, max_seq_len=512)
    loader = DataLoader(train, batch_size=8, seed=0, pad_id=tok.pad_token_id)
    for batch in loader:                                   # endless, epoch after epoch
        batch["input_ids"], batch["loss_mask"]             # int32 [B, S]

``prepare_data`` does the middle three steps in one call.

Record forms:

* Alpaca: ``{"instruction": ..., "input": optional, "output": ...}``
* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``
* ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}``
  (``user``/``assistant`` too), read as a chat record.

Files (``load_records``; a list of them is concatenated in order): JSONL (one record a line)
or JSON (a list of records), UTF-8 with or without a byte order mark, LF or CRLF; parquet, CSV
or TSV with ``instruction``/``input``/``output`` columns or a ``messages`` (or
``conversations``) column, JSON text in CSV; an Arrow file or a ``datasets`` ``save_to_disk``
folder (read with pyarrow). A mistake raises ``DataError`` (a ``ValueError``), one line naming
the file, the 1-based line or record, and the fix.

Rendering uses the tokenizer's chat template when it has one, else the plain Alpaca template
(``PROMPT_TEMPLATE`` / ``PROMPT_TEMPLATE_NO_INPUT``, the response followed by eos). The prompt
and each response are tokenized separately and concatenated, so the boundary between masked and
trained tokens is exact. ``loss_mask[t] = 1`` marks token ``t`` as a target (the convention of
``lisa_jax.model.causal_lm_loss``): response tokens only, and for chat only assistant turns.

``train_on_inputs`` makes every token after the first a target (prompts and user turns too).
``use_chat_template(tokenizer, choice)`` applies ``--chat-template``: ``auto`` (the
tokenizer's template when it has one, else plain), ``tokenizer``, ``plain`` or the path of a
Jinja file; ``export_chat_template`` makes an exported model directory render the same way.

Batches are right padded (causal attention needs no mask for that: no real token attends to a
later pad) and their length ``S`` is rounded up to one of a few bucket lengths, so a jitted
step compiles only a few shapes.

Packing (``DataLoader(..., packing=True)``, ``--packing``) puts several examples in a row of up
to ``max_seq_len`` tokens (best fit, longest first, over each epoch's shuffled examples). The
batch then carries ``segment_ids`` (1, 2, ... per example in a row, 0 for padding): attention
stays within an example and positions restart at each (``lisa_jax.ops.Segments``), and each
example's first token is no target, so a packed row gives every example the loss and
gradient it has alone.

Mixing (``--data a.jsonl:0.7,b.parquet:0.3``, ``parse_data_spec``): each epoch draws as many
examples as the files hold together, from each file in proportion to its weight; a file
smaller than its share repeats, a larger one gives a different random subset each epoch. The
draw is seeded by the seed and the epoch, so a resumed run sees the same mixture.
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
ROLES = ("system", "user", "assistant")
BUCKET_MULTIPLE = 64


# ----------------------------------------------------------------------------- loading


class DataError(ValueError):
    """A mistake in the data the user passed: one line naming the file, the record and the fix."""


DATA_FORMATS = ".jsonl, .json, .parquet, .csv, .tsv or .arrow file, or a save_to_disk folder"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}
_RECORD_FORMS = ("Alpaca records need 'instruction' and 'output' (and optionally 'input'), chat "
                 "records 'messages', ShareGPT records 'conversations'")
_TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv",
                   ".arrow": "arrow"}


_WEIGHTED = re.compile(r"(.+):([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")


def parse_data_spec(spec: str) -> tuple[list[str], list[float] | None]:
    """``--data``'s paths and mixing weights: ``"a.jsonl"``, ``"a.jsonl,b.parquet"`` (read in
    order) or ``"a.jsonl:0.7,b.parquet:0.3"`` (mixed by weight; ``None`` when not weighted).

    A path that exists is taken whole, so a file whose name holds a comma or ends in
    ``:<number>`` still reads as that file; a weight is a plain number after the last colon.
    One file alone has no mixture: its weight is checked, then dropped.

    >>> parse_data_spec("a.jsonl:0.7,b.parquet:0.3")
    (['a.jsonl', 'b.parquet'], [0.7, 0.3])
    >>> parse_data_spec("a.jsonl,b.parquet")
    (['a.jsonl', 'b.parquet'], None)
    >>> parse_data_spec("C:/data/a.jsonl")  # a drive letter is no weight
    (['C:/data/a.jsonl'], None)
    """
    if not spec:
        return [], None
    items = [spec] if Path(spec).exists() or "," not in spec else \
        [p for p in spec.split(",") if p]
    paths: list[str] = []
    weights: list[float | None] = []
    for item in items:
        m = None if Path(item).exists() else _WEIGHTED.fullmatch(item)
        paths.append(m.group(1) if m else item)
        weights.append(float(m.group(2)) if m else None)
    if all(w is None for w in weights):
        return paths, None
    if any(w is None for w in weights):
        bare = paths[weights.index(None)]
        raise DataError(f"--data gives weights to some files but not to {bare}; give every file "
                        "a weight (a.jsonl:0.7,b.jsonl:0.3) or none")
    for path, w in zip(paths, weights):
        if not w > 0:
            raise DataError(f"--data weight of {path} is {w:g}; weights must be positive (drop "
                            "the file to leave it out)")
    return paths, (weights if len(paths) > 1 else None)  # type: ignore[return-value]


def load_sources(paths: Sequence[str | Path]) -> tuple[list[dict], list[int]]:
    """The records of several files in order, and the index of the file each came from."""
    records: list[dict] = []
    sources: list[int] = []
    for i, p in enumerate(paths):
        recs = load_records(p)
        records += recs
        sources += [i] * len(recs)
    return records, sources


def load_records(path: str | Path | Sequence[str | Path]) -> list[dict]:
    """The records of a data file or folder, or of several (concatenated in the order given).

    JSONL (one object a line) or JSON (a list of objects); parquet, CSV or TSV with Alpaca
    columns or a ``messages`` column (in CSV, JSON text); an Arrow file, or a folder written
    by ``datasets.Dataset.save_to_disk``. Alpaca and chat records are returned as they are,
    ShareGPT records (``conversations`` of ``from``/``value`` turns) as chat records. A
    mistake raises ``DataError`` naming the file and the (1-based) line or record.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise DataError(f"no data files given; pass --data a {DATA_FORMATS}")
    records: list[dict] = []
    for p in paths:
        records += _load_one(Path(p))
    return records


def _load_one(p: Path) -> list[dict]:
    if p.is_dir():
        return _table_records(p, _read_saved_dataset(p), lambda i: f"record {i} of {p}")
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} not found; pass --data a {DATA_FORMATS}")
    kind = _TABLE_SUFFIXES.get(p.suffix.lower())
    with open(p, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PAR1"):
        kind = "parquet"
    elif head.startswith(b"ARROW1"):
        kind = "arrow"
    if kind == "parquet":
        rows = _read_arrow_table(p, "parquet")
    elif kind == "arrow":
        rows = _read_arrow_table(p, "arrow")
    elif kind in ("csv", "tsv"):
        return _read_csv(p, "\t" if kind == "tsv" else ",")
    else:
        return _read_json(p)
    return _table_records(p, rows, lambda i: f"record {i} of {p}")


def _read_text(p: Path) -> str:
    """The file's text: UTF-8, a leading byte order mark dropped; binary files refused."""
    raw = p.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{p} is UTF-16 text; save it as UTF-8 and pass it to --data again")
    if b"\x00" in raw[:65536]:
        raise DataError(f"{p} is a binary file, not JSON or CSV text (a spreadsheet? export it "
                        f"as CSV); pass --data a {DATA_FORMATS}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{p} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                        "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8) and pass it to --data "
                        "again") from None


def _lines(text: str) -> list[str]:
    # Not str.splitlines: that also splits at U+2028, form feeds and the like, which JSON
    # strings may hold as they are.
    return [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]


def _read_json(p: Path) -> list[dict]:
    text = _read_text(p)
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{p} is empty; pass --data a file of instruction records")
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"line {e.lineno} of {p}: malformed JSON ({e.msg}); a .json file must "
                            "hold one JSON list of records (or write one record a line, JSONL)"
                            ) from None
        if not items:
            raise DataError(f"{p} holds an empty list; pass --data a file of instruction records")
        return [normalize_record(r, f"record {i} of {p}") for i, r in enumerate(items, 1)]
    records = []
    for lineno, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            whole = _json_or_none(text) if not records else None
            if isinstance(whole, dict):
                if any(k in whole for k in ("instruction", "messages", "conversations")):
                    return [normalize_record(whole, f"record 1 of {p}")]
                keys = ", ".join(repr(k) for k in list(whole)[:5])
                raise DataError(f"{p} holds one JSON object (keys {keys}), not records; pass "
                                "--data a JSON list of records or JSONL (one record a line)"
                                ) from None
            raise DataError(f"line {lineno} of {p}: malformed JSON ({e.msg}); each line must "
                            "hold one complete JSON object (JSONL)") from None
        records.append(normalize_record(item, f"line {lineno} of {p}"))
    return records


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _check_columns(p: Path, columns: Sequence[str]) -> None:
    cols = set(columns)
    if {"instruction", "output"} <= cols or cols & {"messages", "conversations"}:
        return
    shown = ", ".join(repr(c) for c in list(columns)[:8]) or "none"
    raise DataError(f"{p} has columns {shown}; it needs 'instruction' and 'output' (and "
                    "optionally 'input'), or 'messages' (chat) or 'conversations' (ShareGPT)")


def _table_records(p: Path, rows: list[dict], where_of) -> list[dict]:
    """Records of a table's rows; chat columns may hold JSON text, and are dropped where empty
    (so a table can mix Alpaca and chat rows)."""
    if not rows:
        raise DataError(f"{p} has no rows; pass --data a file of instruction records")
    out = []
    for i, row in enumerate(rows, 1):
        where = where_of(i)
        rec = dict(row)
        for col in ("messages", "conversations"):
            if col not in rec:
                continue
            v = rec[col]
            if v is None or (isinstance(v, str) and not v.strip()):
                del rec[col]
            elif isinstance(v, str):
                try:
                    rec[col] = json.loads(v)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: column {col!r} is not JSON ({e.msg}); write it "
                                    "as a JSON list of {\"role\", \"content\"} objects") from None
        if "messages" in rec or "conversations" in rec:
            for k in ("instruction", "input", "output"):
                if not rec.get(k):
                    rec.pop(k, None)
        out.append(normalize_record(rec, where))
    return out


def _read_csv(p: Path, delimiter: str) -> list[dict]:
    import csv
    import io

    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # long conversations
    text = _read_text(p)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    rows: list[dict] = []
    wheres: list[str] = []
    start = 1
    try:
        for fields in reader:
            line, start = start, reader.line_num + 1
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if header is None:
                header = [h.strip() for h in fields]
                _check_columns(p, header)
                continue
            if len(fields) != len(header):
                raise DataError(f"line {line} of {p}: {len(fields)} fields but the header has "
                                f"{len(header)}; quote fields that hold "
                                f"{'tabs' if delimiter == chr(9) else 'commas'} or newlines")
            rows.append(dict(zip(header, fields)))
            wheres.append(f"line {line} of {p}")
    except csv.Error as e:
        raise DataError(f"line {reader.line_num} of {p}: malformed CSV ({e}); quote fields "
                        "that hold quotes, commas or newlines") from None
    if header is None:
        raise DataError(f"{p} is empty; pass --data a file of instruction records")
    return _table_records(p, rows, lambda i: wheres[i - 1])


def _pyarrow(p: Path):
    try:
        import pyarrow
    except ImportError:
        raise DataError(f"reading {p} needs pyarrow; pip install pyarrow") from None
    return pyarrow


def _read_arrow_table(p: Path, kind: str) -> list[dict]:
    pa = _pyarrow(p)
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq
            table = pq.read_table(p)
        else:
            table = _read_arrow_file(pa, p)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{p} is not a readable {kind} file ({str(e).splitlines()[0]}); pass "
                        f"--data a {DATA_FORMATS}") from None
    _check_columns(p, table.column_names)
    return table.to_pylist()


def _read_arrow_file(pa, p: Path):
    """An Arrow IPC stream (what ``save_to_disk`` writes) or file."""
    import pyarrow.ipc

    try:
        with pa.memory_map(str(p)) as src:
            return pyarrow.ipc.open_stream(src).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(str(p)) as src:
            return pyarrow.ipc.open_file(src).read_all()


def _read_saved_dataset(p: Path) -> list[dict]:
    """Rows of a ``datasets.Dataset.save_to_disk`` folder: its Arrow shards in order."""
    if (p / "dataset_dict.json").is_file():
        try:
            splits = json.loads((p / "dataset_dict.json").read_text())["splits"]
        except (ValueError, KeyError):
            splits = sorted(d.name for d in p.iterdir() if d.is_dir())
        pick = "train" if "train" in splits else splits[0] if splits else "SPLIT"
        raise DataError(f"{p} holds a DatasetDict with splits {', '.join(splits)}; pass "
                        f"--data {p / pick}")
    files = None
    if (p / "state.json").is_file():
        try:
            state = json.loads((p / "state.json").read_text())
            files = [p / f["filename"] for f in state["_data_files"]]
        except (ValueError, KeyError, TypeError):
            files = None
    if files is None:
        files = sorted(p.glob("*.arrow"))
    if not files:
        raise DataError(f"{p} is a folder without .arrow files; pass --data a {DATA_FORMATS}")
    pa = _pyarrow(p)
    tables = []
    for f in files:
        if not f.is_file():
            raise DataError(f"{f} (listed in {p / 'state.json'}) is missing; save the dataset "
                            "again with save_to_disk")
        try:
            tables.append(_read_arrow_file(pa, f))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{f} is not a readable Arrow file ({str(e).splitlines()[0]}); save "
                            "the dataset again with save_to_disk") from None
    _check_columns(p, tables[0].column_names)
    return [row for t in tables for row in t.to_pylist()]


def _where(index: int | str) -> str:
    return f"record {index + 1}" if isinstance(index, int) else index


def normalize_record(record: Any, index: int | str) -> dict:
    """``record`` checked (``validate_record``), a ShareGPT record turned into a chat record.

    ``index``: the 0-based position of the record, or where it is (``"line 3 of d.jsonl"``),
    for the message of a ``DataError``.
    """
    kind = validate_record(record, index)
    if kind != "sharegpt":
        return record
    msgs = [{"role": SHAREGPT_ROLES[str(t.get("from", t.get("role"))).lower()],
             "content": t.get("value", t.get("content"))} for t in record["conversations"]]
    system = record.get("system")
    if isinstance(system, str) and system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return {"messages": msgs}


def validate_record(record: Any, index: int | str) -> str:
    """``"alpaca"``, ``"chat"`` or ``"sharegpt"``; a ``DataError`` naming the record (``index``:
    its 0-based position, or where it is, e.g. ``"line 3 of d.jsonl"``) and what it lacks."""
    where = _where(index)
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {_json_type(record)}, not an object; "
                        + _RECORD_FORMS)
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of "
                            "{\"role\", \"content\"} objects")
        for j, m in enumerate(msgs, 1):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: message {j} is missing 'role' or 'content'; each "
                                "message is {\"role\": ..., \"content\": ...}")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: message {j} has role {m['role']!r}; use one of "
                                f"{', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: message {j} 'content' must be a string, not "
                                f"{_json_type(m['content'])}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: 'messages' has no assistant turn to train on")
        return "chat"
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: 'conversations' must be a non-empty list of "
                            "{\"from\", \"value\"} objects")
        for j, t in enumerate(turns, 1):
            if not isinstance(t, dict) or not (("from" in t and "value" in t)
                                               or ("role" in t and "content" in t)):
                raise DataError(f"{where}: turn {j} of 'conversations' is missing 'from' or "
                                "'value'; each turn is {\"from\": \"human\", \"value\": ...}")
            role = t["from"] if "from" in t else t["role"]
            if str(role).lower() not in SHAREGPT_ROLES:
                raise DataError(f"{where}: turn {j} is from {role!r}; use human, gpt or system "
                                "(or user, assistant)")
            text = t["value"] if "from" in t else t["content"]
            if not isinstance(text, str):
                raise DataError(f"{where}: turn {j} 'value' must be a string, not "
                                f"{_json_type(text)}")
        if not any(SHAREGPT_ROLES[str(t.get("from", t.get("role"))).lower()] == "assistant"
                   for t in turns):
            raise DataError(f"{where}: 'conversations' has no gpt turn to train on")
        return "sharegpt"
    missing = [k for k in ("instruction", "output") if k not in record]
    if missing:
        keys = ", ".join(repr(k) for k in list(record)[:5]) or "none"
        raise DataError(f"{where} is missing {' and '.join(repr(k) for k in missing)} (its "
                        f"keys: {keys}); {_RECORD_FORMS}")
    for k in ("instruction", "input", "output"):
        v = record.get(k)
        if not isinstance(v, str) and not (k == "input" and v is None):
            raise DataError(f"{where}: {k!r} must be a string, not {_json_type(v)}")
    return "alpaca"


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list",
            dict: "object"}.get(type(v), type(v).__name__)


def response_is_empty(record: dict) -> bool:
    """Whether every response of a (checked) record is empty or blank."""
    if "messages" in record:
        return all(not m["content"].strip() for m in record["messages"]
                   if m["role"] == "assistant")
    return not record["output"].strip()


def _warn_all_empty(n: int) -> None:
    warnings.warn(f"all {n} records have an empty response ('output' or the assistant turns), "
                  "so the loss has no response tokens to learn: only the end-of-response token "
                  "is a target; fill in the responses in --data", stacklevel=3)


def check_vocab(tokenizer, vocab_size: int) -> None:
    """A ``DataError`` when the tokenizer has token ids the model's embedding has no row for.

    A tokenizer smaller than ``vocab_size`` is fine (vocabularies are often padded).

    >>> class Tok:
    ...     name_or_path = "m"
    ...     def __len__(self): return 40
    ...     def get_vocab(self): return {f"t{i}": i for i in range(40)}
    >>> check_vocab(Tok(), 64)
    >>> check_vocab(Tok(), 32)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lisa_jax.data.DataError: the tokenizer of m has 40 tokens but the model's vocab_size is 32 ...
    """
    n = len(tokenizer)
    vocab = tokenizer.get_vocab()
    if vocab:
        n = max(n, max(vocab.values()) + 1)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        tid = getattr(tokenizer, name, None)
        if isinstance(tid, int):
            n = max(n, tid + 1)
    if n > vocab_size:
        src = getattr(tokenizer, "name_or_path", "") or "the --model directory"
        raise DataError(f"the tokenizer of {src} has {n} tokens but the model's vocab_size is "
                        f"{vocab_size} (config.json), so token ids {vocab_size}..{n - 1} have no "
                        "embedding; put the model's own tokenizer files in the --model "
                        f"directory, or resize its embeddings to at least {n} tokens first")


def load_tokenizer(model_dir: str | Path):
    """The model directory's tokenizer (local files only), with pad = eos if it has no pad."""
    from transformers import AutoTokenizer

    if not Path(model_dir).is_dir():
        raise DataError(f"--model directory {str(model_dir)!r} not found; pass the directory "
                        "of an HF model (config.json, *.safetensors, tokenizer files)")
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"could not load a tokenizer from {str(model_dir)!r} "
                        f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                        "); the --model directory needs tokenizer.json or the tokenizer's files"
                        ) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise DataError(f"the tokenizer in {model_dir} has neither a pad nor an eos token; "
                            "add one to its tokenizer_config.json")
        tok.pad_token = tok.eos_token
    return tok


# ----------------------------------------------------------------------------- rendering


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized example: ``input_ids`` and ``loss_mask`` (1 = target token), int32 [T]."""

    input_ids: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


def to_messages(record: dict) -> list[dict]:
    """Chat messages of a record (an Alpaca record becomes one user and one assistant turn)."""
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    user = record["instruction"]
    if record.get("input"):
        user = f"{user}\n\n{record['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def render_plain(record: dict) -> list[tuple[str, bool]]:
    """``(text, is_target)`` segments in the plain Alpaca template; eos follows each target."""
    if "messages" not in record:
        if record.get("input"):
            prompt = PROMPT_TEMPLATE.format(instruction=record["instruction"],
                                            input=record["input"])
        else:
            prompt = PROMPT_TEMPLATE_NO_INPUT.format(instruction=record["instruction"])
        return [(prompt, False), (record["output"], True)]
    segs: list[tuple[str, bool]] = []
    pending = ""
    for m in record["messages"]:
        if segs and not pending:  # a turn after a reply (and its eos) starts a new paragraph
            pending = "\n\n"
        if m["role"] == "system":
            pending += m["content"] + "\n\n"
        elif m["role"] == "user":
            pending += PROMPT_TEMPLATE_NO_INPUT.format(instruction=m["content"])
        else:
            if not pending.endswith("### Response:\n"):
                pending += "### Response:\n"
            segs.append((pending, False))
            segs.append((m["content"], True))
            pending = ""
    return segs  # trailing turns after the last assistant reply carry no target


def render_chat_template(tokenizer, record: dict) -> list[tuple[str, bool]]:
    """``(text, is_target)`` segments from the tokenizer's chat template.

    Each assistant turn's text is the difference between the conversation rendered through it
    and the conversation before it rendered with the generation prompt, so it holds exactly what
    the template emits for that turn (its content and end-of-turn marker).
    """
    msgs = to_messages(record)
    render = lambda m, gen: tokenizer.apply_chat_template(  # noqa: E731
        m, tokenize=False, add_generation_prompt=gen)
    segs: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = render(msgs[:i], True)
        full = render(msgs[:i + 1], False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError("the tokenizer's chat template does not render conversations "
                            "incrementally, so assistant turns cannot be masked exactly; delete "
                            "'chat_template' from the --model directory's tokenizer_config.json "
                            "to train with the plain Alpaca template")
        segs.append((prefix[len(done):], False))
        segs.append((full[len(prefix):], True))
        done = full
    return [(t, tgt) for t, tgt in segs if t]


CHAT_TEMPLATES = ("auto", "tokenizer", "plain")


def use_chat_template(tokenizer, choice: str | None = "auto") -> bool:
    """Apply ``--chat-template`` to ``tokenizer`` and say whether rendering uses a chat template.

    ``auto`` (or None): the tokenizer's when it has one, else the plain template; ``tokenizer``:
    the tokenizer's, which it must have; ``plain``: the plain template (the tokenizer's
    template is removed, so samples and ``generate`` render alike); otherwise the path of a
    Jinja file, which becomes the tokenizer's template (and so is exported with it).
    """
    has = bool(getattr(tokenizer, "chat_template", None))
    if choice in (None, "auto"):
        return has
    if choice == "tokenizer":
        if not has:
            src = getattr(tokenizer, "name_or_path", "") or "the --model directory"
            raise DataError(f"the tokenizer of {src} has no chat template; pass --chat-template "
                            "plain or --chat-template FILE.jinja")
        return True
    if choice == "plain":
        if has:
            tokenizer.chat_template = None
        return False
    p = Path(choice)
    if not p.is_file():
        raise DataError(f"--chat-template {choice!r} is neither auto, tokenizer, plain nor a "
                        "Jinja file; pass one of those")
    text = _read_text(p)
    if not text.strip():
        raise DataError(f"--chat-template file {p} is empty; pass a Jinja chat template")
    tokenizer.chat_template = text
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant",
                                       "content": "b"}], tokenize=False)
    except Exception as e:  # jinja2's TemplateError and whatever the template raises
        raise DataError(f"--chat-template file {p} does not render a conversation "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        "fix the template") from None
    return True


def export_chat_template(hf_dir: str | Path, tokenizer, choice: str | None) -> None:
    """Make an exported model directory render as training did under ``--chat-template``
    ``plain`` (no template: the copied one removed) or a Jinja file (written as the
    directory's ``chat_template.jinja``); ``auto`` and ``tokenizer`` leave the copy as it is."""
    if choice in (None, "auto", "tokenizer"):
        return
    d = Path(hf_dir)
    for name in ("chat_template.jinja", "chat_template.json"):
        (d / name).unlink(missing_ok=True)
    config = d / "tokenizer_config.json"
    if config.is_file():
        tc = json.loads(config.read_text())
        if tc.pop("chat_template", None) is not None:
            config.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    text = getattr(tokenizer, "chat_template", None)
    if text:
        (d / "chat_template.jinja").write_text(text)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` itself puts the BOS token first (``add_bos_token`` or its
    post-processor); Llama-3 and ChatML tokenizers, for instance, do not."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    # Asked of the tokenizer's behaviour rather than its add_bos_token attribute, which some
    # tokenizers leave unset while their post-processor adds BOS.
    probe = "a"
    with_special = tokenizer(probe)["input_ids"]
    without = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and without[:1] != [bos]


def tokenize_record(tokenizer, record: dict, use_chat_template: bool | None = None,
                    add_bos: bool | None = None, train_on_inputs: bool = False) -> Example:
    """Render and tokenize one record, each segment on its own, and build its loss mask.

    BOS comes first when the tokenizer would add it to a plain ``tokenizer(text)`` call
    (``add_bos``: that answer, if already known), so training and generation from the same
    text agree; a chat template that writes the BOS itself is not given a second one.
    ``train_on_inputs``: every token is a target, prompts too (the first token is never one:
    nothing before it predicts it).
    """
    if "conversations" in record and "messages" not in record:
        record = normalize_record(record, "the record")
    if use_chat_template is None:
        use_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    segs = render_chat_template(tokenizer, record) if use_chat_template else render_plain(record)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[int] = []
    rendered_bos = bool(segs and tokenizer.bos_token
                        and segs[0][0].startswith(tokenizer.bos_token))
    if add_bos and not rendered_bos:
        ids.append(tokenizer.bos_token_id)
        mask.append(0)
    for text, is_target in segs:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if is_target and not use_chat_template:
            piece = piece + [eos]
        ids += piece
        mask += [int(is_target or train_on_inputs)] * len(piece)
    if train_on_inputs and mask:
        mask[0] = 0
    return Example(np.asarray(ids, np.int32), np.asarray(mask, np.int32))


@dataclasses.dataclass
class DataStats:
    """What ``build_examples`` kept, dropped and truncated."""

    num_records: int = 0
    num_examples: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    empty_responses: int = 0  # records whose responses are all empty (only eos is a target)
    max_len: int = 0
    mean_len: float = 0.0
    # The index (in the records given) of each example kept, in order.
    kept: list = dataclasses.field(default_factory=list, repr=False)


def build_examples(records: Sequence[dict], tokenizer, max_seq_len: int,
                   truncate: bool = False,
                   use_chat_template: bool | None = None,
                   warn_empty: bool = True,
                   train_on_inputs: bool = False) -> tuple[list[Example], DataStats]:
    """Tokenized examples of ``records``; longer than ``max_seq_len`` ones are dropped (default)
    or cut to it (``truncate=True``; kept only if a target token survives).

    Records whose responses are empty are counted in ``stats.empty_responses``; when all are,
    a warning says so (``warn_empty``): such examples only teach the model to stop at once.
    """
    stats = DataStats(num_records=len(records))
    out: list[Example] = []
    add_bos = tokenizer_adds_bos(tokenizer) if records else False
    for i, r in enumerate(records):
        r = normalize_record(r, i)
        stats.empty_responses += response_is_empty(r)
        ex = tokenize_record(tokenizer, r, use_chat_template, add_bos, train_on_inputs)
        if len(ex) > max_seq_len:
            if not truncate:
                stats.dropped_too_long += 1
                continue
            ex = Example(ex.input_ids[:max_seq_len], ex.loss_mask[:max_seq_len])
            stats.truncated += 1
        if not ex.loss_mask.any():
            stats.dropped_no_target += 1
            continue
        out.append(ex)
        stats.kept.append(i)
    if records and not out:
        if stats.dropped_too_long:
            raise DataError(f"all {len(records)} examples are longer than max length "
                            f"{max_seq_len} tokens ({stats.dropped_too_long} dropped); raise "
                            "--max-seq-len or pass --truncate")
        if stats.empty_responses == len(records):
            raise DataError(f"all {len(records)} records have an empty response, so the loss "
                            "has no target tokens; fill in 'output' (or the assistant turns) in "
                            "--data")
        raise DataError(f"none of the {len(records)} examples has a response token left to "
                        "train on; raise --max-seq-len")
    if warn_empty and records and stats.empty_responses == len(records):
        _warn_all_empty(len(records))
    elif stats.empty_responses:
        log.warning("%d of %d records have an empty response (they only teach the model to "
                    "stop)", stats.empty_responses, len(records))
    if stats.dropped_too_long:
        log.warning("dropped %d of %d examples longer than %d tokens (raise --max-seq-len to "
                    "keep them)", stats.dropped_too_long, len(records), max_seq_len)
    stats.num_examples = len(out)
    if out:
        lens = [len(e) for e in out]
        stats.max_len, stats.mean_len = max(lens), float(np.mean(lens))
    return out, stats


# ----------------------------------------------------------------------------- splitting


def train_eval_split(items: Sequence, eval_fraction: float | None = None,
                     eval_size: int | None = None, seed: int = 0) -> tuple[list, list]:
    """A held-out split, deterministic in ``seed``; the two parts are disjoint and keep order."""
    n = len(items)
    if eval_size is not None and eval_fraction is not None:
        raise ValueError("give an eval size or an eval fraction, not both")
    if eval_fraction is not None:
        if not 0.0 <= eval_fraction < 1.0:
            raise DataError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
        k = int(round(n * eval_fraction))
        if eval_fraction > 0 and n > 1:
            k = max(k, 1)
    else:
        k = int(eval_size or 0)
    if k < 0 or (k >= n and k > 0):
        raise DataError(f"an eval split of {k} leaves no training data out of {n} records; "
                        "lower --eval-fraction or add records to --data")
    held = set(np.random.default_rng([seed, 0x5EED]).permutation(n)[:k].tolist())
    train = [x for i, x in enumerate(items) if i not in held]
    ev = [x for i, x in enumerate(items) if i in held]
    return train, ev


@dataclasses.dataclass
class Splits:
    train: list[Example]
    eval: list[Example]
    stats: DataStats
    # The --data file each training example came from (its index), when there are several.
    train_sources: list[int] | None = None


def prepare_data(path: str | Path | Sequence[str | Path], tokenizer, max_seq_len: int,
                 eval_fraction: float | None = None, eval_size: int | None = None,
                 seed: int = 0, truncate: bool = False,
                 use_chat_template: bool | None = None,
                 train_on_inputs: bool = False) -> Splits:
    """Load (one data file or folder, or a list of them: ``load_records``), split (on records,
    so the split does not depend on ``max_seq_len``) and tokenize; ``train_sources`` tells
    which file each training example came from (for mixing weights)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise DataError(f"no data files given; pass --data a {DATA_FORMATS}")
    records, sources = load_sources(paths)
    if all(response_is_empty(r) for r in records):
        _warn_all_empty(len(records))
    tr_idx, ev_idx = train_eval_split(list(range(len(records))), eval_fraction, eval_size, seed)
    tr, ev = [records[i] for i in tr_idx], [records[i] for i in ev_idx]
    train, stats = build_examples(tr, tokenizer, max_seq_len, truncate, use_chat_template,
                                  warn_empty=False, train_on_inputs=train_on_inputs)
    evals, _ = (build_examples(ev, tokenizer, max_seq_len, truncate, use_chat_template,
                               warn_empty=False, train_on_inputs=train_on_inputs)
                if ev else ([], None))
    train_sources = [sources[tr_idx[k]] for k in stats.kept]
    return Splits(train, evals, stats, train_sources if len(paths) > 1 else None)


# ----------------------------------------------------------------------------- batching


def bucket_lengths(max_seq_len: int, multiple: int = BUCKET_MULTIPLE) -> tuple[int, ...]:
    """Allowed batch lengths: multiples of ``multiple`` below ``max_seq_len``, then it."""
    out = list(range(multiple, max_seq_len, multiple))
    return tuple(out + [max_seq_len])


def pad_batch(examples: Sequence[Example], batch_size: int, seq_len: int,
              pad_id: int) -> dict[str, Any]:
    """Right-padded int32 arrays ``[batch_size, seq_len]``; missing rows are all padding."""
    ids = np.full((batch_size, seq_len), pad_id, np.int32)
    mask = np.zeros((batch_size, seq_len), np.int32)
    for r, ex in enumerate(examples):
        ids[r, :len(ex)] = ex.input_ids
        mask[r, :len(ex)] = ex.loss_mask
    return {"input_ids": ids, "loss_mask": mask,
            "num_tokens": int(sum(len(e) for e in examples)),
            "num_target_tokens": int(mask.sum()),
            "num_examples": len(examples)}


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of item indices whose lengths sum to at most ``capacity`` each: best fit, longest
    first (ties in the given order), each row's items in the order they were placed.

    >>> pack_rows([5, 3, 6, 2, 4], 8)
    [[2, 3], [0, 1], [4]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise DataError(f"an example has {n} tokens, more than --max-seq-len {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def pack_batch(examples: Sequence[Example], rows: Sequence[Sequence[int]], batch_size: int,
               seq_len: int, pad_id: int) -> dict[str, Any]:
    """Packed int32 arrays ``[batch_size, seq_len]``: row ``r`` holds ``examples[i]`` for ``i``
    in ``rows[r]`` one after another, ``segment_ids`` numbering them 1, 2, ... (0: padding;
    missing rows are all padding). Each example's first token is no target: in a row, the
    token before it belongs to another example."""
    ids = np.full((batch_size, seq_len), pad_id, np.int32)
    mask = np.zeros((batch_size, seq_len), np.int32)
    seg = np.zeros((batch_size, seq_len), np.int32)
    n_tok = n_ex = 0
    for r, row in enumerate(rows):
        t = 0
        for k, i in enumerate(row, 1):
            ex = examples[i]
            n = len(ex)
            ids[r, t:t + n] = ex.input_ids
            mask[r, t:t + n] = ex.loss_mask
            mask[r, t] = 0
            seg[r, t:t + n] = k
            t += n
        n_tok += t
        n_ex += len(row)
    return {"input_ids": ids, "loss_mask": mask, "segment_ids": seg, "num_tokens": n_tok,
            "num_target_tokens": int(mask.sum()), "num_examples": n_ex}


class DataLoader:
    """Deterministic, resumable stream of fixed-shape batches, epoch after epoch.

    Epoch ``e`` shuffles with ``(seed, e)``; within chunks of ``chunk_batches`` batches the
    examples are sorted by length (length bucketing), and the batches are shuffled again.
    Each batch is ``{"input_ids", "loss_mask"}`` (int32 ``[batch_size, S]``, right padded with
    ``pad_id``; ``S`` the smallest of ``buckets`` that fits) plus ``num_tokens`` (non-pad
    tokens), ``num_target_tokens`` and ``num_examples``, and ``epoch`` / ``step_in_epoch``.

    ``drop_last`` leaves ``len(examples) % batch_size`` examples out of each epoch, drawn at
    random with the epoch's shuffle (so a different few each epoch); otherwise the final
    partial batch is filled with all-pad rows (loss mask 0), keeping the batch shape fixed.

    ``packing``: the epoch's shuffled examples are packed into rows of up to the largest
    bucket (``pack_rows``), the rows shuffled and batched ``batch_size`` at a time; batches
    carry ``segment_ids`` (``pack_batch``). The number of batches then varies a little from
    epoch to epoch; ``len()`` is epoch 0's.

    ``sources`` (the file of each example) and ``weights`` (one per file): each epoch draws
    ``len(examples)`` examples, from file ``i`` in proportion to ``weights[i]`` (whole passes
    over a file, then a random subset of it), deterministic in ``(seed, epoch)``.

    ``state_dict()`` after ``k`` batches, loaded into a fresh loader over the same examples and
    settings, makes it yield exactly batch ``k + 1`` onwards.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int = 0,
                 pad_id: int = 0, max_seq_len: int | None = None,
                 buckets: Sequence[int] | None = None, chunk_batches: int = 16,
                 drop_last: bool = True, shuffle: bool = True, num_epochs: int | None = None,
                 packing: bool = False, sources: Sequence[int] | None = None,
                 weights: Sequence[float] | None = None,
                 source_names: Sequence[str] | None = None):
        if not examples:
            raise DataError("no examples to batch; pass --data a file of instruction records")
        if batch_size < 1:
            raise DataError(f"--batch-size must be at least 1, got {batch_size}")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = int(pad_id)
        self.lengths = np.asarray([len(e) for e in self.examples])
        longest = int(self.lengths.max())
        if buckets is None:
            top = max_seq_len or -(-longest // BUCKET_MULTIPLE) * BUCKET_MULTIPLE
            buckets = bucket_lengths(top)
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        if longest > self.buckets[-1]:
            raise DataError(f"an example has {longest} tokens, more than the largest bucket "
                             f"{self.buckets[-1]}; raise --max-seq-len")
        self.chunk_batches = chunk_batches
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.packing = bool(packing)
        self._quotas = self._mixture_quotas(sources, weights, source_names)
        self.epoch = 0
        self.position = 0  # batches already yielded in this epoch
        self._plan_epoch: int | None = None
        self._plan: list = []
        n = len(self.epoch_pool(0))
        if not self.packing and (n // batch_size if drop_last else -(-n // batch_size)) == 0:
            raise DataError(f"{n} training examples make no full batch of {batch_size}; lower "
                            f"--batch-size to {n} or add examples to --data (the eval split "
                            "and examples over --max-seq-len are not among them)")
        self.batches_per_epoch = len(self._plan_for(0))
        if self.batches_per_epoch == 0:
            rows = len(pack_rows(self.lengths.tolist(), self.buckets[-1]))
            raise DataError(f"{n} training examples pack into {rows} rows of --max-seq-len "
                            f"{self.buckets[-1]}, no full batch of {batch_size}; lower "
                            f"--batch-size to {rows} or add examples to --data (the eval split "
                            "and examples over --max-seq-len are not among them)")

    def _mixture_quotas(self, sources, weights, names=None):
        """Per file: its example indices and how many of them an epoch draws."""
        if weights is None:
            return None
        if sources is None or len(sources) != len(self.examples):
            raise ValueError("mixing weights need the source of every example")
        src = np.asarray(sources)
        total = float(sum(weights))
        quotas = []
        for i, w in enumerate(weights):
            members = np.flatnonzero(src == i)
            if not len(members):
                name = names[i] if names else f"file {i + 1}"
                raise DataError(f"--data {name} (weight {w:g}) has no training example left "
                                "(all longer than --max-seq-len or held out); drop it from "
                                "--data, or raise --max-seq-len")
            quotas.append((members, max(1, int(round(w / total * len(self.examples))))))
        return quotas

    # -- planning

    def epoch_pool(self, epoch: int) -> np.ndarray:
        """The example indices of ``epoch`` before shuffling (repeats where a file is drawn more
        than once): every example once, or the mixture's draw."""
        if self._quotas is None:
            return np.arange(len(self.examples))
        rng = np.random.default_rng([self.seed, epoch, 0x313])
        parts = []
        for members, quota in self._quotas:
            reps, rest = divmod(quota, len(members))
            parts += [members] * reps
            parts.append(np.sort(rng.choice(members, rest, replace=False)))
        return np.concatenate(parts)

    def epoch_plan(self, epoch: int) -> list:
        """The example indices of each batch of ``epoch``, in order (with ``packing``: each
        batch a list of rows, each row a list of example indices)."""
        pool, B = self.epoch_pool(epoch), self.batch_size
        n = len(pool)
        lens = self.lengths[pool]
        if not self.shuffle:
            if self.packing:
                rows = [[int(pool[i]) for i in row]
                        for row in pack_rows(lens.tolist(), self.buckets[-1])]
                batches = [rows[i:i + B] for i in range(0, len(rows), B)]
            else:
                batches = [pool[i:i + B] for i in range(0, n, B)]
            if self.drop_last and batches and len(batches[-1]) < B:
                batches = batches[:-1]
            return batches
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n)
        if self.packing:
            rows = pack_rows(lens[order].tolist(), self.buckets[-1])
            rows = [[int(pool[order[i]]) for i in row] for row in rows]
            rows = [rows[i] for i in rng.permutation(len(rows))]
            batches = [rows[i:i + B] for i in range(0, len(rows), B)]
            if self.drop_last and batches and len(batches[-1]) < B:
                batches = batches[:-1]
            return batches
        if self.drop_last:
            # Leave out the remainder before sorting by length: cut after the sort, it
            # would be the longest examples of the last chunk in every epoch.
            order = order[: n - n % B]
        chunk = B * self.chunk_batches
        sorted_order = np.concatenate([
            c[np.argsort(lens[c], kind="stable")]
            for c in (order[i:i + chunk] for i in range(0, len(order), chunk))])
        batches = [sorted_order[i:i + B] for i in range(0, len(sorted_order), B)]
        if self.drop_last and len(batches[-1]) < B:
            batches = batches[:-1]
        batches = [pool[batches[i]] for i in rng.permutation(len(batches))]
        return batches

    def _plan_for(self, epoch: int) -> list:
        if self._plan_epoch != epoch:
            self._plan, self._plan_epoch = self.epoch_plan(epoch), epoch
        return self._plan

    def bucket_for(self, length: int) -> int:
        i = int(np.searchsorted(self.buckets, length))
        return self.buckets[i]

    def make_batch(self, idx) -> dict[str, Any]:
        if self.packing:
            S = self.bucket_for(max(int(sum(self.lengths[i] for i in row)) for row in idx))
            return pack_batch(self.examples, idx, self.batch_size, S, self.pad_id)
        exs = [self.examples[i] for i in idx]
        S = self.bucket_for(max(len(e) for e in exs))
        return pad_batch(exs, self.batch_size, S, self.pad_id)

    # -- iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.position >= len(self._plan_for(self.epoch)):
            self.epoch += 1
            self.position = 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        plan = self._plan_for(self.epoch)
        batch = self.make_batch(plan[self.position])
        batch["epoch"], batch["step_in_epoch"] = self.epoch, self.position
        self.position += 1
        return batch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def shapes(self) -> set[tuple[int, int]]:
        """Every batch shape this loader can produce (what a jitted step compiles for)."""
        return {(self.batch_size, b) for b in self.buckets}

    # -- resuming

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": len(self.examples), "batch_size": self.batch_size,
                "packing": int(self.packing)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, what, mine, fix in (
                ("seed", "seed {}", self.seed, "the same --seed"),
                ("num_examples", "{} training examples", len(self.examples),
                 "the same --data, --max-seq-len and --eval-fraction"),
                ("batch_size", "batch size {}", self.batch_size, "the same --batch-size")):
            if key in state and int(state[key]) != mine:
                raise DataError(f"the checkpoint's data position is for {what.format(state[key])}"
                                f" but this run has {what.format(mine)}; resume with {fix}")
        if bool(state.get("packing", 0)) != self.packing:
            was, now = ("packed", "unpacked") if state.get("packing") else ("unpacked", "packed")
            raise DataError(f"the checkpoint's data position is for {was} batches but this run's "
                            f"are {now}; resume with{'' if was == 'packed' else 'out'} --packing")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_batches(examples: Sequence[Example], batch_size: int, pad_id: int = 0,
                 max_seq_len: int | None = None, max_batches: int | None = None,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Eval examples in fixed-shape batches, length-sorted (last one filled with pad rows).

    Every example once when ``max_batches`` is None or the set fits in that many batches;
    otherwise a random sample of ``max_batches * batch_size`` examples, deterministic in
    ``seed``. Sampling rather than taking the first batches keeps the estimate over all
    lengths: the first length-sorted batches hold only the shortest examples.
    """
    if max_batches is not None:
        if max_batches < 0:
            raise DataError(f"--eval-batches must be at least 0, got {max_batches}")
        limit = max_batches * batch_size
        if len(examples) > limit:
            picked = np.random.default_rng([seed, 0xE7A1]).choice(len(examples), limit,
                                                                   replace=False)
            examples = [examples[i] for i in np.sort(picked)]
    if not examples:
        return []
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    loader = DataLoader([examples[i] for i in order], batch_size, pad_id=pad_id,
                        max_seq_len=max_seq_len, drop_last=False, shuffle=False, num_epochs=1)
    return list(loader)
