"""Offline stand-in for the get-pip script that ansible-test downloads to seed its virtualenvs.

ansible-test runs it (from ~/.ansible/test/cache/get_pip_<version>.py) inside a new virtualenv with
pip's own command-line options and the packages to install. Instead of unpacking a bundled pip, it
takes pip from the interpreter's ensurepip and then lets that pip install the requested packages
from the package index as usual.
"""

import subprocess
import sys

# get-pip's own options that pip install does not know.
_GET_PIP_ONLY = {"--no-setuptools", "--no-wheel"}


def main() -> None:
    arguments = [argument for argument in sys.argv[1:] if argument not in _GET_PIP_ONLY]
    subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade", "--default-pip"])
    subprocess.check_call([sys.executable, "-m", "pip", "install", *arguments])


if __name__ == "__main__":
    main()
