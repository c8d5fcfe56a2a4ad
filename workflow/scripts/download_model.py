"""Rule download_model: config.json and safetensors weights of a hub id (at a revision, for a
checkpoint of a series) into the HF cache."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import progress, run_rule


def main():
    from weight_geometry.hub import download
    from weight_geometry.results_io import write_json

    repo_id, _, revision = snakemake.params.repo_id.partition("@")
    revision = revision or None
    at = f" at revision {revision}" if revision else ""
    progress(f"fetching config.json and safetensors weights of {repo_id}{at}")
    files = download(repo_id, revision)
    write_json(snakemake.output[0], {"repo_id": repo_id, "revision": revision,
                                     "files": [str(f) for f in files]})


run_rule(main, snakemake.log[0], snakemake.output)
