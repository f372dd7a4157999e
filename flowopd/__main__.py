import sys

from flowopd.cli import main

sys.exit(main())
