import json
import re
from pathlib import Path

import pytest

from memoe.data import RecordError, default_data_dir, load_edit_dataset, load_records, save_records
from memoe.data.synthetic import WorldConfig, build_world

from ..markers import needs_shared_data

DATA = default_data_dir()


@needs_shared_data
def test_counterfact_rome_schema():
    ds = load_edit_dataset("counterfact")
    assert len(ds) == 754 and not ds.skipped
    r = ds[0]
    assert r.case_id == 34 and r.request.subject == "Laurent Cars" and r.request.prompt == "{} was employed in"
    assert (r.request.target_new, r.request.target_true) == ("Philadelphia", "Paris")
    assert len(r.paraphrase_prompts) == 2 and len(r.neighborhood_prompts) == 10
    assert len(r.attribute_prompts) == 10 and len(r.generation_prompts) == 10
    assert all(rec.request.relation for rec in ds)


def test_counterfact_sample_ships_with_the_package(monkeypatch, tmp_path):
    """The main job's edits: read from the package, wherever the shared data is (here: nowhere)."""
    monkeypatch.setenv("MEMOE_DATA_DIR", str(tmp_path))
    ds = load_edit_dataset("counterfact-sample", limit=150)
    assert ds.name == "counterfact-sample" and len(ds) == 150 and not ds.skipped
    assert ds[0].case_id == 34 and ds[0].request.target_new == "Philadelphia"
    assert len(load_edit_dataset("counterfact-sample")) == 200
    assert (Path(ds.source).parent / "counterfact_sample.md").read_text().count("MIT") >= 2  # its source and licence


@needs_shared_data
def test_counterfact_sample_is_the_first_200_shared_records():
    sample, shared = load_edit_dataset("counterfact-sample"), load_edit_dataset("counterfact", limit=200)
    assert [r.to_dict() for r in sample] == [r.to_dict() for r in shared]


@needs_shared_data
def test_counterfact_easyedit_schema():
    ds = load_edit_dataset("counterfact-easyedit")
    assert len(ds) == 2000
    r = ds[0]
    assert r.request.text == "The mother tongue of Danielle Darrieux is"
    assert (r.request.target_new, r.request.target_true) == ("English", "French")
    assert r.paraphrase_prompts and r.locality_prompts[0].target == "French"


@needs_shared_data
def test_zsre_reads_all_1670_records_and_names_the_bad_ones():
    rows = json.loads((DATA / "zsre.json").read_text())
    assert len(rows) == 1670
    with pytest.raises(RecordError) as e:  # the real file holds no-op edits: strict by default
        load_edit_dataset("zsre")
    assert e.value.case_id == 75 and e.value.field == "target_new"
    with pytest.warns(UserWarning, match="left out 38 bad records"):
        ds = load_edit_dataset("zsre", bad_records="skip")
    assert len(ds) + len(ds.skipped) == 1670
    assert {e.case_id for e in ds.skipped} >= {75, 1204, 1393}  # 1204 and 1393 have an empty new target
    r = ds[0]
    assert r.request.text == "When was the inception of IAAF Combined Events Challenge?"
    assert r.request.target_new == "2006" and r.request.target_true == "1998"
    assert r.locality_prompts[0].prompt.startswith("what is the name")  # "nq question: " stripped


@needs_shared_data
def test_data_path_is_configurable(tmp_path, monkeypatch):
    rows = json.loads((DATA / "counterfact.json").read_text())[:5]
    (tmp_path / "cf.json").write_text(json.dumps(rows))
    assert len(load_edit_dataset("counterfact", data_path=tmp_path / "cf.json")) == 5
    (tmp_path / "counterfact.json").write_text(json.dumps(rows[:3]))
    monkeypatch.setenv("MEMOE_DATA_DIR", str(tmp_path))
    assert len(load_edit_dataset("counterfact")) == 3


def test_user_file_schema_detected_and_round_trip(tmp_path):
    recs = build_world(WorldConfig(num_edits=12)).dataset.records
    save_records(tmp_path / "mine.json", recs)
    assert load_records(tmp_path / "mine.json").records == recs
    assert load_edit_dataset(str(tmp_path / "mine.json")).records == recs


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r["requested_rewrite"].pop("subject"), "requested_rewrite.subject"),
    (lambda r: r["requested_rewrite"]["target_new"].update(str=""), "requested_rewrite.target_new.str"),
    (lambda r: r.pop("paraphrase_prompts"), "paraphrase_prompts"),
])
def test_malformed_counterfact_record_named(tmp_path, mutate, field):
    rows = json.loads((DATA / "counterfact.json").read_text())[:4]
    mutate(rows[2])
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(RecordError) as e:
        load_records(tmp_path / "bad.json")
    assert e.value.case_id == rows[2]["case_id"] and e.value.index == 2
    assert e.value.field in (field, "target_new")


def test_subject_missing_from_prompt_named(tmp_path):
    rows = json.loads((DATA / "counterfact_easyedit_extra.json").read_text())[:3]
    rows[1]["subject"] = "Nobody Atall"
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(RecordError, match="subject 'Nobody Atall' does not occur in prompt") as e:
        load_records(tmp_path / "bad.json")
    assert (e.value.case_id, e.value.field) == (rows[1]["case_id"], "prompt")


def test_missing_file_is_clear():
    with pytest.raises(FileNotFoundError, match="not found"):
        load_edit_dataset("counterfact", data_path="/nonexistent/cf.json")


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("[]", "holds no records"),
    ("this is not json", "not JSON or JSON Lines (line 1"),
    ('{"a": 1}\n{"b": \n', "not JSON or JSON Lines (line 2"),
    ("[1, 2]", "record 0 is a int, not an object"),
])
def test_unreadable_data_files_get_one_line_errors(tmp_path, content, message):
    """These used to end in a bare StopIteration or a raw `datasets` traceback."""
    p = tmp_path / "d.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        load_edit_dataset("counterfact", p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


@needs_shared_data
def test_wrong_schema_file_says_so(tmp_path):
    """zsRE read as CounterFact used to end in "list index out of range" after skipping every record."""
    p = tmp_path / "z.json"
    p.write_text(json.dumps(json.loads((default_data_dir() / "zsre.json").read_text())[:5]))
    with pytest.warns(UserWarning):
        with pytest.raises(ValueError, match="none of its 5 records is a usable counterfact record.*right file"):
            load_edit_dataset("counterfact", p, bad_records="skip")


@needs_shared_data
def test_null_case_id_is_refused(tmp_path):
    rows = json.loads((default_data_dir() / "counterfact.json").read_text())[:2]
    rows[1]["case_id"] = None
    p = tmp_path / "c.json"
    p.write_text(json.dumps(rows))
    with pytest.raises(RecordError, match="case_id=None.*'case_id': must be an integer or a string"):
        load_edit_dataset("counterfact", p)
