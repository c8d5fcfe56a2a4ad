# Stage 2: k- and head-dependent measurements from the stored bases (no checkpoint reads).


rule rowspace_overlap:
    input:
        model=f"{R}/model.json",
        vectors=chunk_files("vectors.npy"),
    output:
        f"{R}/rowspace_overlap.npy",
    log:
        "logs/{model}/rowspace_overlap.log",
    benchmark:
        f"{R}/benchmarks/rowspace_overlap.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=rowspace_overlap_mem_mb,
        runtime=10,
    script:
        "../scripts/rowspace_overlap.py"


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
        same_index=f"{K}/same_index.npy",
        weight_ranks=f"{R}/effective_ranks.parquet",
        model=f"{R}/model.json",
        overlaps=f"{R}/rowspace_overlap.npy",
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
        ffn_singular_values=chunk_files("ffn_input_singular_values.npy"),
        rowspace_eigenvalues=chunk_files("ffn_input_rowspace_eigenvalues.npy"),
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


rule expert_alignment:
    input:
        model=f"{R}/model.json",
        energy=chunk_files("expert_energy.npy"),
        norm2=chunk_files("expert_norm2.npy"),
        singular_values=chunk_files("expert_singular_values.npy"),
        rowspace_eigenvalues=chunk_files("expert_rowspace_eigenvalues.npy"),
    output:
        f"{K}/alignment_experts.parquet",
    log:
        "logs/{model}/k{k}/alignment_experts.log",
    benchmark:
        f"{K}/benchmarks/alignment_experts.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=expert_alignment_mem_mb,
        runtime=5,
    script:
        "../scripts/expert_alignment.py"


rule layer_table:
    input:
        weight_ranks=f"{R}/effective_ranks.parquet",
        similarity=similarity_files(lambda p: [p.primary_head]),
        bottleneck=f"{K}/bottleneck.parquet",
        alignment=f"{K}/alignment.parquet",
        best_match=f"{K}/best_match.npy",
        singular_values=chunk_files("singular_values.npy"),
        model=f"{R}/model.json",
        overlaps=f"{R}/rowspace_overlap.npy",
    output:
        parquet=f"{K}/layers.parquet",
        csv=report(
            f"{K}/layers.csv",
            caption="../report/layers.rst",
            category="{model}",
            subcategory="Cross-reference",
            labels={"k": "{k}", "table": "per layer"},
        ),
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


rule match_heads:
    input:
        model=f"{R}/model.json",
        vectors=chunk_files("vectors.npy"),
        overlaps=f"{R}/rowspace_overlap.npy",
    output:
        best_match=f"{K}/best_match.npy",
        pairs=f"{K}/best_match_pairs.npy",
        same_index=f"{K}/same_index.npy",
        heads=f"{K}/heads.parquet",
        within_layer=f"{K}/within_layer.parquet",
        table=f"{K}/layer_pairs.parquet",
        csv=report(
            f"{K}/layer_pairs.csv",
            caption="../report/layer_pairs.rst",
            category="{model}",
            subcategory="Head matching",
            labels={"k": "{k}", "table": "layer pairs"},
        ),
    log:
        "logs/{model}/k{k}/match_heads.log",
    benchmark:
        f"{K}/benchmarks/match_heads.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=match_heads_mem_mb,
        runtime=10,
    script:
        "../scripts/match_heads.py"


rule k_sweep:
    input:
        model=f"{R}/model.json",
        vectors=chunk_files("vectors.npy"),
        singular_values=chunk_files("singular_values.npy"),
        energy=chunk_files("ffn_input_energy.npy"),
        norm2=chunk_files("ffn_input_norm2.npy"),
        rowspace_eigenvalues=chunk_files("ffn_input_rowspace_eigenvalues.npy"),
        overlaps=f"{R}/rowspace_overlap.npy",
    output:
        parquet=f"{R}/ksweep.parquet",
        csv=report(
            f"{R}/ksweep.csv",
            caption="../report/ksweep_table.rst",
            category="{model}",
            subcategory="k-sensitivity",
            labels={"k": "all", "table": "k-sweep"},
        ),
        figure=report(
            f"{R}/figures/ksweep.png",
            caption="../report/ksweep.rst",
            category="{model}",
            subcategory="k-sensitivity",
            labels={"k": "all", "figure": "k-sweep"},
        ),
    log:
        "logs/{model}/k_sweep.log",
    benchmark:
        f"{R}/benchmarks/k_sweep.tsv"
    # Only the report reads it: yield the cores to the jobs on the way to the figures.
    priority: -1
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=k_sweep_mem_mb,
        runtime=10,
    params:
        heads=lambda w: model_plan(w).heads,
    script:
        "../scripts/k_sweep.py"
