"""Series in the config: the three ways to name checkpoints, and their one-line errors."""

from __future__ import annotations

import pytest
from conftest import assert_one_line

from weight_geometry.config import build_plan
from weight_geometry.errors import UserError
from weight_geometry.series import SeriesCheckpoint, is_series, series_checkpoints


def hub_ids(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith("/")


def test_revisions_read_their_steps_in_order():
    entry = {"source": "acme/tiny", "revisions": ["step1000", "step0", "ckpt-20"]}
    assert series_checkpoints("s", entry, hub_ids) == [
        SeriesCheckpoint(0, "acme/tiny", "step0"), SeriesCheckpoint(20, "acme/tiny", "ckpt-20"),
        SeriesCheckpoint(1000, "acme/tiny", "step1000")]
    mapped = {"source": "acme/tiny", "revisions": {0: "main-init", 5: "abc"}}
    assert [(c.step, c.revision) for c in series_checkpoints("s", mapped, hub_ids)] == [
        (0, "main-init"), (5, "abc")]


def test_explicit_checkpoints_and_trainer_folder(tmp_path):
    listed = {"checkpoints": [{"step": 10, "path": "/b"}, {"step": 0, "path": "/a"}]}
    assert series_checkpoints("s", listed, hub_ids) == [SeriesCheckpoint(0, "/a"),
                                                        SeriesCheckpoint(10, "/b")]
    for step in (0, 50, 100):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()   # not a step: ignored
    (tmp_path / "runs").mkdir()
    entry = {"source": str(tmp_path)}
    assert is_series(entry, hub_ids)
    assert [c.step for c in series_checkpoints("s", entry, hub_ids)] == [0, 50, 100]
    assert not is_series({"source": str(tmp_path / "runs")}, hub_ids)


@pytest.mark.parametrize(("entry", "fragments"), [
    ({"source": "acme/tiny", "revisions": ["main", "step1"]}, ["'main'", "names no step"]),
    ({"source": "acme/tiny", "revisions": ["step1", "ckpt1"]}, ["step 1 appears twice"]),
    ({"source": "acme/tiny", "revisions": ["step1"]}, ["at least 2 checkpoints"]),
    ({"source": "/some/dir", "revisions": ["step1", "step2"]}, ["only with a hub id"]),
    ({"source": "acme/tiny", "checkpoints": {0: "/a", 1: "/b"}}, ["not allowed with source"]),
    ({"checkpoints": [{"step": -1, "path": "/a"}, {"step": 2, "path": "/b"}]}, ["step -1"]),
    ({"checkpoints": ["/a", "/b"]}, ["'/a' is not allowed", "{step: N, path: ...}"]),
])
def test_bad_series_entries_are_one_line(entry, fragments):
    with pytest.raises(UserError) as err:
        series_checkpoints("s", entry, hub_ids)
    assert_one_line(err.value, "models.s", *fragments)


def test_plan_names_each_checkpoint_and_compares_the_last(tmp_path, tiny_checkpoint):
    plan = build_plan({"top_k": 4, "device": "cpu"}, {
        "single": {"source": str(tiny_checkpoint)},
        "run": {"checkpoints": {300: str(tiny_checkpoint), 0: str(tiny_checkpoint)}}})
    assert list(plan.series) == ["run"]
    assert plan.series["run"] == ["run/step0", "run/step300"]
    assert plan.models["run/step300"].series == "run"
    assert plan.models["run/step300"].step == 300
    assert plan.compared() == ["single", "run/step300"]


def test_series_refuses_user_ranks(tiny_checkpoint):
    with pytest.raises(UserError) as err:
        build_plan({"top_k": 4}, {"run": {"checkpoints": {0: str(tiny_checkpoint),
                                                          1: str(tiny_checkpoint)},
                                          "effective_ranks": "ranks.csv"}})
    assert_one_line(err.value, "models.run.effective_ranks", "not allowed for a series")
