"""Loaders for edit datasets: CounterFact (ROME and EasyEdit schemas), zsRE (MEND schema), memoe's own
JSON schema, a user's file or a Hugging Face dataset id, and the synthetic world.

Files are read with :mod:`datasets` (``load_dataset("json", ...)``) so a user can pass a hub id just as well
as a local path. The schema is detected from the first record's keys unless given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Literal

from memoe.data.records import (
    BadRecordPolicy,
    EditDataset,
    EditRecord,
    EditRequest,
    LabeledPrompt,
    RecordError,
    check_records,
    require,
)
from memoe.data.synthetic import WorldConfig, build_world
from memoe.errors import ConfigError, DataError, MissingFileError
from memoe.io import write_json

Schema = Literal["auto", "counterfact", "counterfact-easyedit", "zsre", "memoe"]

#: File names of the shared benchmark data, relative to the data directory.
DEFAULT_FILES = {
    "counterfact": "counterfact.json",
    "counterfact-easyedit": "counterfact_easyedit_extra.json",
    "zsre": "zsre.json",
}


#: Datasets that come with the package (``memoe/data/``): name -> (file, schema). See ``counterfact_sample.md``.
SHIPPED_FILES = {"counterfact-sample": ("counterfact_sample.json", "counterfact")}


def default_data_dir() -> Path:
    """Where the shared benchmark files live: ``$MEMOE_DATA_DIR``, else ``../shared/data`` beside the checkout."""
    env = os.environ.get("MEMOE_DATA_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    for candidate in (repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return repo.parent / "shared" / "data"


def template_from_text(text: str, subject: str, case_id: object, index: int | None, field_name: str) -> str:
    """Turn a filled-in prompt into a ``{}`` template; fail if the subject does not occur in it."""
    if "{}" in text:
        return text
    pos = text.find(subject)
    if pos < 0:
        raise RecordError(case_id, index, field_name, f"subject {subject!r} does not occur in prompt {text!r}")
    return text[:pos] + "{}" + text[pos + len(subject):]


def record_case_id(raw: dict, i: int) -> object:
    """A record's ``case_id`` (its index in the file when the key is absent); null is refused, not kept."""
    cid = raw.get("case_id", i)
    if cid is None or isinstance(cid, (bool, float, list, dict)):
        raise RecordError(cid, i, "case_id", "must be an integer or a string (or left out: the record's index is used)")
    return cid


def _strs(raw: dict, key: str, cid: object, i: int) -> tuple[str, ...]:
    items = require(raw, key, cid, i, list)
    for j, x in enumerate(items):
        if not isinstance(x, str):
            raise RecordError(cid, i, f"{key}[{j}]", f"expected a string, got {type(x).__name__}")
    return tuple(items)


def parse_counterfact(raw: dict, i: int) -> EditRecord:
    """CounterFact, ROME schema (``requested_rewrite`` plus four prompt lists)."""
    cid = record_case_id(raw, i)
    rw = "requested_rewrite"
    subject = require(raw, f"{rw}.subject", cid, i)
    prompt = template_from_text(require(raw, f"{rw}.prompt", cid, i), subject, cid, i, f"{rw}.prompt")
    return EditRecord(
        request=EditRequest(
            prompt=prompt, subject=subject, case_id=cid,
            target_new=require(raw, f"{rw}.target_new.str", cid, i),
            target_true=require(raw, f"{rw}.target_true.str", cid, i),
            relation=(raw.get(rw) or {}).get("relation_id"),
        ),
        paraphrase_prompts=_strs(raw, "paraphrase_prompts", cid, i),
        neighborhood_prompts=_strs(raw, "neighborhood_prompts", cid, i),
        attribute_prompts=tuple(raw.get("attribute_prompts") or ()),
        generation_prompts=tuple(raw.get("generation_prompts") or ()),
    )


def parse_counterfact_easyedit(raw: dict, i: int) -> EditRecord:
    """CounterFact, EasyEdit's flat schema (one rephrase and one locality prompt per edit)."""
    cid = record_case_id(raw, i)
    subject = require(raw, "subject", cid, i)
    truth = require(raw, "ground_truth", cid, i)
    loc = LabeledPrompt(require(raw, "locality_prompt", cid, i), require(raw, "locality_ground_truth", cid, i))
    return EditRecord(
        request=EditRequest(
            prompt=template_from_text(require(raw, "prompt", cid, i), subject, cid, i, "prompt"),
            subject=subject, target_new=require(raw, "target_new", cid, i), target_true=truth, case_id=cid,
        ),
        paraphrase_prompts=(require(raw, "rephrase_prompt", cid, i),),
        # EasyEdit's locality prompt is a CounterFact neighbour when its answer is the edit's old target.
        neighborhood_prompts=(loc.prompt,) if loc.target == truth else (),
        locality_prompts=(loc,),
    )


def parse_zsre(raw: dict, i: int) -> EditRecord:
    """zsRE, MEND schema: question ``src``, new answer ``alt``, true ``answers``, NQ locality pair."""
    cid = record_case_id(raw, i)
    subject = require(raw, "subject", cid, i)
    answers = require(raw, "answers", cid, i, list)
    if not answers or not isinstance(answers[0], str):
        raise RecordError(cid, i, "answers", "expected a non-empty list of strings")
    loc = require(raw, "loc", cid, i)
    loc = loc[len("nq question: "):] if loc.startswith("nq question: ") else loc
    return EditRecord(
        request=EditRequest(
            prompt=template_from_text(require(raw, "src", cid, i), subject, cid, i, "src"),
            subject=subject, target_new=require(raw, "alt", cid, i), target_true=answers[0], case_id=cid,
        ),
        paraphrase_prompts=(require(raw, "rephrase", cid, i),),
        locality_prompts=(LabeledPrompt(loc, require(raw, "loc_ans", cid, i)),),
    )


def parse_memoe(raw: dict, i: int) -> EditRecord:
    """memoe's own schema (:meth:`EditRecord.to_dict`), as written by ``memoe.data.save_records``."""
    try:
        return EditRecord.from_dict(raw)
    except (KeyError, TypeError) as e:
        raise RecordError(raw.get("request", {}).get("case_id", i), i, "request", f"malformed: {e}") from None


PARSERS: dict[str, Callable[[dict, int], EditRecord]] = {
    "counterfact": parse_counterfact,
    "counterfact-easyedit": parse_counterfact_easyedit,
    "zsre": parse_zsre,
    "memoe": parse_memoe,
}


def detect_schema(raw: dict) -> str:
    """Name the schema of one raw record from its keys."""
    keys = set(raw)
    if "requested_rewrite" in keys:
        return "counterfact"
    if "request" in keys:
        return "memoe"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"prompt", "target_new", "ground_truth"} <= keys:
        return "counterfact-easyedit"
    raise DataError(f"cannot tell the schema of a record with keys {sorted(keys)}; pass schema= one of {sorted(PARSERS)}")


def _read_json_rows(path: Path) -> list:
    """A local file's rows: a JSON list of objects, or JSON Lines (one object a line); a one-line error naming the
    file (and line) otherwise."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"edit dataset {path} is empty")
    try:
        rows = json.loads(text)
        rows = rows if isinstance(rows, list) else [rows]
    except json.JSONDecodeError as whole:
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    first = whole if n == 1 else e
                    raise DataError(f"edit dataset {path}: not JSON or JSON Lines (line {n}: {first.msg})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"edit dataset {path}: record {i} is a {type(row).__name__}, not an object")
    return rows


def _read_rows(source: str, split: str) -> list[dict]:
    """Rows of a local JSON/JSONL file or folder, or of a hub dataset (via :mod:`datasets`)."""
    path = Path(source)
    if path.is_dir():
        return [row for p in sorted(path.iterdir()) if p.suffix in (".json", ".jsonl") for row in _read_json_rows(p)]
    if path.exists():
        return _read_json_rows(path)
    if source.endswith((".json", ".jsonl")) or source.startswith((".", "/", "~")):
        raise MissingFileError(f"edit dataset file not found: {source}")
    import datasets  # a hub id such as "azhx/counterfact"; only works where the hub is reachable

    datasets.disable_progress_bars()
    return datasets.load_dataset(source, split=split).to_list()


def load_records(
    source: str | os.PathLike,
    schema: Schema = "auto",
    limit: int | None = None,
    bad_records: BadRecordPolicy = "error",
    split: str = "train",
) -> EditDataset:
    """Load and validate edit records from a file, a folder of JSON files, or a Hugging Face dataset id.

    Args:
        source: local path (``.json`` list or ``.jsonl``) or hub dataset id.
        schema: record schema; ``"auto"`` detects it from the first record.
        limit: keep only the first ``limit`` records (after validation of those records).
        bad_records: ``"error"`` raises on the first bad record; ``"skip"`` leaves bad records out with a
            warning and lists them in ``EditDataset.skipped`` (see :func:`memoe.data.records.check_records`).
        split: dataset split, for hub ids.
    """
    rows = _read_rows(str(source), split)
    if not rows:
        raise DataError(f"edit dataset {source} holds no records")
    schema = detect_schema(rows[0]) if schema == "auto" else schema
    if schema not in PARSERS:
        raise ConfigError(f"unknown schema {schema!r}; choose one of {sorted(PARSERS)}")
    parse = PARSERS[schema]

    def parsed(i: int, row: dict) -> EditRecord | RecordError:
        try:
            return parse(row, i)
        except RecordError as err:
            return err

    records, skipped = check_records([parsed(i, row) for i, row in enumerate(rows)], bad_records=bad_records)
    if not records:
        raise DataError(f"edit dataset {source}: none of its {len(rows)} records is a usable {schema} record "
                         f"(first problem: {skipped[0]}); is it the right file for this dataset?")
    if limit is not None:
        records = records[:limit]
    return EditDataset(name=schema, records=records, source=str(source), skipped=skipped)


def load_edit_dataset(
    name: str,
    data_path: str | os.PathLike | None = None,
    limit: int | None = None,
    bad_records: BadRecordPolicy = "error",
    seed: int = 0,
    **synthetic_options,
) -> EditDataset:
    """Load a dataset by name: ``synthetic``, ``counterfact``, ``counterfact-easyedit``, ``zsre`` or
    ``counterfact-sample`` (the first 200 CounterFact records, shipped with memoe).

    The real benchmarks are read from ``data_path`` if given, else from :func:`default_data_dir`. Any other
    name is treated as a path or hub id (schema auto-detected). ``synthetic`` builds the synthetic world
    with ``limit`` edits (default 1,000) and ``seed``; extra keyword options go to
    :class:`memoe.data.synthetic.WorldConfig`.
    """
    if name == "synthetic":
        world = build_world(WorldConfig(num_edits=limit or 1000, seed=seed, **synthetic_options))
        return world.dataset
    if name in SHIPPED_FILES and not data_path:
        file, schema = SHIPPED_FILES[name]
        ds = load_records(Path(__file__).with_name(file), schema=schema, limit=limit, bad_records=bad_records)
        ds.name = name
        return ds
    if name in DEFAULT_FILES:
        path = Path(data_path) if data_path else default_data_dir() / DEFAULT_FILES[name]
        if not path.exists():
            raise MissingFileError(f"{name} data not found at {path}; pass --data-path or set MEMOE_DATA_DIR")
        ds = load_records(path, schema=name, limit=limit, bad_records=bad_records)
        ds.name = name
        return ds
    return load_records(data_path or name, limit=limit, bad_records=bad_records)


def save_records(path: str | os.PathLike, records: list[EditRecord]) -> None:
    """Write records in memoe's own JSON schema (atomically); :func:`load_records` reads them back."""
    write_json(path, [r.to_dict() for r in records])
