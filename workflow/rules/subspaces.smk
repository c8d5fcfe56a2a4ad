# Stage 2: k- and head-dependent measurements from the stored bases (no checkpoint reads).


rule similarity_matrix:
    input:
        vectors=chunk_files("vectors.npy"),
    output:
        f"{K}/similarity_head{{head}}.npy",
    log:
        "logs/{model}/k{k}/similarity_head{head}.log",
    benchmark:
        f"{K}/benchmarks/similarity_head{{head}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/similarity_matrix.py"


rule similarity_mean:
    input:
        similarity_files(lambda p: p.heads),
    output:
        f"{K}/similarity_mean.npy",
    log:
        "logs/{model}/k{k}/similarity_mean.log",
    benchmark:
        f"{K}/benchmarks/similarity_mean.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/similarity_mean.py"


rule bottleneck_similarity:
    input:
        similarity=similarity_files(lambda p: p.similarity_heads),
        weight_ranks=f"{R}/effective_ranks.parquet",
    output:
        f"{K}/bottleneck.parquet",
    log:
        "logs/{model}/k{k}/bottleneck.log",
    benchmark:
        f"{K}/benchmarks/bottleneck.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        bottleneck=lambda w: model_plan(w).bottleneck,
    script:
        "../scripts/bottleneck_similarity.py"


rule ffn_alignment:
    input:
        model=f"{R}/model.json",
        energy=chunk_files("ffn_input_energy.npy"),
        norm2=chunk_files("ffn_input_norm2.npy"),
    output:
        f"{K}/alignment.parquet",
    log:
        "logs/{model}/k{k}/alignment.log",
    benchmark:
        f"{K}/benchmarks/alignment.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/ffn_alignment.py"


rule layer_table:
    input:
        weight_ranks=f"{R}/effective_ranks.parquet",
        similarity=similarity_files(lambda p: [p.primary_head]),
        bottleneck=f"{K}/bottleneck.parquet",
        alignment=f"{K}/alignment.parquet",
    output:
        parquet=f"{K}/layers.parquet",
        csv=f"{K}/layers.csv",
    log:
        "logs/{model}/k{k}/layers.log",
    benchmark:
        f"{K}/benchmarks/layers.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        head=lambda w: model_plan(w).primary_head,
    script:
        "../scripts/layer_table.py"
