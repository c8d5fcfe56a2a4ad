# Stage 2, model level: circuits between heads from the stored OV and QK factors (no checkpoint
# reads, independent of k and of the heads).


rule composition:
    input:
        model=f"{R}/model.json",
        query=chunk_files("query_vectors.npy"),
        key=chunk_files("vectors.npy"),
        qk_sigma=chunk_files("singular_values.npy"),
        write=chunk_files("ov_write_vectors.npy"),
        read=chunk_files("ov_read_vectors.npy"),
        ov_sigma=chunk_files("ov_singular_values.npy"),
    output:
        **{
            f"composition_{t}": f"{R}/circuits/composition_{t}.npy"
            for t in ("q", "k", "v")
        },
        null=f"{R}/circuits/composition_null.parquet",
        top=f"{R}/circuits/composition_top.parquet",
        layers=f"{R}/circuits/composition_layers.parquet",
    log:
        "logs/{model}/composition.log",
    benchmark:
        f"{R}/benchmarks/composition.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=composition_mem_mb,
        runtime=composition_runtime,
    script:
        "../scripts/composition.py"


# Stage 2 at k: read/write overlap of every head's write subspace with every later head's read
# subspaces (stored factors only; a new k adds this job, no extraction or composition job).
rule read_write:
    input:
        model=f"{R}/model.json",
        query=chunk_files("query_vectors.npy"),
        key=chunk_files("vectors.npy"),
        read=chunk_files("ov_read_vectors.npy"),
        write=chunk_files("ov_write_vectors.npy"),
    output:
        f"{K}/read_write.parquet",
    log:
        "logs/{model}/k{k}/read_write.log",
    benchmark:
        f"{K}/benchmarks/read_write.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=read_write_mem_mb,
        runtime=10,
    script:
        "../scripts/read_write.py"


rule circuit_figures:
    input:
        **{f"composition_{t}": f"{R}/circuits/composition_{t}.npy" for t in "qkv"},
        model=f"{R}/model.json",
        layers=f"{R}/circuits/composition_layers.parquet",
        null=f"{R}/circuits/composition_null.parquet",
        read_write=f"{K}/read_write.parquet",
    output:
        **{
            name: report(
                f"{K}/figures/{name}.png",
                caption=f"../report/{name}.rst",
                category="{model}",
                subcategory="Circuits",
                labels={"k": "{k}", "figure": name.replace("_", " ")},
            )
            for name in CIRCUIT_FIGURES
        },
    log:
        "logs/{model}/k{k}/circuit_figures.log",
    benchmark:
        f"{K}/benchmarks/circuit_figures.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1500,
        runtime=5,
    script:
        "../scripts/circuit_figures.py"
