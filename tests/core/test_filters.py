"""Mode and ds_id filters: allow-lists, deny-lists, None, validation and the tag repr."""

import pytest

from mlflow_eigencam.filters import MODES, Filter, ds_id_filter, mode_filter


def passing(f, values):
    return [v for v in values if f(v)]


def test_none_passes_everything_including_none():
    f = ds_id_filter(None)
    assert passing(f, ["ds1", "ds2", "", None]) == ["ds1", "ds2", "", None]
    assert repr(f) == "*"


def test_single_name_and_negation():
    assert passing(mode_filter("eval"), MODES) == ["eval"]
    assert passing(mode_filter("!train"), MODES) == ["eval", "test", "infer"]
    assert repr(mode_filter("!train")) == "!train"


def test_iterables_allow_and_deny():
    assert passing(mode_filter(["eval", "test"]), MODES) == ["eval", "test"]
    assert passing(mode_filter({"test", "eval"}), MODES) == ["eval", "test"]
    assert passing(mode_filter(("!train", "!infer")), MODES) == ["eval", "test"]
    assert passing(ds_id_filter(iter(["!ds1"])), ["ds1", "ds2", None]) == ["ds2", None]


def test_repr_is_sorted_compact_and_round_trips():
    assert repr(mode_filter(["test", "eval"])) == "eval,test"
    assert repr(mode_filter(["test", "eval", "eval"])) == "eval,test"
    assert repr(ds_id_filter(["!b", "!a"])) == "!a,!b"
    for spec in (["test", "eval"], ["!train", "!infer"], "eval"):
        f = mode_filter(spec)
        assert mode_filter(repr(f).split(",")) == f


def test_none_ds_id_passes_deny_lists_but_not_allow_lists():
    assert ds_id_filter(None)(None) is True
    assert ds_id_filter("!ds1")(None) is True
    assert ds_id_filter("ds1")(None) is False
    assert ds_id_filter(["ds1", "ds2"])(None) is False


def test_mixing_negated_and_plain_is_an_error():
    with pytest.raises(ValueError, match="mixes negated and plain"):
        mode_filter(["eval", "!train"])


def test_unknown_mode_lists_valid_modes():
    with pytest.raises(ValueError, match=r"unknown mode 'val'.*train, eval, test, infer"):
        mode_filter("val")
    with pytest.raises(ValueError, match="unknown mode 'training'"):
        mode_filter(["!training"])
    # Values are checked too: an integration passing a typo must not be silently dropped.
    with pytest.raises(ValueError, match="unknown mode 'valid'"):
        mode_filter(None)("valid")
    # ds_ids are free-form.
    assert ds_id_filter("anything at all")("anything at all")


@pytest.mark.parametrize("spec", ["!", "", "!!train", ["eval", ""]])
def test_empty_or_double_negation_is_an_error(spec):
    with pytest.raises(ValueError, match="expected a name or '!name'"):
        mode_filter(spec)


def test_empty_iterable_is_an_error():
    with pytest.raises(ValueError, match="empty iterable"):
        ds_id_filter([])


@pytest.mark.parametrize("spec", [3, ["eval", 3], [None], b"eval"])
def test_non_string_names_are_type_errors(spec):
    with pytest.raises(TypeError, match="mode filter"):
        mode_filter(spec)


def test_non_string_value_is_a_type_error():
    with pytest.raises(TypeError, match=r"mode must be a string or None, got 1 \(int\)"):
        mode_filter("!train")(1)


def test_filter_copies_another_filter_and_compares_by_content():
    f = mode_filter("!train")
    assert mode_filter(f) == f and hash(mode_filter(f)) == hash(f)
    assert mode_filter("eval") != mode_filter("!eval")
    assert Filter(["a", "b"], kind="ds_id") == ds_id_filter(("b", "a"))
