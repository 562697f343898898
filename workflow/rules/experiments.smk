# The paper's experiments beside the representation comparison: stability stress test and
# learning-rate sweep (claim c), Jacobian of trained models (claim d), kernel TFLOPS (claim e),
# training-step speed (claim b).
# Each runs when its experiments.<name>.enabled is true (rule all: experiment_targets()).


# Softmax vs sigmoid from the same init, long sequences, no gradient clipping: who diverges.
# A job stopped by SIGTERM (a time limit) checkpoints its arms and fails; its rerun continues.
rule stress_test:
    output:
        log="results/tables/stress_test.csv",
        summary="results/tables/stress_test_summary.json",
        png=report(
            "results/figures/stress_test.png",
            caption="../report/stress_test.rst",
            category="Experiments",
            subcategory="Stability",
        ),
        pdf="results/figures/stress_test.pdf",
    params:
        stress=json.dumps(experiment("stress_test"), sort_keys=True),
        device=lookup(within=config, dpath="device"),
    benchmark:
        "results/benchmarks/stress_test/stress_test.tsv"
    log:
        "results/logs/experiments/stress_test.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    message:
        "stress test: softmax vs sigmoid without gradient clipping"
    threads: 1
    resources:
        gpu=gpus_per_job(),
    shell:
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"
        " python -m sigmoid_sc.cli stress-test --params-json {params.stress:q} --device {params.device}"
        " --checkpoint-dir results/experiments/stress_test/checkpoints"
        " --log-csv {output.log:q} --summary {output.summary:q}"
        " --png {output.png:q} --pdf {output.pdf:q} > {log:q} 2>&1"


# Claim c as a learning-rate sweep: one job per arm x learning rate x seed (a SLURM job each).
# A run stopped early (max_seconds, SIGTERM) is checkpointed beside its outputs and fails;
# rerunning the workflow continues it.
rule stability_run:
    output:
        summary=f"{SWEEP_DIR}/runs/{{arm}}/lr{{lr}}/seed{{seed}}/summary.json",
        log=f"{SWEEP_DIR}/runs/{{arm}}/lr{{lr}}/seed{{seed}}/log.csv.gz",
    wildcard_constraints:
        arm="|".join(re.escape(a) for a in SWEEP_ARMS),
        lr="|".join(re.escape(t) for t in SWEEP_LRS),
    params:
        sweep=sweep_run_json,
        lr=lambda wildcards: SWEEP_LRS[wildcards.lr],
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
        device=lookup(within=config, dpath="device"),
    benchmark:
        "results/benchmarks/stability_sweep/{arm}_lr{lr}_seed{seed}.tsv"
    log:
        "results/logs/experiments/stability_sweep/{arm}_lr{lr}_seed{seed}.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    message:
        "stability sweep: {wildcards.arm} at lr {wildcards.lr}, seed {wildcards.seed}"
    threads: 1
    resources:
        gpu=gpus_per_job(),
    shell:
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"
        " python -m sigmoid_sc.cli stability-sweep run --params-json {params.sweep:q}"
        " --arm {wildcards.arm} --lr {params.lr} --seed {wildcards.seed}"
        " --out-dir {params.out_dir:q} --device {params.device} > {log:q} 2>&1"


# The checkpoint and the sweep's summary exist only when the sweep is enabled: a checkpoint in
# the workflow makes Snakemake ignore --allowed-rules, which tools/gpu_collect.sh relies on to
# finish a DAG from embeddings without training again.
if SWEEP["enabled"]:

    # After the first seed's runs: each arm's boundary (its largest stable lr and the next one up),
    # where the other seeds run.
    checkpoint stability_boundary:
        input:
            sweep_first_seed_runs,
        output:
            f"{SWEEP_DIR}/boundary.json",
        params:
            sweep=sweep_json(),
        log:
            "results/logs/experiments/stability_sweep/boundary.log",
        conda:
            "../../envs/sigmoid-sc.yaml"
        message:
            "stability sweep: the learning rates around each arm's boundary"
        shell:
            "python -m sigmoid_sc.cli stability-sweep boundary --params-json {params.sweep:q}"
            " --out {output:q} {input:q} > {log:q} 2>&1"


    # The sweep's tables and figures: final loss vs learning rate, largest stable lr, logit growth.
    rule stability_sweep:
        input:
            sweep_all_runs,
        output:
            runs="results/tables/stability_runs.csv",
            boundary=report(
                "results/tables/stability_boundary.csv",
                caption="../report/stability_sweep.rst",
                category="Experiments",
                subcategory="Stability",
            ),
            md="results/tables/stability_boundary.md",
            lr_png=report(
                "results/figures/stability_lr.png",
                caption="../report/stability_sweep.rst",
                category="Experiments",
                subcategory="Stability",
            ),
            lr_pdf="results/figures/stability_lr.pdf",
            logits_png=report(
                "results/figures/stability_logits.png",
                caption="../report/stability_logits.rst",
                category="Experiments",
                subcategory="Stability",
            ),
            logits_pdf="results/figures/stability_logits.pdf",
        params:
            sweep=sweep_json(),
        log:
            "results/logs/experiments/stability_sweep/summarize.log",
        conda:
            "../../envs/sigmoid-sc.yaml"
        message:
            "stability sweep: tables and figures"
        shell:
            "python -m sigmoid_sc.cli stability-sweep summarize --params-json {params.sweep:q}"
            " --runs-csv {output.runs:q} --boundary-csv {output.boundary:q}"
            " --boundary-md {output.md:q} --lr-png {output.lr_png:q} --lr-pdf {output.lr_pdf:q}"
            " --logits-png {output.logits_png:q} --logits-pdf {output.logits_pdf:q}"
            " {input:q} > {log:q} 2>&1"


# dp/ds of attention in trained models: sigmoid's diagonal, bounded Jacobian vs softmax's dense one.
rule jacobian:
    input:
        tokens=f"results/{jacobian_run()[0]}/tokens.npz",
        softmax=jacobian_model("softmax"),
        sigmoid=jacobian_model("sigmoid"),
    output:
        csv=report(
            "results/tables/jacobian.csv",
            caption="../report/jacobian.rst",
            category="Experiments",
            subcategory="Jacobian",
        ),
        png=report(
            "results/figures/jacobian.png",
            caption="../report/jacobian.rst",
            category="Experiments",
            subcategory="Jacobian",
        ),
        pdf="results/figures/jacobian.pdf",
    params:
        dataset=jacobian_run()[0],
        jacobian=json.dumps(
            {
                k: v
                for k, v in experiment("jacobian").items()
                if k in ("split", "n_cells", "check_rows")
            },
            sort_keys=True,
        ),
        device=lookup(within=config, dpath="device"),
    benchmark:
        "results/benchmarks/jacobian/jacobian.tsv"
    log:
        "results/logs/experiments/jacobian.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    message:
        "jacobian: attention dp/ds in the trained models of {params.dataset}"
    threads: 1
    resources:
        gpu=gpus_per_job(),
    shell:
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"
        " python -m sigmoid_sc.cli jacobian --dataset {params.dataset:q} --tokens {input.tokens:q}"
        " --softmax-model {input.softmax:q} --sigmoid-model {input.sigmoid:q}"
        " --params-json {params.jacobian:q} --device {params.device}"
        " --csv {output.csv:q} --png {output.png:q} --pdf {output.pdf:q} > {log:q} 2>&1"


# Attention TFLOPS against sequence length (sigmoid_sc.kernel_benchmark); without a GPU the
# section's fallback_csv is rendered, or a note says it was skipped.
rule kernel_benchmark:
    output:
        png=report(
            "results/figures/kernel_tflops.png",
            caption="../report/kernel_tflops.rst",
            category="Experiments",
            subcategory="Kernel",
        ),
        pdf="results/figures/kernel_tflops.pdf",
        csv=report(
            "results/tables/kernel.csv",
            caption="../report/kernel_tflops.rst",
            category="Experiments",
            subcategory="Kernel",
        ),
        md="results/tables/kernel.md",
    params:
        kernel=json.dumps(experiment("kernel_benchmark"), sort_keys=True),
        raw_csv="results/experiments/kernel_benchmark/kernel_raw.csv",
    benchmark:
        "results/benchmarks/kernel_benchmark/kernel_benchmark.tsv"
    log:
        "results/logs/experiments/kernel_benchmark.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    message:
        "kernel benchmark: TFLOPS of sigmoid and softmax attention kernels"
    threads: 1
    resources:
        gpu=gpus_per_job(),
    shell:
        "python -m sigmoid_sc.cli kernel-benchmark --params-json {params.kernel:q}"
        " --raw-csv {params.raw_csv:q}"
        " --png {output.png:q} --pdf {output.pdf:q}"
        " --table-csv {output.csv:q} --table-md {output.md:q} > {log:q} 2>&1"


# Training-step time and tokens/s per attention implementation (sigmoid_sc.training_speed).
rule training_speed:
    output:
        csv=report(
            "results/tables/training_speed.csv",
            caption="../report/training_speed.rst",
            category="Experiments",
            subcategory="Training speed",
        ),
        md="results/tables/training_speed.md",
    params:
        speed=json.dumps(experiment("training_speed"), sort_keys=True),
    benchmark:
        "results/benchmarks/training_speed/training_speed.tsv"
    log:
        "results/logs/experiments/training_speed.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    message:
        "training speed: one encoder step per attention implementation"
    threads: 1
    resources:
        gpu=gpus_per_job(),
    shell:
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"
        " python -m sigmoid_sc.cli training-speed --params-json {params.speed:q}"
        " --out-csv {output.csv:q} --out-md {output.md:q} > {log:q} 2>&1"
