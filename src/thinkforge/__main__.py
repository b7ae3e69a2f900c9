"""``python -m thinkforge`` (and ``torchrun … -m thinkforge``) runs the CLI."""
import sys

from thinkforge.cli import main

sys.exit(main())
