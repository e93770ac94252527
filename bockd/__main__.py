import sys

from bockd.cli import main

sys.exit(main())
