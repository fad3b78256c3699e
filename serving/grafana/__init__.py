"""Grafana for the compose stack: provisioning and the generated Tuneship dashboards."""
