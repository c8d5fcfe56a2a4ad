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
