"""`python -m cast ...`: see cast.cli."""
import sys

from cast.cli import main

sys.exit(main())
