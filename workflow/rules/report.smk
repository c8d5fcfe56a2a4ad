# Stage 3: figures and the markdown report of each (model, k).


rule report_figures:
    input:
        unpack(figure_inputs),
    output:
        **{
            name: report(
                f"{K}/figures/{name}.png",
                caption=f"../report/{name}.rst",
                category="{model}",
                subcategory=section,
                labels={"k": "{k}", "figure": name.replace("_", " ")},
            )
            for name, section in FIGURES.items()
        },
    log:
        "logs/{model}/k{k}/figures.log",
    benchmark:
        f"{K}/benchmarks/figures.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1500,
        runtime=5,
    params:
        heads=lambda w: model_plan(w).heads,
        primary_head=lambda w: model_plan(w).primary_head,
    script:
        "../scripts/report_figures.py"


rule report_markdown:
    input:
        unpack(analysis_inputs),
        figures=expand(f"{K}/figures/{{name}}.png", name=FIGURES, allow_missing=True),
        ksweep_figure=f"{R}/figures/ksweep.png",
        circuit_figures=circuit_figure_files,
    output:
        markdown=report(
            f"{K}/report.md",
            caption="../report/report.rst",
            category="{model}",
            subcategory="Report",
            labels={"k": "{k}", "file": "report.md"},
        ),
        html=report(
            f"{K}/report.html",
            caption="../report/report_html.rst",
            category="{model}",
            subcategory="Report",
            labels={"k": "{k}", "file": "report (HTML)"},
        ),
        interactive=report(
            f"{K}/figures/similarity_interactive.html",
            caption="../report/similarity_interactive.rst",
            category="{model}",
            subcategory="Experiment 1: subspace overlap",
            labels={"k": "{k}", "figure": "similarity (interactive)"},
        ),
    log:
        "logs/{model}/k{k}/report.log",
    benchmark:
        f"{K}/benchmarks/report.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1500,
        runtime=5,
    params:
        heads=lambda w: model_plan(w).heads,
        primary_head=lambda w: model_plan(w).primary_head,
        # Vega, Vega-Lite and vega-embed, shipped with the workflow (inlined in the pages)
        vega=f"{workflow.basedir}/workflow/report/vega-embed-bundle.js",
    script:
        "../scripts/report_markdown.py"
