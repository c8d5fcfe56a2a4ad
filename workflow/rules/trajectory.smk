# Stage 5: the trajectory of each checkpoint series at each k (only with series in the config).


rule trajectory:
    input:
        unpack(trajectory_inputs),
    output:
        **{
            name: report(
                f"{T}/figures/{name}.png",
                caption="../report/trajectory_figure.rst",
                category="{series} trajectory",
                subcategory="k={k}",
                labels={"figure": name.replace("_", " ")},
            )
            for name in TRAJECTORY_FIGURES
        },
        trajectory_table=f"{T}/trajectory.parquet",
        drift_table=f"{T}/drift.parquet",
        report=report(
            f"{T}/report.md",
            caption="../report/trajectory_report.rst",
            category="{series} trajectory",
            subcategory="k={k}",
            labels={"file": "report.md"},
        ),
    log:
        "logs/{series}/trajectory/k{k}/trajectory.log",
    benchmark:
        f"{T}/benchmarks/trajectory.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=trajectory_mem_mb,
        runtime=10,
    params:
        steps=lambda w: [PLAN.models[m].step for m in PLAN.series[w.series]],
        n_chunks=lambda w: [len(PLAN.models[m].chunks) for m in PLAN.series[w.series]],
    script:
        "../scripts/trajectory.py"
