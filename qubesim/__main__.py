import sys

from qubesim.cli import main

sys.exit(main())
