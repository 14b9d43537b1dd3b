"""`python -m shimmy`: the emulator, as the `shimmy-emulator` console script runs it."""

import sys

from shimmy.cli import main

sys.exit(main())
