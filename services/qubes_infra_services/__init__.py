# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The services the qubes_infra.build roles install into qubes, as one package.

The roles copy this package into a qube's /usr/local/lib/qubes-infra-build/ (persistent in an
AppVM, whose /usr/local is its own) beside small entry points, the programs the qrexec services
and systemd units run, each calling one module's main():

- build_logs (the logs qube): build_log_receiver (qubesbuilder.BuildLog), which stores a log and
  publishes it with build_log_publisher;
- build_vm (the build qubes): trigger_build (qubesbuilder.TriggerBuild) and github_command
  (qubesbuilder.ProcessGithubCommand), on builder_instances, builder_actions, command_grammar,
  command_signature and used_commands;
- webhooks (the net qube): webhook_receiver (the WSGI application gunicorn serves) and
  webhook_worker, on webhook_settings, webhook_spool, webhook_deliveries and webhook_log.

definitions holds what they all check alike: qube names, component names, printable text and
the loading of settings. The package needs Python 3.11 and its standard library only.
"""

# The collection's version (galaxy.yml), which installs it.
__version__ = "0.1.0"
