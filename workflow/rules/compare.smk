# Stage 4: the cross-model comparison at each k (only with two or more models).


rule compare_models:
    input:
        unpack(compare_inputs),
    output:
        **{
            name: report(
                f"{C}/figures/{name}.png",
                caption="../report/compare_figure.rst",
                category="Comparison",
                subcategory="k={k}",
                labels={"figure": name.replace("_", " ")},
            )
            for name in COMPARE_FIGURES
        },
        table=f"{C}/models.parquet",
        csv=report(
            f"{C}/models.csv",
            caption="../report/compare_table.rst",
            category="Comparison",
            subcategory="k={k}",
            labels={"table": "per model and layer"},
        ),
        summary=report(
            f"{C}/summary.csv",
            caption="../report/compare_summary.rst",
            category="Comparison",
            subcategory="k={k}",
            labels={"table": "per model"},
        ),
        report=report(
            f"{C}/report.md",
            caption="../report/compare_report.rst",
            category="Comparison",
            subcategory="k={k}",
            labels={"file": "report.md"},
        ),
    log:
        "logs/compare/k{k}/compare_models.log",
    benchmark:
        f"{C}/benchmarks/compare_models.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1500,
        runtime=5,
    script:
        "../scripts/compare_models.py"
