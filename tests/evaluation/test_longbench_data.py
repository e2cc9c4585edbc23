"""LongBench data loading: official JSONL files (v1 and LongBench-E), a dataset repository, and clear errors."""

import json

import pytest

from kvpress_evaluation.longbench.data import check_local_files, load_rows, read_jsonl


def row(i: int, **changes) -> dict:
    """A row in the official format (our own text)."""
    base = {
        "input": f"Which river is number {i}?",
        "context": f"Passage {i}: the river {i} runs north.",
        "answers": [f"river {i}"],
        "length": 100 * i,
        "dataset": "hotpotqa",
        "language": "en",
        "all_classes": None,
        "_id": f"id{i}",
    }
    return {**base, **changes}


def write(folder, stem: str, rows, blank_line: bool = False):
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if blank_line:
        lines.insert(1, "")
    path = folder / f"{stem}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_official_rows_in_file_order(tmp_path):
    rows = [row(1), row(2, input=None, all_classes=["A", "B"]), row(3)]
    write(tmp_path, "hotpotqa", rows, blank_line=True)
    loaded = load_rows("hotpotqa", data_dir=tmp_path)
    assert [r["_id"] for r in loaded] == ["id1", "id2", "id3"]
    assert loaded[0] == rows[0]
    assert loaded[1]["input"] == "" and loaded[1]["all_classes"] == ["A", "B"]  # null input becomes ""


def test_longbench_e_reads_the_e_file(tmp_path):
    write(tmp_path, "hotpotqa", [row(1)])
    write(tmp_path, "hotpotqa_e", [row(7), row(8)])
    assert [r["_id"] for r in load_rows("hotpotqa", True, data_dir=str(tmp_path))] == ["id7", "id8"]
    assert [r["_id"] for r in load_rows("hotpotqa", False, data_dir=str(tmp_path))] == ["id1"]


def test_missing_directory_or_files_name_data_dir(tmp_path):
    with pytest.raises(ValueError, match="data_dir .* is not a directory"):
        check_local_files(tmp_path / "nowhere", ["hotpotqa"])
    write(tmp_path, "hotpotqa", [row(1)])
    with pytest.raises(ValueError, match=r"data_dir .* lacks qasper\.jsonl, trec\.jsonl"):
        check_local_files(tmp_path, ["hotpotqa", "qasper", "trec"])
    with pytest.raises(ValueError, match=r"lacks hotpotqa_e\.jsonl"):
        load_rows("hotpotqa", True, data_dir=tmp_path)
    check_local_files(tmp_path, ["hotpotqa"])  # present: no error


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"input": "q", "context": "c"}, "missing field.*answers"),
        (row(1, answers="river"), "'answers' must be a non-empty list"),
        (row(1, answers=[]), "'answers' must be a non-empty list"),
        (row(1, context=None), "'context' and 'input' must be strings"),
        (row(1, all_classes="A"), "'all_classes' must be null or a list"),
        (row(1, length="long"), "'length' must be an integer"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, bad, message):
    path = write(tmp_path, "hotpotqa", [row(1), bad])
    with pytest.raises(ValueError, match=message) as info:
        read_jsonl(path)
    assert f"{path}:2" in str(info.value)


def test_invalid_json_and_empty_file(tmp_path):
    path = tmp_path / "hotpotqa.jsonl"
    path.write_text(json.dumps(row(1)) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"hotpotqa\.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no rows"):
        read_jsonl(path)


def test_exactly_one_source(tmp_path):
    with pytest.raises(ValueError, match="exactly one of data_dir"):
        load_rows("hotpotqa")
    with pytest.raises(ValueError, match="exactly one of data_dir"):
        load_rows("hotpotqa", data_dir=tmp_path, dataset_name="owner/LongBench")


def test_dataset_repository_with_one_configuration_per_file(tmp_path):
    # A dataset repository laid out as on a hub (here a local folder, so no network is needed): one configuration per
    # file stem, split "test".
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        + "".join(
            f"- config_name: {stem}\n  data_files:\n  - split: test\n    path: {stem}.jsonl\n"
            for stem in ("hotpotqa", "hotpotqa_e")
        )
        + "---\n",
        encoding="utf-8",
    )
    plain, e_rows = [row(1), row(2, input=None)], [row(5)]
    write(repo, "hotpotqa", plain)
    write(repo, "hotpotqa_e", e_rows)
    loaded = load_rows("hotpotqa", dataset_name=str(repo), cache_dir=str(tmp_path / "cache"))
    assert loaded == [plain[0], {**plain[1], "input": ""}]
    assert load_rows("hotpotqa", True, dataset_name=str(repo), cache_dir=str(tmp_path / "cache")) == e_rows


def test_unreachable_dataset_names_the_option_and_suggests_data_dir(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # Offline mode makes the failure immediate instead of a series of network retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"dataset_name 'nobody-here/LongBench'.*'qasper_e'.*data_dir=") as info:
        load_rows("qasper", True, dataset_name="nobody-here/LongBench", cache_dir=str(tmp_path / "cache"))
    assert "qasper_e.jsonl" in str(info.value)
