# k8snetlab: the two commands of the quick start.
#   sudo make demo   install what is missing, run the main experiment
#   sudo make test   install what is missing, run every test
PYTHON ?= python3
ARGS ?=

.PHONY: deps demo test unit clean

deps:
	sh scripts/install-deps.sh $(PYTHON)

demo: deps
	$(PYTHON) experiments/hostgw_vs_ipip.py $(ARGS)

# pytest exits 5 when it collected no test: not a failure of the suite
test: deps
	$(PYTHON) -m pytest $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

unit:
	$(PYTHON) -m pytest tests/unit $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

clean:
	$(PYTHON) -m k8snetlab.cli clean
