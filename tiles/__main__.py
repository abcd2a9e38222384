import sys

from tiles.cli import main

sys.exit(main())
