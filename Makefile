# rnnserve: `make serve` to run the server on the bundled models, `make test` to test everything.
SHELL := /bin/bash
, := ,
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The locks (requirements/*.txt, compiled by `make lock` from pyproject's requirements with uv):
# every install takes its versions from one, as constraints, so a clone installs the same
# versions today and a year from now. torch is pinned without a hash: a local CPU wheel
# (2.13.0+cpu, where pip's find-links offer one) and the registry's build both satisfy it.
LOCKS := requirements
# The lock tool, in a virtualenv of its own (it is not part of any locked environment).
UV_VERSION := 0.13.10
UV := build/uv/bin/uv
# pip installs through a lock: its versions as constraints, and its setuptools for the isolated
# builds of the editable installs.
PIP_LOCKED = $(BIN)/pip install --quiet -c $(LOCKS)/$(1) --build-constraint $(LOCKS)/$(1)
# Debian packages the tests need: libb64 for Triton's perf_analyzer, Redis for the state store,
# Java for TorchServe (the benchmark's peer), Prometheus and promtool for deploy/prometheus (the
# tests run their own instance on a free port, whatever the package starts), the CNCF
# distribution registry for `make image-push` (the tests run their own on a free port; the
# package's service is not started), Chromium for examples/web (tests/web opens the page in it,
# headless), and what `make image` needs.
SYSTEM_PACKAGES ?= libb64-0d redis-server openjdk-17-jre-headless prometheus docker-registry \
	chromium $(IMAGE_PACKAGES)
# podman (with runc) builds and runs the images without a daemon; debootstrap makes their base,
# as no image registry is reachable (deploy/base-image.sh). As root, overlay storage needs no
# fuse-overlayfs.
IMAGE_PACKAGES := podman runc debootstrap
# The version, defined once: pyproject's [project].version, read from SOURCE, the tree that is
# built (`make release` builds an export of the commit). `make version VERSION=X.Y.Z` sets it,
# and each copy the manifests carry (deploy/set-version.py).
SOURCE ?= .
project_version = $(shell $(PYTHON) -c 'import sys, tomllib; \
	print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' $(1)/pyproject.toml)
PROJECT_VERSION = $(call project_version,$(SOURCE))
# The wheels the images install (nothing is built inside them): rnnserve's, built from its sdist
# (as pip would from PyPI), with the build backend test.txt pins, and the native transport's
# (where cargo is; maturin builds it for the host, whose Debian and glibc the base image has). Reproducible: setuptools dates a wheel's members SOURCE_DATE_EPOCH, and
# deploy/normalize-sdist.py does the same for the sdist.
WHEELS = $(SOURCE)/build/wheels
SDISTS = $(SOURCE)/build/sdist
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct)
# The commit an image is built from, in its revision label (-dirty: with uncommitted changes).
REVISION ?= $(shell git rev-parse HEAD)$(shell git diff --quiet HEAD -- || echo -dirty)
# The CPU serving image `make image` builds (the GPU one: deploy/Containerfile.gpu), on BASE_IMAGE;
# elsewhere BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm skips debootstrap. Tagged
# IMAGE and IMAGE_REPOSITORY:<version>, the tag the Helm chart deploys (its appVersion).
IMAGE_REPOSITORY ?= localhost/rnnserve
IMAGE ?= $(IMAGE_REPOSITORY):cpu
BASE_IMAGE ?= localhost/rnnserve-base:bookworm
# The CA bundle pip trusts inside the build, where TLS to PyPI is intercepted (none: pip's own).
CA_BUNDLE ?= /etc/ssl/certs/ca-certificates.crt
# podman's settings for this machine, from deploy/containers/ (/etc is left alone).
PODMAN_ENV := CONTAINERS_CONF=$(CURDIR)/deploy/containers/containers.conf \
	CONTAINERS_STORAGE_CONF=$(CURDIR)/deploy/containers/storage.conf
# `make release` exports the commit into RELEASE_SOURCE and builds it into DIST.
RELEASE_SOURCE := build/release
DIST = dist/$(PROJECT_VERSION)
RELEASE_IMAGE = $(DIST)/rnnserve-$(PROJECT_VERSION)-image-cpu.tar
# `make image-push REGISTRY=registry.example.com/team`; PUSH_OPTIONS=--tls-verify=false for a
# registry that speaks plain HTTP.
REGISTRY ?=
PUSH_OPTIONS ?=
PERF_ANALYZER := build/perf_analyzer/bin/perf_analyzer
# helm v4 and kubectl (kustomize), from a PyPI wheel, for the chart tests (tests/deploy).
HELM := build/helm/bin/helm
# The real Triton 2.51 (CPU), the conformance suite's peer (tests/conformance), set up from the
# project's shared peers folder (../shared beside the repository, in CI as here).
SHARED ?= ../shared
TRITON := build/triton/run

.DEFAULT_GOAL := help
.PHONY: help serve bench test install install-test system-deps perf-analyzer triton torchserve bench-idle \
	image image-gpu base-image wheels release release-artifacts image-push version proto lint \
	format train bench-durability bench-gpu clean helm manifests lock lock-upgrade test-minimums \
	native-check

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-17s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(LOCKS)/serve.txt pip

$(VENV)/.installed: pyproject.toml bench/pyproject.toml $(LOCKS)/serve.txt | $(BIN)/python
	$(call PIP_LOCKED,serve.txt) -e . -e ./bench setuptools maturin
	@touch $@

$(VENV)/.installed-lint: pyproject.toml bench/pyproject.toml $(LOCKS)/test.txt | $(BIN)/python
	$(call PIP_LOCKED,test.txt) -e '.[test]' -e ./bench pip setuptools maturin
	@touch $@ $(VENV)/.installed

# LOCK: the lock the test environment installs through (test-minimums sets minimums.txt).
LOCK ?= test.txt
$(VENV)/.installed-test: pyproject.toml bench/pyproject.toml $(LOCKS)/$(LOCK) | $(BIN)/python
	$(call PIP_LOCKED,$(LOCK)) -e '.[train,test]' -e './bench[peers]' torch pip setuptools maturin
	@touch $@ $(VENV)/.installed $(VENV)/.installed-lint

# The native transport (native/, the rnnserve-native distribution): built and installed where
# cargo is present, and `rnnserve serve` serves through it; `pip install rnnserve` alone never
# needs Rust (the server then serves through grpc.aio).
CARGO := $(shell command -v cargo 2>/dev/null)
NATIVE_SOURCES := $(wildcard native/Cargo.* native/pyproject.toml native/*.pyi native/src/*.rs)
NATIVE := $(if $(CARGO),$(VENV)/.installed-native)
# Its wheel, built once (maturin, through uv, with the backend the locks pin; the crates build in
# native/target) for the virtualenv and the images alike; it needs no virtualenv, so `make test`
# builds it while pip installs the rest.
NATIVE_WHEEL := build/native/.built

$(NATIVE_WHEEL): $(NATIVE_SOURCES) $(LOCKS)/test.txt | $(UV)
	rm -rf build/native
	CARGO_TARGET_DIR=$(CURDIR)/native/target SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) \
		$(UV) build --quiet --wheel --build-constraint $(LOCKS)/test.txt --out-dir build/native native
	@touch $@

$(VENV)/.installed-native: $(NATIVE_WHEEL) | $(VENV)/.installed
	$(BIN)/pip install --quiet --no-deps --force-reinstall build/native/*.whl
	@touch $@

install: $(VENV)/.installed $(NATIVE) ## virtualenv with rnnserve, its native transport (where cargo is) and its benchmark (no torch)

native-check: ## the native crate: rustfmt, clippy (warnings are errors) and its own tests
	cd native && cargo fmt --check
	cd native && cargo clippy --locked --all-targets -- -D warnings
	cd native && cargo test --locked

$(UV):
	$(PYTHON) -m venv build/uv
	build/uv/bin/pip install --quiet uv==$(UV_VERSION)

lock: $(UV) ## recompile requirements/*.txt from pyproject's requirements (keeps the pins that still fit)
	$(PYTHON) $(LOCKS)/lock.py $(UV)

lock-upgrade: $(UV) ## move every pin of requirements/*.txt to its newest release, then run the suite
	$(PYTHON) $(LOCKS)/lock.py $(UV) --upgrade
	$(MAKE) --no-print-directory test

# The suite with rnnserve's requirements (and its `train` extra's) at their lower bounds, in a
# virtualenv of its own: the bounds pyproject claims are the ones tested.
MINIMUMS_VENV := .venv-minimums
test-minimums: system-deps $(PERF_ANALYZER) $(TRITON) $(HELM) ## the suite at the lower bounds pyproject claims (requirements/minimums.txt)
	$(PYTHON) -m venv $(MINIMUMS_VENV)
	$(MINIMUMS_VENV)/bin/python -m pip install --quiet -c $(LOCKS)/minimums.txt pip
	$(MAKE) --no-print-directory VENV=$(MINIMUMS_VENV) LOCK=minimums.txt $(MINIMUMS_VENV)/.installed-test
	RNNSERVE_TEST_LOCK=$(LOCKS)/minimums.txt $(MINIMUMS_VENV)/bin/python -m pytest $(PYTEST_ARGS)

install-test: $(VENV)/.installed-test ## virtualenv with training, export and test dependencies

system-deps: ## Debian packages the tests need (run as root, or with sudo)
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	fi

serve: install ## serve the bundled models (gRPC :8001, metrics :8002)
	$(BIN)/rnnserve serve

bench: install ## run the benchmark, Triton beside rnnserve on both transports (about 15 minutes; BENCH_ARGS=--quick for about 2)
	$(BIN)/rnnserve bench $(BENCH_ARGS)

bench-gpu: install ## the benchmark on a GPU machine, into docs/bench/gpu-<GPU> (see bench/run-gpu.sh)
	$(BIN)/pip install -e '.[gpu]' -e ./bench
	# onnxruntime (a dependency) and onnxruntime-gpu share one package folder: the GPU build wins.
	$(BIN)/pip install --force-reinstall --no-deps "$$($(BIN)/pip freeze | grep -i '^onnxruntime-gpu==')"
	PYTHON=$(BIN)/python bench/run-gpu.sh $(BENCH_ARGS)

bench-idle: install ## memory per idle live sequence: 100,000 sequences in one server
	$(BIN)/python -m rnnserve_bench.idle --sequences 100000

$(PERF_ANALYZER): tests/tools/install-perf-analyzer.sh | system-deps
	bash tests/tools/install-perf-analyzer.sh build/perf_analyzer

torchserve: system-deps install-test ## TorchServe 0.12 and Java, the peer `make bench` measures against

perf-analyzer: $(PERF_ANALYZER) ## Triton's C++ load generator, into build/perf_analyzer

$(HELM): tests/tools/install-helm.sh
	bash tests/tools/install-helm.sh build/helm

helm: $(HELM) ## helm v4 and kubectl (with kustomize), into build/helm

manifests: $(HELM) ## render the kustomize base from the Helm chart (deploy/kustomize/base)
	$(HELM) template rnnserve deploy/helm/rnnserve -f deploy/kustomize/values.yaml \
		> deploy/kustomize/base/rnnserve.yaml

# `run` is written last, so its presence means the setup finished. The prefix is absolute: the
# launcher records it. The backend library is copied read-only: a rerun could not overwrite it.
$(TRITON):
	@[ -x "$(SHARED)/peers/triton/setup" ] || { echo "make triton: $(SHARED)/peers/triton/setup \
	is missing; it comes with the project's shared folder (set SHARED=...)" >&2; exit 1; }
	rm -f build/triton/backends/onnxruntime/libtriton_onnxruntime.so
	$(SHARED)/peers/triton/setup $(CURDIR)/build/triton

triton: $(TRITON) ## the real Triton 2.51 (CPU), the conformance suite's peer, into build/triton

# The slow prerequisites that do not depend on each other are made side by side: pip's downloads,
# the native crate's compile, perf_analyzer, Triton and helm (about 2 minutes saved cold).
test: system-deps ## install everything, lint, run the test suite
	@$(MAKE) --no-print-directory -j4 install-test $(if $(CARGO),$(NATIVE_WHEEL)) $(PERF_ANALYZER) \
		$(TRITON) $(HELM)
	@$(MAKE) --no-print-directory $(NATIVE) lint $(if $(CARGO),native-check)
	$(BIN)/python -m pytest

# podman's build of SOURCE with deploy/$(1), tagged with each of $(2).
podman_build = $(PODMAN_ENV) podman build --format docker --layers -f $(SOURCE)/deploy/$(1) \
	--build-arg BASE=$(BASE_IMAGE) --build-arg VERSION=$(PROJECT_VERSION) \
	--label org.opencontainers.image.revision=$(REVISION) $(addprefix -t ,$(sort $(2))) \
	$(if $(wildcard $(CA_BUNDLE)),--secret id=pip-cert$(,)src=$(CA_BUNDLE)) $(SOURCE)

wheels: $(UV) ## rnnserve's sdist and wheel, reproducibly, into build/sdist and build/wheels (what the images install)
	rm -rf $(WHEELS) $(SDISTS)
	SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) $(UV) build --quiet --sdist \
		--build-constraint $(LOCKS)/test.txt --out-dir $(SDISTS) $(SOURCE)
	$(PYTHON) deploy/normalize-sdist.py $(SOURCE_DATE_EPOCH) $(SDISTS)/*.tar.gz
	SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) $(UV) build --quiet --wheel \
		--build-constraint $(LOCKS)/test.txt --out-dir $(WHEELS) $(SDISTS)/*.tar.gz
	@# The native transport's wheel, where cargo is: the image then serves through it. The
	@# checkout's is built once (NATIVE_WHEEL); a release's export builds its own, its crates
	@# from the checkout's native/target.
	$(if $(and $(CARGO),$(wildcard $(SOURCE)/native/Cargo.toml)),$(if $(filter .,$(SOURCE)),\
		$(MAKE) --no-print-directory $(NATIVE_WHEEL) && cp build/native/*.whl $(WHEELS)/,\
		CARGO_TARGET_DIR=$(CURDIR)/native/target SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) \
		$(UV) build --quiet --wheel --build-constraint $(LOCKS)/test.txt --out-dir $(WHEELS) \
		$(SOURCE)/native))

base-image: ## the images' base, BASE_IMAGE, when it is local (debootstrap; see deploy/base-image.sh)
	@$(MAKE) --no-print-directory system-deps SYSTEM_PACKAGES="$(IMAGE_PACKAGES)"
	@# A registry's image is pulled by the build; only the local default is made here.
	$(if $(filter localhost/%,$(BASE_IMAGE)),$(PODMAN_ENV) deploy/base-image.sh $(BASE_IMAGE))

image: wheels base-image ## the CPU serving image with podman, as IMAGE and IMAGE_REPOSITORY:<version>
	$(call podman_build,Containerfile,$(IMAGE) $(IMAGE_REPOSITORY):$(PROJECT_VERSION))

image-gpu: wheels base-image ## the GPU serving image, as IMAGE_REPOSITORY:<version>-gpu (gigabytes of CUDA wheels)
	$(call podman_build,Containerfile.gpu,$(IMAGE_REPOSITORY):$(PROJECT_VERSION)-gpu)

release: $(UV) $(HELM) ## the commit's wheel, sdist, CPU image and Helm chart into dist/<version>, with SHA256SUMS
	@git diff --quiet HEAD -- || echo "make release: uncommitted changes are left out; \
	it releases the commit, $$(git rev-parse --short HEAD)" >&2
	rm -rf $(RELEASE_SOURCE) && mkdir -p $(RELEASE_SOURCE)
	@# Modes as a checkout has them (git archive writes 0664 by default): the layer cache
	@# of `make image` serves the release too.
	git -c tar.umask=0022 archive HEAD | tar -x -C $(RELEASE_SOURCE)
	@$(MAKE) --no-print-directory release-artifacts SOURCE=$(RELEASE_SOURCE) \
		REVISION=$$(git rev-parse HEAD) SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH)

# `make release`'s second half, in the export (SOURCE): the image is tagged with the version only.
release-artifacts: IMAGE = $(IMAGE_REPOSITORY):$(PROJECT_VERSION)
release-artifacts: image
	rm -rf $(DIST) && mkdir -p $(DIST)
	cp $(WHEELS)/*.whl $(SDISTS)/*.tar.gz $(DIST)/
	$(PODMAN_ENV) podman save --quiet --format docker-archive --output $(RELEASE_IMAGE) \
		$(IMAGE_REPOSITORY):$(PROJECT_VERSION)
	$(HELM) package $(SOURCE)/deploy/helm/rnnserve --destination $(DIST)
	cd $(DIST) && sha256sum -- * > SHA256SUMS
	@echo "make release: $(DIST)" && cat $(DIST)/SHA256SUMS

image-push: ## push the released image (`make release` first) as REGISTRY/rnnserve:<version>
	@[ -n "$(REGISTRY)" ] || { echo "make image-push: REGISTRY=host[:port][/path], where to push" >&2; exit 1; }
	cd $(DIST) && sha256sum --check --quiet SHA256SUMS
	$(PODMAN_ENV) podman load --quiet --input $(RELEASE_IMAGE)
	$(PODMAN_ENV) podman tag $(IMAGE_REPOSITORY):$(PROJECT_VERSION) $(REGISTRY)/rnnserve:$(PROJECT_VERSION)
	$(PODMAN_ENV) podman push $(PUSH_OPTIONS) $(REGISTRY)/rnnserve:$(PROJECT_VERSION)

version: ## print the version; VERSION=X.Y.Z sets it in pyproject, the chart, the manifests and CHANGELOG
ifeq ($(origin VERSION),command line)
	$(PYTHON) deploy/set-version.py $(VERSION)
	@$(MAKE) --no-print-directory manifests
else
	@echo $(PROJECT_VERSION)
endif

proto: install-test ## regenerate service/_pb from proto/*.proto
	$(BIN)/python proto/generate.py

lint: $(VENV)/.installed-lint ## ruff and mypy (strict on the server; no torch needed); `make test` runs it first
	$(BIN)/ruff check service models bench tests proto deploy requirements
	$(BIN)/ruff format --check service models bench tests proto deploy requirements
	@# mypy cannot follow the package-dir mapping: a tree of links with the installed layout.
	@rm -rf build/typecheck && mkdir -p build/typecheck/rnnserve
	@for f in service/*; do ln -s "$$PWD/$$f" build/typecheck/rnnserve/; done
	@ln -s "$$PWD/models" build/typecheck/rnnserve/models
	$(BIN)/mypy

format: install-test ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format service models bench tests proto deploy requirements
	$(BIN)/ruff check --fix service models bench tests proto deploy requirements

bench-durability: system-deps install ## steps/s and latency of each state store and durability level
	$(BIN)/python -m rnnserve_bench.durability

train: install-test ## retrain and republish the three bundled models (CPU, a few minutes)
	for m in digits_lstm sensor_gru charlm_lstm; do $(BIN)/rnnserve train $$m --model-repository models/repository --overwrite --no-progress || exit 1; done

clean: ## remove the virtualenv and build outputs
	rm -rf $(VENV) $(MINIMUMS_VENV) build dist .pytest_cache
