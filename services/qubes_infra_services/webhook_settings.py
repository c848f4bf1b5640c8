# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Settings shared by the webhook receiver and its worker, written by the webhooks role."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

from qubes_infra_services.definitions import load_settings, settings_path

DEFAULT_PATH = "/usr/local/etc/qubes-infra-build/webhooks.json"
# GitHub caps webhook payloads at 25 MB.
GITHUB_MAX_PAYLOAD = 25_000_000


@dataclass(frozen=True)
class Settings:
    secret_file: str
    max_body: int
    spool_directory: str
    spool_max_events: int
    spool_max_bytes: int
    log_file: str
    log_max_bytes: int
    build_vms_list: str
    call_timeout: int
    max_command_bytes: int
    # Append-only logs of the services (nginx's refusals, gunicorn, the worker's errors): the
    # worker keeps them bounded too.
    service_logs: tuple[str, ...] = ()
    qrexec_client: str = "qrexec-client-vm"
    # Events that may wait for one build qube (besides the one it is being called with).
    queue_max_events: int = 200
    # The receiver's memory of accepted deliveries (see webhook_deliveries): its file (empty: in
    # the spool's parent folder), how long a signed body stays acceptable and is remembered
    # (seconds), and how many deliveries it holds at most.
    deliveries_file: str = ""
    replay_window: int = 259200
    deliveries_max: int = 50000


def load(path: str | None = None) -> Settings:
    path = path or settings_path("WEBHOOKS_SETTINGS", DEFAULT_PATH)
    raw = load_settings(path)
    known = {field.name for field in fields(Settings)}
    settings = Settings(**{key: raw[key] for key in raw if key in known})
    settings = replace(settings, service_logs=tuple(settings.service_logs))
    if not settings.deliveries_file:
        folder = os.path.dirname(os.path.normpath(settings.spool_directory))
        settings = replace(settings, deliveries_file=os.path.join(folder, "deliveries.sqlite"))
    if settings.replay_window <= 0 or settings.deliveries_max <= 0:
        raise ValueError(f"{path}: replay_window and deliveries_max must be positive")
    if not 0 < settings.max_body <= GITHUB_MAX_PAYLOAD:
        raise ValueError(f"{path}: max_body must be 1..{GITHUB_MAX_PAYLOAD} bytes")
    if settings.queue_max_events < 1:
        raise ValueError(f"{path}: queue_max_events must be at least 1")
    return settings
