"""End-to-end tests: the chart, the operator and real server pods on a real cluster (kind here).

Run with ``make e2e``, or against any cluster with
``LLAMAHERD_E2E_KUBECONFIG=PATH python -m pytest e2e``. See e2e/README.md.
"""
