"""Config layering: files, --set overrides, and errors that name the key."""

import pytest

from jin_orchestrate.overrides import apply_overrides, deep_merge, load_mapping, parse_override


def test_parse_override_types_values_like_yaml():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("z=[1.0, 0.5]") == (["z"], [1.0, 0.5])
    assert parse_override("name=jin") == (["name"], "jin")


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_malformed_override_is_rejected(bad):
    with pytest.raises(ValueError, match=r"path\.to\.key=value"):
        parse_override(bad)


def test_overrides_apply_in_order_and_create_sections():
    out = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=2", "train.lr=3", "data.url=x"])
    assert out == {"train": {"lr": 3}, "data": {"url": "x"}}


def test_override_through_a_value_names_the_path():
    with pytest.raises(ValueError, match=r"train\.lr is a value"):
        apply_overrides({"train": {"lr": 1.0}}, ["train.lr.x=1"])


def test_deep_merge_merges_nested_and_does_not_mutate():
    base = {"a": {"b": 1, "c": 2}, "d": [1]}
    out = deep_merge(base, {"a": {"c": 3}, "d": [2]})
    assert out == {"a": {"b": 1, "c": 3}, "d": [2]}
    assert base == {"a": {"b": 1, "c": 2}, "d": [1]}


def test_load_mapping_reads_yaml_and_json_and_names_bad_files(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 0.1\n")
    (tmp_path / "c.json").write_text('{"train": {"lr": 0.2}}')
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    assert load_mapping(tmp_path / "c.yaml") == {"train": {"lr": 0.1}}
    assert load_mapping(tmp_path / "c.json") == {"train": {"lr": 0.2}}
    with pytest.raises(ValueError, match=r"bad\.yaml"):
        load_mapping(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml"):
        load_mapping(tmp_path / "missing.yaml")
