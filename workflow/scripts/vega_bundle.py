"""Rule vega_bundle: the JavaScript that the HTML pages inline."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    from pathlib import Path

    from weight_geometry.interactive import vega_bundle

    Path(snakemake.output[0]).write_text(vega_bundle())


run_rule(main, snakemake.log[0], snakemake.output)
