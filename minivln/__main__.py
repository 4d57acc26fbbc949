import sys

from minivln.cli import main

sys.exit(main())
