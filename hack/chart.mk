# The Helm chart and what is generated from it (included by Makefile). docs/chart.md explains.
# hack/gen-chart.py copies crds/, operator/rbac.yaml and monitoring/grafana/ into the chart and
# renders manifests/install.yaml and monitoring/alerts/llamaherd.rules.yaml from it.
CHART_PY = $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
CHART_HELM = $(shell $(CHART_PY) -c 'from tests.harness import binary_path; print(binary_path("helm"))' 2>/dev/null || echo helm)

.PHONY: chart manifests chart-check chart-lint test-chart

chart: ## regenerate the chart's copies (CRD, RBAC rules, dashboard), manifests/ and the alert rules
	HELM=$(CHART_HELM) $(CHART_PY) hack/gen-chart.py

manifests: chart ## manifests/install.yaml from the chart (helm template --include-crds)

chart-check: ## fail when a generated chart copy or manifests/install.yaml is stale
	HELM=$(CHART_HELM) $(CHART_PY) hack/gen-chart.py --check

chart-lint: ## helm lint --strict the chart, with defaults and with every switch on
	$(CHART_HELM) lint --strict charts/llamaherd
	$(CHART_HELM) lint --strict charts/llamaherd -f tests/chart/values-all-on.yaml

test-chart: ## the chart's tests (lint, schemas, metric names, promtool, helm install on a control plane)
	$(CHART_PY) -m pytest tests/chart $(PYTEST_ARGS)
