# Stage 1: everything that reads the checkpoint. Independent of k and of the heads.


rule download_model:
    output:
        "resources/hub/{model}.json",
    log:
        "logs/{model}/download_model.log",
    benchmark:
        f"{R}/benchmarks/download_model.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=120,
    params:
        # org/name, or org/name@revision for a checkpoint of a series (one param, so that a
        # single model's params, and so its jobs, stay as they were).
        repo_id=lambda w: "@".join(
            filter(None, (model_plan(w).hub_id, model_plan(w).revision))
        ),
    script:
        "../scripts/download_model.py"


rule model_info:
    input:
        hub_download,
    output:
        f"{R}/model.json",
    log:
        "logs/{model}/model_info.log",
    benchmark:
        f"{R}/benchmarks/model_info.tsv"
    # Reads the checkpoint's header only (under a second): on a cluster it runs on the submit
    # host instead of taking a SLURM job of its own.
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        source=lambda w: model_plan(w).source,
        path=lambda w: model_plan(w).path,
        fold_norms=PLAN.fold_norms,
    script:
        "../scripts/model_info.py"


rule extract_layers:
    input:
        hub_download,
    output:
        **{
            name: f"{R}/bases/layers{{first}}-{{last}}/{name}.npy"
            for name in BASES_FILES
        },
        weight_ranks=f"{R}/bases/layers{{first}}-{{last}}/weight_ranks.parquet",
    log:
        "logs/{model}/extract_layers{first}-{last}.log",
    benchmark:
        f"{R}/benchmarks/extract_layers{{first}}-{{last}}.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=extraction_mem_mb,
        runtime=extraction_runtime,
        gpu=uses_gpu,
    params:
        path=lambda w: model_plan(w).path,
        device=PLAN.device,
        fold_norms=PLAN.fold_norms,
        compute_ranks=lambda w: model_plan(w).user_ranks is None,
    script:
        "../scripts/extract_layers.py"


rule effective_ranks:
    input:
        model=f"{R}/model.json",
        weight_ranks=chunk_files("weight_ranks.parquet"),
        singular_values=chunk_files("singular_values.npy"),
        user_ranks=lambda w: model_plan(w).user_ranks or [],
    output:
        csv=report(
            f"{R}/effective_ranks.csv",
            caption="../report/effective_ranks_table.rst",
            category="{model}",
            subcategory="Effective ranks",
            labels={"table": "effective ranks"},
        ),
        parquet=f"{R}/effective_ranks.parquet",
        kernel=f"{R}/kernel_effective_ranks.parquet",
    log:
        "logs/{model}/effective_ranks.log",
    benchmark:
        f"{R}/benchmarks/effective_ranks.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/effective_ranks.py"
