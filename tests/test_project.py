"""Project hygiene that users rely on: lint-clean workflow and code, consistent environments,
a config that matches its schema, and rules that declare what the conventions ask for."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib

import jsonschema
import pytest
import yaml
from conftest import REPO, config_schema, markdown_table
from packaging.requirements import Requirement

SMK = [str(REPO / "Snakefile"), *map(str, sorted((REPO / "workflow/rules").glob("*.smk")))]


def run(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)


def test_snakemake_lint_clean():
    proc = run(sys.executable, "-m", "snakemake", "--lint")
    assert proc.returncode == 0 and "Congratulations" in proc.stdout + proc.stderr, \
        proc.stdout + proc.stderr


def test_snakefmt_clean():
    proc = run(sys.executable, "-m", "snakefmt", "--check", *SMK)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_clean():
    proc = run(sys.executable, "-m", "ruff", "check", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_rule_declares_log_benchmark_conda_resources():
    text = "\n".join(p.read_text() for p in sorted((REPO / "workflow/rules").glob("*.smk"))
                     if p.name != "common.smk")
    rules = re.split(r"^rule ", text, flags=re.M)[1:]
    assert len(rules) >= 10
    for body in rules:
        name = body.split(":")[0]
        for key in ("log:", "benchmark:", "conda:", "threads:", "resources:", "mem_mb=",
                    "runtime="):
            assert key in body, f"rule {name} lacks {key}"
    gpu_rules = [b.split(":")[0] for b in rules if "gpu=" in b]
    assert gpu_rules == ["extract_layers"]


def _pyproject_requirements():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {Requirement(r).name.lower().replace("_", "-"): Requirement(r)
            for r in data["project"]["dependencies"]}


def _env_pins():
    env = yaml.safe_load((REPO / "envs/geometry.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pins = {}
    for line in pip:
        name, version = line.split("==")
        pins[name.lower().replace("_", "-")] = version
    return pins


def test_conda_env_agrees_with_package_requirements():
    reqs, pins = _pyproject_requirements(), _env_pins()
    assert set(pins) == set(reqs)
    for name, req in reqs.items():
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name], req)


@pytest.mark.parametrize("package", ["numpy", "pandas", "torch", "snakemake", "gguf"])
def test_conda_pins_are_what_the_tests_run_with(package):
    from importlib.metadata import version

    installed = version(package).split("+")[0]
    assert _env_pins()[package] == installed


def test_shipped_config_matches_schema():
    schema = config_schema()
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    jsonschema.validate(config, schema)
    for key, prop in schema["properties"].items():
        if "default" in prop:
            assert config[key] == prop["default"], key


def test_readme_config_table_lists_the_schema_keys_with_their_defaults():
    rows = markdown_table((REPO / "README.md").read_text(), "## Configuration")
    documented = {row["key"].strip("`"): row["default"] for row in rows}
    schema = config_schema()
    per_model = schema["properties"]["models"]["additionalProperties"]["properties"]
    assert set(documented) == {*schema["properties"], *(f"models.*.{k}" for k in per_model)}
    shipped = yaml.safe_load((REPO / "config/config.yaml").read_text())
    for key, prop in schema["properties"].items():
        default = prop.get("default", shipped.get(key))
        assert yaml.safe_load(documented[key].strip("`")) == default, key
    assert documented["models.*.source"] == "required"
    assert documented["models.*.effective_ranks"] == "none"


def test_rule_scripts_import_only_the_glue_at_top():
    """Every rule script hands its whole work, imports included, to run_rule: its top level
    imports only ``_library`` and ``run_rule``/``progress``, so that any failure, an import
    error too, reaches the rule's log."""
    scripts = sorted((REPO / "workflow/scripts").glob("*.py"))
    assert len(scripts) > 10
    for path in scripts:
        if path.name == "_library.py":
            continue
        tree = ast.parse(path.read_text())
        top = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
        names = [ast.unparse(node) for node in top]
        assert names[0] == "import _library", (path.name, names)
        assert all(n.startswith("from weight_geometry.rule_script import") for n in names[1:]), (
            path.name, names)
        calls = [ast.unparse(node) for node in tree.body if isinstance(node, ast.Expr)]
        assert calls[-1:] == ["run_rule(main, snakemake.log[0], snakemake.output)"], path.name
