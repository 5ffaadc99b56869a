import sys

from vertical.cli import main

sys.exit(main())
