# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The program of the qrexec service qubesbuilder.ProcessGithubCommand (build_vm role).
Runs qubes_infra_services.github_command.main() of the package installed beside this program."""

import sys

from qubes_infra_services.github_command import main

sys.exit(main())
