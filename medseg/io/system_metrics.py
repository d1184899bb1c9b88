"""MLflow system metrics (CPU, memory, disk, network, GPU) of a training run, optional (``tracking.system_metrics``).

MLflow's ``SystemMetricsMonitor`` samples in a daemon thread and logs ``system/...`` metrics (already in their own
UI section) to the run. Its ``finish`` joins that thread without a timeout, and the thread may be inside MLflow's
HTTP back-off while the server is away; ``SystemMetrics.stop`` waits a few seconds at most instead and then flushes
under medseg's bounded retries, so an outage never holds the end of training (the monitor also stops by itself
when it cannot reach the server, losing only system metrics).
"""

from __future__ import annotations

import logging
from typing import Any

from medseg.tracking import bounded_http

log = logging.getLogger(__name__)


class SystemMetrics:
    """MLflow's system-metrics monitor for one run, started at once and stopped without stalling."""

    def __init__(self, uri: str, run_id: str, interval_s: float) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor: Any = SystemMetricsMonitor(
            run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=uri
        )
        self.monitor.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop sampling; flush what was sampled if the thread ended within ``timeout_s``."""
        monitor, thread = self.monitor, self.monitor._process  # the monitor's thread (MLflow's own attribute)
        monitor._shutdown_event.set()
        if thread is None:
            return
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("system metrics: the monitor did not stop within %.0f s (tracking server away?)", timeout_s)
            return
        try:
            with bounded_http():
                monitor.mlflow_logger.flush()
        except Exception as e:  # losing system metrics never fails a training
            log.warning("system metrics: last samples not sent (%s)", e.__class__.__name__)
