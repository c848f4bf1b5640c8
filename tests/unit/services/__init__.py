"""Unit tests of the services package (services/qubes_infra_services), run from services/ as
the roles install it in a qube's /usr/local/lib/qubes-infra-build: the entry points beside the
package."""

from __future__ import annotations

from pathlib import Path

SERVICES = Path(__file__).resolve().parents[3] / "services"
# What gunicorn serves, from SERVICES (the receiver's unit: --chdir the programs' folder).
RECEIVER_APPLICATION = "qubes_infra_services.webhook_receiver:create_application()"
