"""JSON log lines for the worker (FLEET_LOG_FORMAT=json): one object a line, with the job id,
task id, queue and device of the worker loop's lines."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

#: Record attributes the worker loop sets (see worker.runner.JobLog).
JOB_FIELDS = ("job_id", "task_id", "queue", "device")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "msg": record.getMessage(),
        }
        for name in JOB_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                data[name] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def use_json(logger: logging.Logger) -> None:
    """Switch every handler of ``logger`` to JSON lines."""
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())
