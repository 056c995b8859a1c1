"""The one record type for an edit and its evaluation prompts, and its validation.

Every loader (CounterFact in both schemas, zsRE, the synthetic world, a user's file) produces
:class:`EditRecord` objects, and every editor and metric consumes them, so a dataset quirk is handled once,
here or in its loader, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Literal

from memoe.errors import ConfigError, RecordError

BadRecordPolicy = Literal["error", "skip"]


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into a model: ``prompt.format(subject)`` should be completed by ``target_new``.

    ``prompt`` is a template with exactly one ``{}`` where the subject goes (ROME's convention), so editors
    can find the subject's tokens. ``target_true`` is what the unedited model is expected to say.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: str | int = 0
    relation: str | None = None

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)


@dataclass(frozen=True)
class LabeledPrompt:
    """A prompt with the answer the model should give (before and after the edit)."""

    prompt: str
    target: str


@dataclass(frozen=True)
class EditRecord:
    """An edit request with every evaluation prompt the dataset offers.

    - ``paraphrase_prompts``: the same fact phrased otherwise; after the edit they should give ``target_new``.
    - ``neighborhood_prompts``: other subjects, same relation, whose true answer is ``target_true``; after
      the edit they should *still* give ``target_true`` (CounterFact's specificity).
    - ``attribute_prompts``: other subjects whose true answer is ``target_new``.
    - ``generation_prompts``: open prompts about the subject for fluency / consistency.
    - ``locality_prompts``: unrelated prompts with their own answers (zsRE's NQ question, EasyEdit's
      locality prompt).
    - ``same_subject_prompts``: the same subject under *other* relations, with their answers; an edit must
      not change them (the synthetic world provides them).
    """

    request: EditRequest
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    locality_prompts: tuple[LabeledPrompt, ...] = ()
    same_subject_prompts: tuple[LabeledPrompt, ...] = ()

    @property
    def case_id(self) -> str | int:
        return self.request.case_id

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EditRecord":
        """Inverse of :meth:`to_dict` (memoe's own JSON schema)."""
        lp = lambda xs: tuple(LabeledPrompt(**x) for x in xs or ())  # noqa: E731
        return cls(
            request=EditRequest(**d["request"]),
            paraphrase_prompts=tuple(d.get("paraphrase_prompts") or ()),
            neighborhood_prompts=tuple(d.get("neighborhood_prompts") or ()),
            attribute_prompts=tuple(d.get("attribute_prompts") or ()),
            generation_prompts=tuple(d.get("generation_prompts") or ()),
            locality_prompts=lp(d.get("locality_prompts")),
            same_subject_prompts=lp(d.get("same_subject_prompts")),
        )


def require(raw: dict, key: str, case_id: object, index: int | None, kind: type = str):
    """Fetch ``raw[key]`` (``key`` may be dotted), failing with a :class:`RecordError` naming the field."""
    value: object = raw
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value or value[part] is None:
            raise RecordError(case_id, index, key, "missing")
        value = value[part]
    if kind is str and not isinstance(value, str):
        raise RecordError(case_id, index, key, f"expected a string, got {type(value).__name__}")
    if kind is list and not isinstance(value, (list, tuple)):
        raise RecordError(case_id, index, key, f"expected a list, got {type(value).__name__}")
    return value


def validate_record(rec: EditRecord, index: int | None = None) -> None:
    """Raise :class:`RecordError` if ``rec`` cannot be edited or scored meaningfully."""
    r, cid = rec.request, rec.request.case_id
    if r.prompt.count("{}") != 1:
        raise RecordError(cid, index, "prompt", f"must contain exactly one '{{}}' for the subject, got {r.prompt!r}")
    if not r.subject.strip():
        raise RecordError(cid, index, "subject", "empty")
    for name in ("target_new", "target_true"):
        value = getattr(r, name)
        if value is not None and not value.strip():
            raise RecordError(cid, index, name, "empty target")
    for i, p in enumerate(rec.paraphrase_prompts):
        if not p.strip():
            raise RecordError(cid, index, f"paraphrase_prompts[{i}]", "empty prompt")
    for group in ("locality_prompts", "same_subject_prompts"):
        for i, lp in enumerate(getattr(rec, group)):
            if not lp.prompt.strip() or not lp.target.strip():
                raise RecordError(cid, index, f"{group}[{i}]", "empty prompt or target")


def is_noop(rec: EditRecord) -> bool:
    """True when the new target equals the true one: the 'edit' would change nothing."""
    r = rec.request
    return r.target_true is not None and r.target_new.strip() == r.target_true.strip()


def check_records(
    records: Iterable[EditRecord | RecordError], bad_records: BadRecordPolicy = "error"
) -> tuple[list[EditRecord], list[RecordError]]:
    """Validate every record and the set as a whole; return ``(records to use, skipped errors)``.

    Loaders pass a :class:`RecordError` in place of a record they could not parse, so that parse errors and
    validation errors follow the same policy. A bad record is one that is malformed (missing field, empty
    target, subject not in its prompt), a no-op (new target equals the true one), or a duplicate case id
    whose targets conflict with an earlier record. ``bad_records="error"`` raises on the first;
    ``"skip"`` leaves each out *with a warning naming its case id, field and problem* and returns the errors.
    Identical duplicates are merged with a warning. Nothing is ever dropped silently.
    """
    if bad_records not in ("error", "skip"):
        raise ConfigError(f"bad_records must be 'error' or 'skip', got {bad_records!r}")
    out: list[EditRecord] = []
    skipped: list[RecordError] = []
    seen: dict[object, tuple[int, EditRecord]] = {}
    merged = []
    for i, rec in enumerate(records):
        try:
            if isinstance(rec, RecordError):
                raise rec
            validate_record(rec, i)
            if is_noop(rec):
                raise RecordError(rec.case_id, i, "target_new", f"equals target_true ({rec.request.target_new!r}): "
                                  "the edit would change nothing")
            cid = rec.case_id
            if cid in seen:
                j, other = seen[cid]
                if other == rec:
                    merged.append(cid)
                    continue
                a, b = other.request, rec.request
                name = next((n for n in ("target_new", "target_true", "subject", "prompt") if getattr(a, n) != getattr(b, n)), "request")
                raise RecordError(cid, i, name, f"duplicate case id conflicts with index {j} "
                                  f"({getattr(a, name, '')!r} vs {getattr(b, name, '')!r})")
            seen[cid] = (i, rec)
            out.append(rec)
        except RecordError as err:
            if bad_records == "error":
                raise RecordError(err.case_id, err.index, err.field, err.problem +
                                  "; pass bad_records='skip' (CLI: --bad-records skip) to leave bad records out") from None
            skipped.append(err)
    if skipped:
        listing = "; ".join(str(e) for e in skipped[:50]) + (" ..." if len(skipped) > 50 else "")
        warnings.warn(f"left out {len(skipped)} bad records: {listing}", stacklevel=2)
    if merged:
        warnings.warn(f"merged {len(merged)} identical duplicate records, case ids: {merged}", stacklevel=2)
    return out, skipped


@dataclass
class EditDataset:
    """A named list of validated records, plus where they came from."""

    name: str
    records: list[EditRecord]
    source: str = ""
    meta: dict = field(default_factory=dict)
    skipped: list[RecordError] = field(default_factory=list)
    """Bad records left out under ``bad_records="skip"``, each naming its case id, field and problem."""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def __iter__(self):
        return iter(self.records)

    @property
    def requests(self) -> list[EditRequest]:
        return [r.request for r in self.records]
