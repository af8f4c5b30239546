"""`python -m genserve`: the `genserve` command."""

import sys

from genserve.service.cli.main import main

sys.exit(main())
