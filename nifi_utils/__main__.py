import sys

from nifi_utils.pipeline.cli import main

sys.exit(main())
