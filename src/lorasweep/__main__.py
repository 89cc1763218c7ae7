import sys

from lorasweep.cli import main

sys.exit(main())
