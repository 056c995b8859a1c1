import pytest

from memoe.data import EditRecord, EditRequest, LabeledPrompt, RecordError, check_records


def rec(case_id=1, prompt="{} was born in", subject="Ada", new="Paris", true="Rome", **kw):
    return EditRecord(EditRequest(prompt, subject, new, true, case_id), **kw)


def test_valid_records_pass_untouched():
    records = [rec(1), rec(2, subject="Bob")]
    kept, skipped = check_records(records)
    assert kept == records and skipped == []


@pytest.mark.parametrize(
    "bad, field",
    [
        (rec(7, new=""), "target_new"),
        (rec(7, true="  "), "target_true"),
        (rec(7, new="Rome"), "target_new"),  # no-op: new equals true
        (rec(7, prompt="born in"), "prompt"),  # no subject slot
        (rec(7, subject=""), "subject"),
        (rec(7, locality_prompts=(LabeledPrompt("q", ""),)), "locality_prompts[0]"),
    ],
)
def test_bad_record_error_names_record_and_field(bad, field):
    with pytest.raises(RecordError) as e:
        check_records([rec(1), bad])
    assert e.value.case_id == 7 and e.value.index == 1 and e.value.field == field
    assert "case_id=7" in str(e.value) and repr(field) in str(e.value)


def test_duplicate_case_id_with_conflicting_target():
    with pytest.raises(RecordError, match="duplicate case id conflicts with index 0") as e:
        check_records([rec(3, new="Paris"), rec(3, new="Lima")])
    assert e.value.field == "target_new"


def test_identical_duplicates_are_merged_with_warning():
    with pytest.warns(UserWarning, match="merged 1 identical"):
        kept, _ = check_records([rec(3), rec(3)])
    assert len(kept) == 1


def test_skip_policy_lists_every_bad_record_and_keeps_the_rest():
    records = [rec(1), rec(2, new=""), rec(3), rec(4, new="Rome")]
    with pytest.warns(UserWarning, match="left out 2 bad records"):
        kept, skipped = check_records(records, bad_records="skip")
    assert [r.case_id for r in kept] == [1, 3]
    assert [(e.case_id, e.field) for e in skipped] == [(2, "target_new"), (4, "target_new")]


def test_request_text_fills_subject():
    assert EditRequest("The home of {} is", "Ada", "x").text == "The home of Ada is"


def test_round_trip_through_dict():
    r = rec(5, paraphrase_prompts=("p",), same_subject_prompts=(LabeledPrompt("a", "b"),))
    assert EditRecord.from_dict(r.to_dict()) == r
