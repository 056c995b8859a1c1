"""Where the subject sits in a tokenised prompt: shared by the causal trace, key extraction and routing."""

from __future__ import annotations

from memoe.errors import ConfigError, DataError


def subject_span(tok, template: str, subject: str) -> tuple[int, int]:
    """Token indices ``[start, end)`` of ``subject`` in ``tok(template.format(subject))`` (BOS included).

    Tokenises the text before the subject and the text up to the subject's end, as ROME does, so it works
    for byte-level BPEs that glue the leading space to the subject's first token.
    """
    if template.count("{}") != 1:
        raise DataError(f"prompt template must contain exactly one '{{}}', got {template!r}")
    if not subject:
        raise DataError("empty subject")
    before = template[: template.index("{}")]
    n_before = len(tok(before.rstrip(), add_special_tokens=True)["input_ids"]) if before.strip() else \
        len(tok("", add_special_tokens=True)["input_ids"])
    n_through = len(tok(before + subject, add_special_tokens=True)["input_ids"])
    if n_through <= n_before:
        raise DataError(f"subject {subject!r} occupies no tokens in {template!r}")
    return n_before, n_through


def fact_position(tok, template: str, subject: str, where: str) -> int:
    """Index of the token an editor reads its key at: ``subject_last``, ``subject_first`` or ``prompt_last``."""
    start, end = subject_span(tok, template, subject)
    if where == "subject_last":
        return end - 1
    if where == "subject_first":
        return start
    if where == "prompt_last":
        return len(tok(template.replace("{}", subject), add_special_tokens=True)["input_ids"]) - 1
    raise ConfigError(f"unknown token position {where!r}; choose subject_last, subject_first or prompt_last")
