import json

import pytest

from memoe.evaluation.readme import main, replace_section


def test_replace_section_needs_markers():
    with pytest.raises(ValueError, match="results:evals"):
        replace_section("no markers here", "evals", "x")
    assert replace_section("a\n<!-- results:x -->\nold\n<!-- /results:x -->\nb", "x", "new") == \
        "a\n<!-- results:x -->\nnew\n<!-- /results:x -->\nb"


def test_readme_written_from_result_files(tmp_path):
    report = {"name": "synthetic-9", "parameters": 1234, "build_seconds": 12.3, "storage_site": "subject position",
              "recall": {"requests": {"recall": 0.99, "n": 9}, "heldout": {"recall": 0.8, "n": 9}},
              "trace": {"effects": {"mlp": {"subject_last": [0.2, 0.0, 0.5], "prompt_last": [0.0, 0.1, 0.9]}}}}
    metrics = {"cf_efficacy": 1.0, "cf_paraphrase": 0.5, "cf_neighbourhood": 0.75, "cf_score": 0.7}
    result = {"pre": metrics, "dataset": {"name": "synthetic", "num_edits": 9},
              "options": {"grid": {"modes": ["batch"], "batch_sizes": [3]}}, "pre_scoring": {"prompts_per_second": 100.0},
              "machine": {"platform": "x86_64", "cpus": 2, "device": "cpu", "gpu": None},
              "runs": {"ft batch b=3": {"editor": "ft", "mode": "batch", "batch_size": 3, "current": metrics, "final": None,
                                        "edits_per_second": 2.5, "peak_memory_mb": 512.0}}}
    gpu = {**result, "machine": {"platform": "x86_64", "cpus": 16, "device": "cuda:0", "gpu": "NVIDIA H200"}}
    (tmp_path / "r.json").write_text(json.dumps(report))
    (tmp_path / "e.json").write_text(json.dumps(result))
    (tmp_path / "g.json").write_text(json.dumps(gpu))
    readme = tmp_path / "README.md"
    readme.write_text("# t\n<!-- results:testbeds -->\n<!-- /results:testbeds -->\n<!-- results:evals -->\n<!-- /results:evals -->\n")
    main(str(readme), "", [str(tmp_path / "r.json")], [str(tmp_path / "e.json"), str(tmp_path / "g.json")])
    text = readme.read_text()
    assert "| synthetic-9 | 1,234 | 12 | 0.990 | 0.800 |" in text
    assert "+0.200 (0)" in text and "+0.100 (1)" in text  # last layer excluded from the peaks
    assert "| ft batch b=3 (current) | 1.000 | 0.500 | 0.750 | 0.700 |" in text
    assert "2.5 edits/s" in text
    assert "batch sizes [3]; x86_64, 2 CPU threads, cpu)" in text
    assert "batch sizes [3]; x86_64, 16 CPU threads, cuda:0 (NVIDIA H200))" in text


def test_adapter_section_from_train_metrics(tmp_path):
    m = lambda e: {"cf_efficacy": e, "cf_paraphrase": 0.5, "cf_neighbourhood": 0.75, "cf_score": 0.7}  # noqa: E731
    res = {"pre": m(0.0), "dataset": {"name": "synthetic", "num_edits": 9}, "adapter": {"gate on": m(1.0), "gate off": m(0.9)},
           "train": {"steps": 40, "seconds": 12.5, "edits_per_second": 0.72, "devices": 1}, "peak_rss_mb": 700.0,
           "options": {"edits": {"model": None}}}
    (tmp_path / "metrics.json").write_text(json.dumps(res))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:adapters -->\n<!-- /results:adapters -->\n")
    main(str(readme), "", [], [], [str(tmp_path / "metrics.json")])
    text = readme.read_text()
    assert "| memoe, gate on | 1.000 | 0.500 | 0.750 | 0.700 |" in text and "| memoe, gate off | 0.900 |" in text
    assert "40 steps in 12.5 s (0.72 edits/s)" in text and "**the knowledge testbed, synthetic, 9 edits**" in text
    # the main job on a real model, with MEMIT beside it, into the README's own marker
    res.update(options={"edits": {"model": "smollm2-135m"}}, compared={"memit": {**m(0.97), "seconds": 258.4}}, wall_seconds=540.0)
    (tmp_path / "metrics.json").write_text(json.dumps(res))
    readme.write_text("<!-- results:main-job -->\n<!-- /results:main-job -->\n")
    main("", str(readme), [], [], main_job=str(tmp_path / "metrics.json"))
    text = readme.read_text()
    assert "**smollm2-135m, synthetic, 9 edits**" in text and "| memit, one batch | 0.970 | 0.500 |" in text
    assert "memit edited in 258 s; the whole job 9.0 min" in text


def test_study_section_with_table_winners_and_copied_plots(tmp_path):
    m = lambda e, n: {"cf_efficacy": e, "cf_paraphrase": 0.5, "cf_neighbourhood": n, "cf_score": 0.7}  # noqa: E731
    run = lambda mode, b, cur, fin: {"editor": "memit", "mode": mode, "batch_size": b, "layer": None, "current": cur,  # noqa: E731
                                     "final": fin, "edits_per_second": 1.25, "peak_memory_mb": 600.0, "wall_seconds": 30}
    res = {"name": "batch-size", "description": "metrics against batch size",
           "definition": {"grid": {"editors": ["memit"], "modes": ["batch", "sequential-batch"]}},
           "machine": {"platform": "x86_64", "cpus": 2, "device": "cpu", "gpu": None},
           "dataset": {"name": "counterfact", "num_edits": 8}, "pre": m(0.0, 1.0),
           "runs": {"memit batch b=8": run("batch", 8, m(1.0, 0.9), None),
                    "memit sequential-batch b=4": run("sequential-batch", 4, m(1.0, 1.0), m(0.75, 0.95))},
           "skipped": [{"editor": "memit", "mode": "batch", "batch_size": 16, "reason": "over N"},
                       {"editor": "memit", "mode": "batch", "batch_size": 32, "reason": "over N"},
                       {"editor": "memit", "mode": "sequential-batch", "batch_size": 1, "reason": "slow"}]}
    studies = tmp_path / "runs"
    studies.mkdir()
    (studies / "bs.json").write_text(json.dumps(res))
    (studies / "bs-batch-size.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "docs").mkdir()
    readme = tmp_path / "docs" / "results.md"
    readme.write_text("<!-- results:studies -->\n<!-- /results:studies -->\n")
    main(str(readme), "", [], [], [], [str(studies / "bs.json")])
    text = readme.read_text()
    assert "| memit | batch | 8 | 1.000 | 0.500 | 0.900 | 0.700 | 1.250 | 600 |" in text
    assert "| memit | sequential-batch | 4 | 0.750 | 0.500 | 0.950 |" in text  # the final scores, not current
    assert "cf_efficacy — memit batch b=8 (1.000)" in text and "cf_neighbourhood — memit sequential-batch b=4 (0.950)" in text
    assert "2 runs in 1.0 min" in text and "Skipped: batch sizes 16, 32 for memit batch (over N); memit sequential-batch b=1 (slow)." in text
    assert "![bs-batch-size](studies/bs-batch-size.png)" in text
    assert (tmp_path / "docs" / "studies" / "bs-batch-size.png").read_bytes() == b"\x89PNG fake"


def test_method_table_from_a_study_over_every_editor(tmp_path):
    from memoe.editors import REGISTRY

    m = lambda s: {"cf_efficacy": 1.0, "cf_score": s}
    runs = {"rome batch b=16": {"editor": "rome", "mode": "batch", "batch_size": 16, "current": m(0.9), "final": None},
            "rome sequential-batch b=16": {"editor": "rome", "mode": "sequential-batch", "batch_size": 16, "current": m(0.9),
                                           "final": m(0.625)}}
    res = {"name": "main", "runs": runs, "pre": m(0.0), "dataset": {"name": "counterfact", "num_edits": 32},
           "machine": {"platform": "x86_64", "cpus": 2, "device": "cpu", "gpu": None}}
    (tmp_path / "main.json").write_text(json.dumps(res))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:methods -->\n<!-- /results:methods -->\n")
    main("", str(readme), [], [], methods=str(tmp_path / "main.json"))
    text = readme.read_text()
    assert f"| `rome` | {REGISTRY['rome'].summary} | Meng et al. 2022 | 0.900 | 0.625 |" in text  # final, not current
    assert "| `memit` |" in text and text.count("| `") == len(REGISTRY)  # every method, measured or not


def test_real_model_table_with_current_final_speed_and_runs_still_to_do(tmp_path):
    m = lambda e, n: {"cf_efficacy": e, "cf_efficacy_mag": 0.5, "cf_neighbourhood": n, "fluency": 6.25, "zsre_efficacy": 0.1}  # noqa: E731
    run = lambda ed, mode, b, cur, fin: {"editor": ed, "mode": mode, "batch_size": b, "current": cur, "final": fin,  # noqa: E731
                                         "edits_per_second": 0.25, "peak_memory_mb": 3100.0,
                                         "time_split": {"targets": 300.4, "solve": 2.0, "scoring": 120.0}}
    res = {"protocol": {"model": "smollm2-135m"}, "dataset": {"name": "counterfact", "num_edits": 100},
           "definition": {"grid": {"editors": ["memit", "rome"]}}, "machine": {"platform": "x86_64", "cpus": 2, "device": "cpu", "gpu": None},
           "pre": m(0.25, 0.75), "order": ["memit batch b=100", "memit sequential-batch b=10", "rome single b=1"],
           "skipped": [{"editor": "rome", "mode": "batch", "batch_size": 100, "reason": "one fact at a time"}],
           "runs": {"memit batch b=100": run("memit", "batch", 100, m(0.98, 0.72), None),
                    "memit sequential-batch b=10": run("memit", "sequential-batch", 10, m(1.0, 0.7), m(0.875, 0.625))}}
    (tmp_path / "cf.json").write_text(json.dumps(res))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:real-model -->\n<!-- /results:real-model -->\n")
    main("", str(readme), [], [], real_model=[str(tmp_path / "cf.json")])
    text = readme.read_text()
    assert "| run | cf_efficacy | cf_efficacy_mag | cf_neighbourhood | fluency |" in text  # zsRE accuracy is not a CounterFact column
    assert "| pre-edit | 0.250 | 0.500 | 0.750 |" in text and "| memit batch b=100 | 0.980 |" in text
    assert "| memit sequential-batch b=10 (current) | 1.000 |" in text and "| memit sequential-batch b=10 (final) | 0.875 | 0.500 | 0.625 |" in text
    assert "memit batch b=100: 0.250 edits/s, peak 3100 MiB (targets 300 s, solve 2 s, scoring 120 s)" in text
    assert "**smollm2-135m, counterfact, first 100 records**" in text
    assert "Not yet run: rome single b=1. Skipped: rome batch b=100 (one fact at a time)." in text
