"""`python -m train`: the command line of train/cli.py; its return value is the exit status."""

import sys

from train.cli import main

sys.exit(main())
