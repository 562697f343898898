# One encoder per dataset x attention kind x seed; the attention kind is the only difference.


rule train:
    input:
        tokens=rules.tokenize.output.tokens,
    output:
        model="results/{dataset}/train/{attention}_seed{seed}/model.pt",
        history="results/{dataset}/train/{attention}_seed{seed}/history.csv",
    benchmark:
        "results/benchmarks/train/{dataset}/{attention}_seed{seed}.tsv"
    log:
        "results/logs/train/{dataset}/{attention}_seed{seed}.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    threads: 1
    resources:
        gpu=gpus_per_job("train"),
    params:
        model=section_json("model"),
        train=section_json("train"),
        device=lookup(within=config, dpath="device"),
        # checkpoint.pt lives here while training; a rerun resumes from it
        out_dir=subpath(output.model, parent=True),
    message:
        "train {wildcards.dataset}: {wildcards.attention} attention, seed {wildcards.seed}"
    shell:
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"
        f" {train_cli()}"  # python, or torchrun with one process per GPU (common.smk)
        " train --dataset {wildcards.dataset:q} --tokens {input.tokens:q}"
        " --attention {wildcards.attention} --seed {wildcards.seed}"
        " --model-json {params.model:q} --train-json {params.train:q} --device {params.device}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"
