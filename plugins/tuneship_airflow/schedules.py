"""The DAGs' clock schedules, which `TUNESHIP_CLOCK_SCHEDULES=off` turns off
(`tuneship.config.clock_schedules`: `make demo`'s stack, which triggers every run itself).
Asset triggers stay either way."""

from __future__ import annotations

from typing import Any

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

from tuneship import config


def clock(cron: str) -> str | None:
    """`cron` (a cron expression or preset), or no schedule when clock schedules are off."""
    return cron if config.clock_schedules() else None


def assets_or_clock(cron: str, assets: Any) -> Any:
    """Runs when `assets` are updated or at `cron` (UTC); only on `assets` when clock
    schedules are off."""
    if not config.clock_schedules():
        return assets
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=assets)
