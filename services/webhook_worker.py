# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The webhook worker, run by its systemd unit (webhooks role).
Runs qubes_infra_services.webhook_worker.main() of the package installed beside this program."""

import sys

from qubes_infra_services.webhook_worker import main

sys.exit(main())
