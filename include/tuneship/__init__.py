"""Tuneship domain library: data, training, registry, evaluation, compile, serving, monitoring.

No Airflow imports here: the trainer image, the gateway and the tests use it without Airflow.
"""

__version__ = "0.1.0"
