"""Tuneship's Airflow-facing layer: hooks, operators and triggers in the provider style.

Lives in plugins/ (on sys.path for the scheduler, workers and the triggerer), never in the
DAG bundle, so the triggerer can import the trigger classes.
"""
