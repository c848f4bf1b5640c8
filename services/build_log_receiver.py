# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The program of the qrexec service qubesbuilder.BuildLog (build_logs role).
Runs qubes_infra_services.build_log_receiver.main()
from the package installed beside this program."""

import sys

from qubes_infra_services.build_log_receiver import main

sys.exit(main(sys.argv))
